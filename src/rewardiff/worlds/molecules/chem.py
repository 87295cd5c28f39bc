"""Chemistry rewards from RDKit on molecules-world token sequences: QED, SA, logP.

Each reward decodes its input with the molecules world's tokenizer and scores the molecule
with RDKit; all are black-box (``differentiable=False``). Input: token ids [B, L] (long), or
one-hot / relaxed probabilities [B, L, V], read through their argmax. An empty sequence (or
a molecule RDKit rejects, which SELFIES tokens never give) gets the reward's minimum value.

- ``qed``: quantitative estimate of drug-likeness (Bickerton et al. 2012), in [0, 1].
- ``sa``: synthetic accessibility (Ertl & Schuffenhauer 2009, RDKit Contrib ``SA_Score``)
  flipped so that higher is better: ``(10 - SA) / 9``, in [0, 1] (SA runs from 1, easy, to
  10, hard).
- ``logp``: Crippen's MolLogP (Wildman & Crippen 1999), clipped to [-10, 10].
- ``qed-sa``: ``0.5*qed+0.5*sa``, a registry weighted sum, in [0, 1].
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from functools import lru_cache
from types import ModuleType

import torch
from rdkit import Chem, RDConfig
from rdkit.Chem import QED, Crippen
from torch import Tensor

from rewardiff.errors import UserError
from rewardiff.rewards.base import RewardFn
from rewardiff.rewards.registry import get_reward
from rewardiff.types import Reward
from rewardiff.worlds.molecules import data as molecules

LOGP_RANGE = (-10.0, 10.0)  # Crippen logP is clipped to this; an empty molecule gets the low end
QED_SA = "0.5*qed+0.5*sa"


@lru_cache(maxsize=1)
def sascorer() -> ModuleType:
    """RDKit's Contrib ``SA_Score/sascorer.py``, imported from its path (it is not a package)."""
    path = os.path.join(RDConfig.RDContribDir, "SA_Score", "sascorer.py")
    if not os.path.isfile(path):
        raise UserError(f"RDKit's SA_Score module is missing: {path}; install an RDKit build that ships Contrib")
    spec = importlib.util.spec_from_file_location("rdkit_contrib_sascorer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def qed_of(mol: Chem.Mol) -> float:
    """QED in [0, 1]."""
    return float(QED.qed(mol))


def sa_of(mol: Chem.Mol) -> float:
    """Synthetic accessibility flipped to [0, 1], higher is easier: ``(10 - SA) / 9``."""
    return (10.0 - float(sascorer().calculateScore(mol))) / 9.0


def logp_of(mol: Chem.Mol) -> float:
    """Crippen logP clipped to ``LOGP_RANGE``."""
    return min(max(float(Crippen.MolLogP(mol)), LOGP_RANGE[0]), LOGP_RANGE[1])


# name -> (score of an RDKit molecule, value range); the range's low end scores an empty molecule
PROPERTIES: dict[str, tuple[Callable[[Chem.Mol], float], tuple[float, float]]] = {
    "qed": (qed_of, (0.0, 1.0)),
    "sa": (sa_of, (0.0, 1.0)),
    "logp": (logp_of, LOGP_RANGE),
}


def property_values(name: str, smiles: Sequence[str]) -> Tensor:
    """Property ``name`` (``qed``, ``sa`` or ``logp``) of each SMILES, float [N].

    Empty or unparseable SMILES get the property's minimum value.
    """
    if name not in PROPERTIES:
        raise UserError(f"unknown chemistry property {name!r}; valid: {', '.join(PROPERTIES)}")
    score, (low, _) = PROPERTIES[name]
    values = []
    for s in smiles:
        mol = molecules.parse(s)
        values.append(score(mol) if mol is not None and mol.GetNumAtoms() > 0 else low)
    return torch.tensor(values, dtype=torch.float32)


def token_ids(x: Tensor, vocab_size: int) -> Tensor:
    """Token ids [B, L] from ids [B, L] or probabilities [B, L, V] (argmax over V)."""
    if x.dim() == 3:
        if x.shape[-1] != vocab_size:
            raise UserError(f"molecule probabilities have {x.shape[-1]} classes; the tokenizer has {vocab_size}")
        return x.argmax(-1)
    if x.dim() != 2 or x.is_floating_point() or x.is_complex():
        raise UserError(f"molecule rewards take token ids [B, L] or probabilities [B, L, V]; got {x.dtype} {tuple(x.shape)}")
    return x.long()


def smiles_of(x: Tensor) -> list[str]:
    """Canonical SMILES of token ids [B, L] or probabilities [B, L, V] ("" for an empty sequence)."""
    tok = molecules.tokenizer()
    return tok.decode_batch(token_ids(x.detach(), tok.size))


def _reward(name: str, description: str) -> RewardFn:
    """The black-box reward of property ``name`` on token sequences."""
    rng = PROPERTIES[name][1]
    return RewardFn(name, False, rng, description, lambda x, prompts: property_values(name, smiles_of(x)).to(x.device))


def qed() -> RewardFn:
    """Molecules: QED drug-likeness in [0, 1] from RDKit (0 for an empty molecule)."""
    return _reward("qed", "molecules: QED drug-likeness in [0, 1] (RDKit)")


def sa() -> RewardFn:
    """Molecules: synthetic accessibility flipped to (10 - SA) / 9 in [0, 1], higher is easier."""
    return _reward("sa", "molecules: synthetic accessibility as (10 - SA) / 9 in [0, 1], higher is easier (RDKit Contrib)")


def logp() -> RewardFn:
    """Molecules: Crippen logP clipped to [-10, 10] (-10 for an empty molecule)."""
    return _reward("logp", "molecules: Crippen logP clipped to [-10, 10] (RDKit)")


def qed_sa() -> Reward:
    """Molecules: 0.5 * QED + 0.5 * flipped SA, in [0, 1]."""
    reward = get_reward(QED_SA)
    reward.name = "qed-sa"
    reward.description = "molecules: 0.5*qed+0.5*sa, in [0, 1]"
    return reward
