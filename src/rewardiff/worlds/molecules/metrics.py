"""The field's yardsticks of a set of generated molecules, against one of the world's splits.

- FCD: the Fréchet ChemNet Distance (Preuer et al. 2018) between the valid molecules and the
  reference, from the activations [N, 512] of the ``fcd`` package's ChemNet
  (``ChemNet_v0.13_pretrained.pt``): ``|mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))``.
  FCD is biased upward at small sample sizes (the covariance of a few hundred 512-d activations
  is rank deficient), so ``fcd_n`` gives the count of molecules it was measured on; compare
  FCDs only at equal counts.
- internal diversity: the mean over distinct pairs of valid molecules of 1 - Tanimoto
  similarity of Morgan fingerprints (radius 2, 2048 bits, RDKit); duplicates count as pairs
  at distance 0.
- property distributions: QED, the raw SA score of Ertl & Schuffenhauer (1 easy ... 10 hard,
  not the flipped reward of :mod:`~rewardiff.worlds.molecules.chem`), Crippen logP
  (unclipped), ring count, aromatic ring count, heavy-atom count: the mean of each and its
  Wasserstein-1 distance to the reference's (``scipy.stats.wasserstein_distance``), and the
  share of molecules with at least one aromatic ring.
- validity, uniqueness and novelty against the training split (:mod:`~rewardiff.worlds.molecules.data`).

Only ChemNet and its activation code come from ``fcd``; the wrapper is ours because, with the
installed numpy and scipy, ``fcd.get_predictions`` calls ``np.row_stack`` (deprecated in
NumPy 2) through a ``DataLoader`` with a worker process per call and moves the net to CUDA
when there is one, ``fcd.calculate_frechet_distance`` passes ``disp`` to ``scipy.linalg.sqrtm``
(removed in SciPy 1.18) and takes the square root of the non-symmetric S_1 S_2, which is
inexact when, as here, both are singular, and ``fcd.load_ref_model`` leaves a temporary
directory behind. The trace term is computed here from the symmetric PSD matrix
S_1^(1/2) S_2 S_1^(1/2), which has the same eigenvalues as S_1 S_2.

The reference's activation mean and covariance and its property values are computed once
per process (``lru_cache``): about a second for the 448 held-out molecules.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from typing import NamedTuple

import numpy as np
import torch
from rdkit import DataStructs
from rdkit.Chem import Crippen, rdFingerprintGenerator, rdMolDescriptors
from scipy.stats import wasserstein_distance

from rewardiff.errors import UserError
from rewardiff.worlds.molecules import data as molecules
from rewardiff.worlds.molecules.chem import qed_of, sascorer

FINGERPRINT = "Morgan fingerprints, radius 2, 2048 bits (RDKit)"
CHEMNET_PAD = 350  # SMILES characters ChemNet reads, the fcd package's standard padding
PROPERTY_NAMES = ("qed", "sa_score", "logp", "rings", "aromatic_rings", "heavy_atoms")


@lru_cache(maxsize=1)
def chemnet() -> torch.nn.Module:
    """The ``fcd`` package's ChemNet (eval mode, CPU), loaded from the weights it ships."""
    from fcd.utils import load_imported_model

    with resources.as_file(resources.files("fcd") / "ChemNet_v0.13_pretrained.pt") as path:
        net = load_imported_model(torch.load(path, weights_only=True))
    return net.eval()


@torch.no_grad()
def chemnet_activations(smiles: Sequence[str], batch_size: int = 128) -> np.ndarray:
    """ChemNet's activations [N, 512] (float64) of SMILES, one-hot encoded as ``fcd`` does (padded to 350)."""
    from fcd.utils import get_one_hot

    if not smiles:
        return np.zeros((0, 512))
    net, out = chemnet(), []
    for i in range(0, len(smiles), batch_size):
        x = np.stack([get_one_hot(s, pad_len=CHEMNET_PAD) for s in smiles[i : i + batch_size]]) / 35.0  # [B, 350, 35]
        out.append(net(torch.from_numpy(x).float().transpose(1, 2)).double().numpy())
    return np.concatenate(out)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)) for Gaussians N(mu, S), S PSD [D, D].

    Tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2).
    """
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


def _gaussian(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return acts.mean(0), np.cov(acts, rowvar=False)


def fcd(smiles: Sequence[str], reference: Sequence[str]) -> float:
    """FCD between two lists of SMILES (at least 2 each)."""
    if len(smiles) < 2 or len(reference) < 2:
        raise UserError(f"FCD needs at least 2 molecules a set; got {len(smiles)} and {len(reference)}")
    return frechet_distance(*_gaussian(chemnet_activations(smiles)), *_gaussian(chemnet_activations(reference)))


def internal_diversity(smiles: Sequence[str]) -> float:
    """Mean over distinct pairs of 1 - Tanimoto similarity of the molecules' Morgan fingerprints
    (radius 2, 2048 bits); 0 for fewer than 2 molecules."""
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    fps = [gen.GetFingerprint(m) for m in (molecules.parse(s) for s in smiles) if m is not None]
    if len(fps) < 2:
        return 0.0
    total = sum(sum(DataStructs.BulkTanimotoSimilarity(fps[i], fps[i + 1 :])) for i in range(len(fps) - 1))
    pairs = len(fps) * (len(fps) - 1) / 2
    return 1.0 - total / pairs


def properties(smiles: Sequence[str]) -> dict[str, np.ndarray]:
    """Each of ``PROPERTY_NAMES`` over the valid molecules of ``smiles`` (float64 [N_valid])."""
    mols = [m for m in (molecules.parse(s) for s in smiles) if m is not None and m.GetNumAtoms() > 0]
    fns = {
        "qed": qed_of, "sa_score": lambda m: sascorer().calculateScore(m), "logp": Crippen.MolLogP,
        "rings": rdMolDescriptors.CalcNumRings, "aromatic_rings": rdMolDescriptors.CalcNumAromaticRings,
        "heavy_atoms": lambda m: m.GetNumHeavyAtoms(),
    }
    return {k: np.array([float(f(m)) for m in mols], dtype=np.float64) for k, f in fns.items()}


class Reference(NamedTuple):
    """What the yardsticks compare against: a set's ChemNet Gaussian and property values."""

    mu: np.ndarray  # [512] mean ChemNet activation
    sigma: np.ndarray  # [512, 512] their covariance
    values: dict[str, np.ndarray]  # property name -> [N] values
    n: int  # valid molecules in the set


@lru_cache(maxsize=4)
def reference_stats(reference: str | tuple[str, ...] = "held-out") -> Reference:
    """The :class:`Reference` of a split (``train`` or ``held-out``) or of a tuple of SMILES (cached)."""
    smiles = molecules.data(reference)[1] if isinstance(reference, str) else list(reference)
    valid = [s for s in smiles if molecules.parse(s) is not None]
    return Reference(*_gaussian(chemnet_activations(valid)), properties(valid), len(valid))


def reference_summary(reference: str | Sequence[str] = "held-out") -> dict[str, float]:
    """The reference's own ``samples`` (valid molecules), ``aromatic_fraction`` and ``<p>_mean``."""
    ref = reference_stats(reference if isinstance(reference, str) else tuple(reference))
    out = {"samples": float(ref.n), "aromatic_fraction": float((ref.values["aromatic_rings"] > 0).mean())}
    return out | {f"{k}_mean": float(v.mean()) for k, v in ref.values.items()}


def measures(smiles: Sequence[str], reference: str | Sequence[str] = "held-out") -> dict[str, float]:
    """Every yardstick of the molecules ``smiles`` against ``reference`` (a split name or SMILES).

    Keys: ``samples``, ``validity``, ``uniqueness``, ``novelty`` (against the training split),
    ``fcd`` (NaN below 2 valid molecules) and ``fcd_n``, ``internal_diversity``,
    ``aromatic_fraction``, and ``<p>_mean``, ``<p>_w1`` for each ``p`` of ``PROPERTY_NAMES``
    (NaN when no molecule is valid).
    """
    ref = reference_stats(reference if isinstance(reference, str) else tuple(reference))
    valid = [s for s in smiles if molecules.parse(s) is not None and s]
    out: dict[str, float] = {"samples": float(len(smiles)), "validity": molecules.validity(smiles),
                             "uniqueness": molecules.uniqueness(smiles),
                             "novelty": molecules.novelty(smiles, molecules.data("train")[1])}
    out["fcd"] = frechet_distance(*_gaussian(chemnet_activations(valid)), ref.mu, ref.sigma) if len(valid) > 1 else float("nan")
    out["fcd_n"] = float(len(valid))
    out["internal_diversity"] = internal_diversity(valid)
    values = properties(valid)
    out["aromatic_fraction"] = float((values["aromatic_rings"] > 0).mean()) if valid else float("nan")
    for k, v in values.items():
        out[f"{k}_mean"] = float(v.mean()) if len(v) else float("nan")
        out[f"{k}_w1"] = float(wasserstein_distance(v, ref.values[k])) if len(v) else float("nan")
    return out
