"""The molecules world's yardsticks: FCD, internal diversity, property distances, the hook."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import selfies as sf
import torch
from rdkit.Chem import rdFingerprintGenerator

from rewardiff.worlds.molecules import data as molecules
from rewardiff.worlds.molecules import metrics
from rewardiff.worlds.molecules.evaluate import chemistry_hook


def _shuffled(smiles: list[str], seed: int = 0) -> list[str]:
    """Each molecule's SELFIES symbols in a random order, decoded (SELFIES keeps them valid)."""
    rng = np.random.default_rng(seed)
    out = []
    for s in smiles:
        symbols = list(sf.split_selfies(sf.encoder(s)))
        out.append(molecules.canonical(sf.decoder("".join(rng.permutation(symbols)))) or "C")
    return out


def test_frechet_distance_closed_form():
    # 1-D: N(0, 1) against N(3, 4): 3^2 + 1 + 4 - 2 * sqrt(1 * 4) = 10
    assert metrics.frechet_distance(np.zeros(1), np.eye(1), np.full(1, 3.0), 4 * np.eye(1)) == pytest.approx(10.0)
    # commuting diagonal covariances: sum of (sqrt(a) - sqrt(b))^2 = (1 - 2)^2 + (3 - 1)^2 = 5
    assert metrics.frechet_distance(np.zeros(2), np.diag([1.0, 9.0]), np.zeros(2), np.diag([4.0, 1.0])) == pytest.approx(5.0)


def test_fcd_of_a_set_against_itself_is_zero_and_grows_under_corruption():
    _, held = molecules.data("held-out")
    _, train = molecules.data("train")
    assert abs(metrics.fcd(held[:100], held[:100])) < 1e-3
    ref = metrics.reference_stats("held-out")  # cached: measured once for the module
    to_held = lambda s: metrics.frechet_distance(*metrics._gaussian(metrics.chemnet_activations(s)), ref.mu, ref.sigma)  # noqa: E731
    clean, corrupt = to_held(train[:200]), to_held(_shuffled(train[:200]))
    assert 1.0 < clean < corrupt / 1.5  # 8.9 against 17.8: shuffled tokens are far off the data


def _check_self_measures(measures) -> None:
    """The held-out molecules against the held-out reference: FCD 0, every W1 0."""
    _, held = molecules.data("held-out")
    m = measures(held)
    assert abs(m["fcd"]) < 1e-3 and m["fcd_n"] == len(held)
    assert all(m[f"{p}_w1"] == pytest.approx(0.0, abs=1e-12) for p in metrics.PROPERTY_NAMES)
    assert m["novelty"] == 1.0 and m["validity"] == 1.0


def test_measures_of_the_reference_itself():
    _check_self_measures(metrics.measures)


def test_a_swapped_reference_fails_the_self_check():
    swapped = lambda smiles: metrics.measures(smiles, reference=molecules.data("train")[1][:200])  # noqa: E731
    with pytest.raises(AssertionError):
        _check_self_measures(swapped)


def _check_internal_diversity(fn) -> None:
    assert fn(["CCO"] * 5) == 0.0
    # methane, methane, water: each is one Morgan bit (its atom, no neighbours), the two
    # elements' bits differ; pair similarities 1, 0, 0 -> diversity 1 - 1/3
    assert fn(["C", "C", "O"]) == pytest.approx(2 / 3)
    # three real molecules against Tanimoto written out on their sets of on-bits
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    bits = [set(gen.GetFingerprint(molecules.parse(s)).GetOnBits()) for s in ("CCO", "CCN", "c1ccccc1O")]
    sims = [len(a & b) / len(a | b) for a, b in ((bits[0], bits[1]), (bits[0], bits[2]), (bits[1], bits[2]))]
    assert fn(["CCO", "CCN", "c1ccccc1O"]) == pytest.approx(1 - sum(sims) / 3)
    assert 0 < sims[0] < 1  # ethanol and ethylamine share their ethyl bits


def test_internal_diversity():
    _check_internal_diversity(metrics.internal_diversity)


def test_fingerprints_of_the_wrong_molecule_fail_the_check(monkeypatch):
    real = rdFingerprintGenerator.GetMorganGenerator

    class FirstMoleculeOnly:  # fingerprints the first molecule it sees, whatever it is given
        def __init__(self, **kw):
            self.gen, self.first = real(**kw), None

        def GetFingerprint(self, mol):
            self.first = self.first or mol
            return self.gen.GetFingerprint(self.first)

    monkeypatch.setattr(metrics.rdFingerprintGenerator, "GetMorganGenerator", FirstMoleculeOnly)
    with pytest.raises(AssertionError):
        _check_internal_diversity(metrics.internal_diversity)


def test_wasserstein_distances_and_aromatic_fraction_by_hand():
    # heavy atoms: ethane and propane {2, 3} against butane and furan {4, 5}: all the mass moves 2
    m = metrics.measures(["CC", "CCC"], reference=["CCCC", "c1ccoc1"])
    assert m["heavy_atoms_w1"] == pytest.approx(2.0)
    # rings: {0, 0} against {0, 1}: half the mass moves by 1 -> 0.5; same for aromatic rings
    assert m["rings_w1"] == pytest.approx(0.5) and m["aromatic_rings_w1"] == pytest.approx(0.5)
    assert m["aromatic_fraction"] == 0.0 and m["fcd_n"] == 2 and math.isfinite(m["fcd"])
    one = metrics.measures(["C"], reference=["C", "CCC"])  # {1} against {1, 3}: half the mass moves 2 -> 1
    assert one["heavy_atoms_w1"] == pytest.approx(1.0) and math.isnan(one["fcd"]) and one["fcd_n"] == 1


def test_chemistry_hook_returns_the_yardsticks():
    ids, smiles = molecules.data("held-out")
    tok = molecules.tokenizer()
    model = SimpleNamespace(world="molecules", texts=tok.decode_batch)
    ev = chemistry_hook(model, ids[:16], [""] * 16)
    for key in ("qed", "sa", "validity", "uniqueness", "novelty", "fcd", "fcd_n", "internal_diversity",
                "aromatic_fraction", *(f"{p}_{s}" for p in metrics.PROPERTY_NAMES for s in ("mean", "w1"))):
        assert key in ev.metrics, key
    assert ev.metrics["fcd_n"] == 16 and ev.metrics["validity"] == 1.0
    assert ev.metrics["aromatic_fraction"] == pytest.approx(np.mean([metrics.properties([s])["aromatic_rings"][0] > 0 for s in smiles[:16]]))
    assert chemistry_hook(SimpleNamespace(world="shapes"), torch.zeros(1, 1), [""]) is None
