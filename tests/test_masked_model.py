"""The masked-diffusion denoiser as a model: the full sampling loop on token ids, seeds, and the
shipped molecules model's samples."""

from __future__ import annotations

import torch

from tests.helpers import MASK, needs_shipped_molecules, tiny_masked


def test_pinned_full_loop_with_a_tiny_denoiser():
    m = tiny_masked(0)
    with torch.no_grad():
        traj = m.sample([""] * 3, [0, 1, 2], 4, keep_states=True)
    assert bool((traj.xs[0] == MASK).all()) and not bool((traj.x0 == MASK).any())
    assert traj.log_probs.shape == (3, 4) and traj.nfe == 3 * 4
    assert traj.x0.tolist() == PINNED, traj.x0.tolist()


PINNED = [[0, 4, 4, 4, 2, 0], [6, 4, 5, 5, 7, 7], [2, 0, 4, 0, 4, 3]]


def test_a_seed_names_the_same_sample_in_any_batch_and_eta_is_ignored():
    m = tiny_masked(1)
    both = m.generate([""] * 3, [5, 6, 7], num_inference_steps=5)
    alone = m.generate([""], [6], num_inference_steps=5, eta=1.0)
    assert torch.equal(both[1:2], alone)


def test_shipped_molecules_model_samples_valid_smiles():
    from rewardiff.worlds.molecules.masked import molecules_model
    from rewardiff.worlds.molecules import data as molecules

    needs_shipped_molecules()
    m = molecules_model()
    ids = m.generate([""] * 32, list(range(32)), num_inference_steps=16)
    smiles = m.texts(ids)
    assert molecules.validity(smiles) == 1.0, smiles
    assert molecules.uniqueness(smiles) > 0.9
