"""Pretraining the worlds' base models: a run stopped and resumed ends where the uninterrupted one does."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_pretraining_resumes_bit_identically


def test_shapes_pretraining_resumes_bit_identically(tmp_path):
    from rewardiff.worlds.shapes.pretrain import PretrainConfig, pretrain_shapes

    def cfg(steps: int) -> PretrainConfig:
        return PretrainConfig(steps=steps, batch_size=4, warmup=2, checkpoint_every=2, block_out_channels=(8, 16, 16))

    assert_pretraining_resumes_bit_identically(pretrain_shapes, cfg, tmp_path)


def test_molecules_pretraining_resumes_bit_identically(tmp_path):
    from rewardiff.worlds.molecules.pretrain_masked import MoleculesPretrainConfig, pretrain_molecules

    def cfg(steps):
        return MoleculesPretrainConfig(steps=steps, batch_size=8, warmup=2, checkpoint_every=2, dim=16, layers=1, heads=2)

    a = pretrain_molecules(cfg(4), tmp_path / "a", progress=False)
    pretrain_molecules(cfg(2), tmp_path / "b", progress=False)
    b = pretrain_molecules(cfg(4), tmp_path / "b", progress=False)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_pretraining_config_overrides_are_typed_and_named():
    from rewardiff.errors import UserError
    from rewardiff.pretraining import configure
    from rewardiff.worlds.molecules.pretrain_masked import MoleculesPretrainConfig

    cfg = configure(MoleculesPretrainConfig, None, 3, {"dim": 192, "lr": 1, "schedule": "cosine"})
    assert (cfg.steps, cfg.seed, cfg.dim, cfg.lr, cfg.schedule) == (MoleculesPretrainConfig.steps, 3, 192, 1.0, "cosine")
    assert configure(MoleculesPretrainConfig, 7, 0).steps == 7
    with pytest.raises(UserError, match="unknown pretraining field 'width'; fields: steps, batch_size"):
        configure(MoleculesPretrainConfig, None, 0, {"width": 3})
    with pytest.raises(UserError, match="pretraining field 'dim' must be int, got 'big'"):
        configure(MoleculesPretrainConfig, None, 0, {"dim": "big"})
    with pytest.raises(UserError, match="must be int, got True"):
        configure(MoleculesPretrainConfig, None, 0, {"layers": True})
