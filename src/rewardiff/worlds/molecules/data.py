"""The molecules world: real molecules from RDKit's NCI sample as SELFIES token sequences.

Data: ``RDConfig.RDDataDir/NCI/first_5K.smi`` (4,999 lines of "SMILES<tab>id"). Each molecule
is standardized (:func:`canonical`): parsed by RDKit, reduced to its largest fragment (the
file holds salts such as "...[Na]" or ".Cl"; the counter-ion is dropped: the fragment with
the most heavy atoms wins, the first listed on a tie), stripped of stereochemistry, and
written as RDKit canonical SMILES. Kept are molecules made only of B, C, N, O, F, P, S, Cl,
Br and I (metals, Si and Se are dropped: SELFIES has no valence rule for them, so random
token sequences holding them could decode to molecules RDKit rejects) whose SELFIES
encoding decodes back to the same canonical SMILES; duplicates are dropped, keeping the
file's order. :func:`load_smiles` gives these 4,687 molecules.

Tokens: SELFIES symbols, so that every token sequence decodes to a valid molecule. The
sequence length is fixed at ``MAX_LEN`` = 56 symbols, which covers 97.8 % of the molecules
(4,585 of 4,687); longer ones are left out of :func:`data`. The vocabulary (``<pad>`` = 0,
``<mask>`` = 1, then the 39 SELFIES symbols of the kept molecules, sorted) ships in
``weights/molecules-tokenizer.json``. About 10 % of the molecules, chosen by a hash of their
canonical SMILES, are held out (448 held out, 4,137 for training).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import selfies as sf
import torch
from rdkit import Chem, RDConfig
from rdkit.rdBase import BlockLogs
from torch import Tensor

from rewardiff.errors import UserError
from rewardiff.io import atomic_write_text
from rewardiff.worlds import WEIGHTS

ELEMENTS = frozenset({"B", "C", "N", "O", "F", "P", "S", "Cl", "Br", "I"})
MAX_LEN = 56  # SELFIES symbols per sequence; covers 97.8 % of the standardized molecules
HELD_OUT_EVERY = 10  # a molecule is held out when the hash of its SMILES is 0 modulo this
PAD, MASK = "<pad>", "<mask>"
SPLITS = ("train", "held-out")
TOKENIZER_FILE = WEIGHTS / "molecules-tokenizer.json"


def source_file() -> str:
    """Path of the SMILES file shipped with RDKit that the world is built from."""
    return os.path.join(RDConfig.RDDataDir, "NCI", "first_5K.smi")


# ----------------------------------------------------------------------------- chemistry


def parse(smiles: str) -> Chem.Mol | None:
    """The RDKit molecule of ``smiles``, or None when it is empty or RDKit cannot parse it."""
    if not smiles:
        return None
    _quiet = BlockLogs()  # noqa: F841  (RDKit stays silent while this lives)
    return Chem.MolFromSmiles(smiles)


def _standard_mol(mol: Chem.Mol) -> Chem.Mol:
    """The largest fragment (the first listed on a tie), stereochemistry removed."""
    if len(Chem.GetMolFrags(mol)) > 1:
        mol = max(Chem.GetMolFrags(mol, asMols=True), key=lambda f: f.GetNumHeavyAtoms())
    Chem.RemoveStereochemistry(mol)
    return mol


def canonical(smiles: str) -> str | None:
    """The world's standard form: largest fragment, no stereochemistry, canonical SMILES.

    Returns None when ``smiles`` is empty or cannot be parsed.

    >>> canonical("OCC.[Na+].[Cl-]")
    'CCO'
    """
    mol = parse(smiles)
    return None if mol is None else Chem.MolToSmiles(_standard_mol(mol))


def _world_selfies(smiles: str, mol: Chem.Mol) -> str | None:
    """The SELFIES of a standardized molecule, or None when it has atoms outside ``ELEMENTS``
    or its SELFIES does not decode back to ``smiles``."""
    if any(a.GetSymbol() not in ELEMENTS for a in mol.GetAtoms()):
        return None
    try:
        encoded = sf.encoder(smiles)
    except sf.EncoderError:
        return None
    return encoded if encoded is not None and canonical(sf.decoder(encoded)) == smiles else None


@lru_cache(maxsize=1)
def _standardized() -> tuple[tuple[str, str], ...]:
    """(canonical SMILES, SELFIES) of every kept molecule, in the file's order."""
    seen: dict[str, str] = {}
    with open(source_file()) as f:
        for line in f:
            fields = line.split()
            mol = parse(fields[0]) if fields else None
            if mol is None:
                continue
            mol = _standard_mol(mol)
            s = Chem.MolToSmiles(mol)
            if s not in seen and (encoded := _world_selfies(s, mol)) is not None:
                seen[s] = encoded
    return tuple(seen.items())


def load_smiles() -> list[str]:
    """The world's molecules, standardized and deduplicated, in the file's order (see module doc)."""
    return [s for s, _ in _standardized()]


def is_held_out(smiles: str) -> bool:
    """Whether the molecule with canonical ``smiles`` belongs to the held-out split (~10 %)."""
    digest = hashlib.sha256(smiles.encode("utf-8")).hexdigest()
    return int(digest[:12], 16) % HELD_OUT_EVERY == 0


# ----------------------------------------------------------------------------- tokenizer


class Tokenizer:
    """SELFIES tokenizer with a fixed vocabulary and a fixed sequence length.

    Ids: ``<pad>`` = 0, ``<mask>`` = 1 (reserved for masked diffusion), then the SELFIES
    symbols, sorted. A sequence is read up to its first ``<pad>`` or ``<mask>``: both end it.

    Args:
        symbols: SELFIES symbols (sorted and deduplicated here).
        max_len: the fixed sequence length L.
    """

    def __init__(self, symbols: Sequence[str], max_len: int):
        symbols = sorted(set(symbols) - {PAD, MASK})
        self.vocab: list[str] = [PAD, MASK, *symbols]
        self.pad_id, self.mask_id = 0, 1
        self.max_len = int(max_len)
        self._index = {s: i for i, s in enumerate(self.vocab)}

    @property
    def size(self) -> int:
        """Vocabulary size V, special tokens included."""
        return len(self.vocab)

    @classmethod
    def from_symbols(cls, sequences: Sequence[Sequence[str]], max_len: int = MAX_LEN) -> Tokenizer:
        """The tokenizer whose symbols are those of the sequences of at most ``max_len`` symbols."""
        symbols: set[str] = set()
        for seq in sequences:
            if len(seq) <= max_len:
                symbols.update(seq)
        return cls(sorted(symbols), max_len)

    def symbols_of(self, smiles: str) -> list[str]:
        """SELFIES symbols of the standardized molecule (see :func:`canonical`).

        Raises:
            UserError: unparseable SMILES, or one SELFIES cannot encode.
        """
        s = canonical(smiles)
        if s is None:
            raise UserError(f"cannot parse SMILES {smiles!r}")
        try:
            return list(sf.split_selfies(sf.encoder(s)))
        except sf.EncoderError:
            raise UserError(f"SELFIES cannot encode SMILES {smiles!r}") from None

    def encode(self, smiles: str) -> Tensor:
        """Token ids [L] (long) of the standardized molecule, padded with ``<pad>``.

        Raises:
            UserError: unparseable SMILES, a symbol outside the vocabulary, or more than L symbols.
        """
        return self.ids_of(self.symbols_of(smiles), smiles)

    def ids_of(self, symbols: Sequence[str], what: str = "") -> Tensor:
        """Token ids [L] (long) of SELFIES symbols, padded with ``<pad>``; ``what`` names them in errors."""
        what = f"SMILES {what!r}" if what else "the sequence"
        if len(symbols) > self.max_len:
            raise UserError(f"{what} has {len(symbols)} SELFIES symbols; the limit is {self.max_len}")
        unknown = sorted({t for t in symbols if t not in self._index})
        if unknown:
            raise UserError(f"{what} uses symbols outside the vocabulary: {', '.join(unknown)}")
        ids = [self._index[t] for t in symbols] + [self.pad_id] * (self.max_len - len(symbols))
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        """Canonical SMILES of ids [L]; "" when the sequence is empty (or, never seen, RDKit rejects it).

        Symbols after the first ``<pad>`` or ``<mask>`` are ignored.
        """
        values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        symbols = []
        for i in values:
            if not 0 <= int(i) < self.size:
                raise UserError(f"token id {int(i)} outside the vocabulary (size {self.size})")
            if int(i) in (self.pad_id, self.mask_id):
                break
            symbols.append(self.vocab[int(i)])
        return canonical(sf.decoder("".join(symbols))) or ""

    def decode_batch(self, ids: Tensor) -> list[str]:
        """Canonical SMILES of each row of ids [B, L]."""
        if ids.dim() != 2:
            raise UserError(f"decode_batch takes token ids [B, L]; got shape {tuple(ids.shape)}")
        return [self.decode(row) for row in ids.cpu()]

    def save(self, path: str | Path) -> Path:
        """Write the vocabulary and sequence length as JSON (atomically)."""
        doc = {"format": "selfies", "max_len": self.max_len, "vocab": self.vocab}
        return atomic_write_text(path, json.dumps(doc, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Read a tokenizer written by :meth:`save`.

        Raises:
            UserError: missing file, invalid JSON, or a vocabulary not starting with <pad>, <mask>.
        """
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
            vocab, max_len = list(doc["vocab"]), int(doc["max_len"])
        except FileNotFoundError:
            raise UserError(f"tokenizer file not found: {path}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"tokenizer file {path} is not a valid tokenizer JSON ({e})") from None
        if vocab[:2] != [PAD, MASK] or len(set(vocab)) != len(vocab):
            raise UserError(f"tokenizer file {path}: field 'vocab' must start with {PAD}, {MASK} and hold no repeats")
        tok = cls(vocab[2:], max_len)
        if tok.vocab != vocab:
            raise UserError(f"tokenizer file {path}: field 'vocab' must list the symbols sorted after {PAD}, {MASK}")
        return tok


def build_tokenizer() -> Tokenizer:
    """The tokenizer built from the data (what ``weights/molecules-tokenizer.json`` holds)."""
    return Tokenizer.from_symbols([list(sf.split_selfies(e)) for _, e in _standardized()], MAX_LEN)


@lru_cache(maxsize=1)
def tokenizer() -> Tokenizer:
    """The world's tokenizer, read from the shipped ``weights/molecules-tokenizer.json`` (cached)."""
    return Tokenizer.load(TOKENIZER_FILE)


def tokenizer_at(path: str | Path | None = None) -> Tokenizer:
    """The tokenizer saved at ``path`` (a ``tokenizer.json``), or the world's when None: the
    ``plugins.TOKENIZERS`` entry of the molecules world."""
    return tokenizer() if path is None else Tokenizer.load(path)


def model_tokenizer(directory: str | Path, vocab_size: int, max_len: int, start_id: int) -> Tokenizer:
    """The tokenizer of the model saved in ``directory``: its ``tokenizer.json`` if it has one,
    else the world's; ``start_id`` is the model's id of ``<mask>`` (x_T or the start token).

    Raises:
        UserError: a tokenizer whose size, length or ``<mask>`` id differs from the model's.
    """
    d = Path(directory)
    tok = Tokenizer.load(d / "tokenizer.json") if (d / "tokenizer.json").is_file() else tokenizer()
    if tok.size != vocab_size or tok.max_len != max_len or tok.mask_id != start_id:
        raise UserError(f"the tokenizer (V={tok.size}, L={tok.max_len}) does not fit the model in {d} (V={vocab_size}, L={max_len})")
    return tok


# ----------------------------------------------------------------------------- data


@lru_cache(maxsize=1)
def _encoded() -> tuple[Tensor, tuple[str, ...]]:
    """Token ids [N, L] and SMILES of every molecule that fits the tokenizer."""
    tok = tokenizer()
    rows, kept = [], []
    for s, encoded in _standardized():
        try:
            rows.append(tok.ids_of(list(sf.split_selfies(encoded))))
        except UserError:  # too long (or, with a foreign vocabulary, unknown symbols)
            continue
        kept.append(s)
    return torch.stack(rows), tuple(kept)


def kept_smiles() -> list[str]:
    """The molecules that fit the tokenizer (both splits), in the file's order."""
    return list(_encoded()[1])


def data(split: str) -> tuple[Tensor, list[str]]:
    """Token ids [N, L] (long) and canonical SMILES of a split: ``train`` or ``held-out``.

    Raises:
        UserError: an unknown split.
    """
    if split not in SPLITS:
        raise UserError(f"unknown molecules split {split!r}; valid: {', '.join(SPLITS)}")
    ids, smiles = _encoded()
    want = split == "held-out"
    idx = [i for i, s in enumerate(smiles) if is_held_out(s) == want]
    return ids[idx].clone(), [smiles[i] for i in idx]


# ----------------------------------------------------------------------------- metrics


def _valid_canonical(smiles_list: Sequence[str]) -> list[str]:
    return [c for c in (canonical(s) for s in smiles_list) if c]


def validity(smiles_list: Sequence[str]) -> float:
    """Share of the SMILES that are non-empty and parsed by RDKit (0 for an empty list)."""
    return len(_valid_canonical(smiles_list)) / len(smiles_list) if smiles_list else 0.0


def uniqueness(smiles_list: Sequence[str]) -> float:
    """Distinct molecules (standardized, see :func:`canonical`) over valid ones (0 when none is valid)."""
    valid = _valid_canonical(smiles_list)
    return len(set(valid)) / len(valid) if valid else 0.0


def novelty(smiles_list: Sequence[str], train_smiles: Sequence[str]) -> float:
    """Share of the distinct valid molecules not among ``train_smiles`` (0 when none is valid).

    Both lists are compared in the world's standard form (:func:`canonical`).
    """
    unique = set(_valid_canonical(smiles_list))
    if not unique:
        return 0.0
    train = set(_valid_canonical(train_smiles))
    return len(unique - train) / len(unique)
