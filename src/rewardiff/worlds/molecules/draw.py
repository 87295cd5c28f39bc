"""Drawings of molecules for reports: a grid of 2-D structures from SMILES (RDKit)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from rewardiff.io import atomic_write


def save_molecule_grid(smiles: Sequence[str], path: str | os.PathLike, per_row: int = 6, size: int = 180,
                       legends: Sequence[str] | None = None) -> Path:
    """Draw the molecules of ``smiles`` in a grid PNG (``Draw.MolsToGridImage``) at ``path``.

    Empty or unparseable SMILES are drawn as empty cells. ``legends`` (one string per molecule)
    default to the SMILES, shortened to fit the cell.
    """
    from rdkit import Chem
    from rdkit.Chem import Draw
    from rdkit.rdBase import BlockLogs

    from rewardiff.worlds.molecules.data import parse

    _quiet = BlockLogs()  # noqa: F841  (RDKit stays silent while this lives)
    mols = [parse(s) or Chem.Mol() for s in smiles]
    legends = list(legends) if legends is not None else [s if len(s) <= 28 else s[:25] + "..." for s in smiles]
    image = Draw.MolsToGridImage(mols or [Chem.Mol()], molsPerRow=per_row, subImgSize=(size, size), legends=legends or [""])
    return atomic_write(path, lambda p: image.save(str(p), format="PNG"))
