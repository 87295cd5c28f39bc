"""Shared fixtures, small enough for CPU tests: a tiny shapes denoiser, a tiny random GPT-2 and a
tiny masked molecules denoiser and a tiny autoregressive molecules model saved to disk, and a
value-net scrambler."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # several test processes share the machine's cores: split them, or torch's threads spin
    # against each other (far slower than one thread each)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

from rewardiff.worlds.shapes.denoiser import ShapesDenoiser, ShapesModelConfig

TINY = ShapesModelConfig(block_out_channels=(8, 16, 16), cross_attention_dim=16, attention_head_dim=4)


def tiny_net(seed: int = 0) -> ShapesDenoiser:
    torch.manual_seed(seed)
    net = ShapesDenoiser(TINY)
    # random, non-trivial output layer (diffusers zero-initialises nothing here, but be explicit)
    return net.eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-shapes")
    tiny_net().save(d)
    return d


@pytest.fixture(scope="session")
def flow_dir(tmp_path_factory):
    """A tiny random shapes-flow model (the shapes denoiser predicting the velocity), saved."""
    from dataclasses import replace

    d = tmp_path_factory.mktemp("tiny-shapes-flow")
    torch.manual_seed(0)
    ShapesDenoiser(replace(TINY, process="flow")).save(d)
    return d


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # tiny models: one thread avoids spin-waiting when cores are shared


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny random GPT-2 over the molecules vocabulary, saved with save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from rewardiff.worlds.molecules import data as molecules

    tok = molecules.tokenizer()
    d = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=tok.size, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=tok.mask_id,
                        eos_token_id=tok.pad_id)
    GPT2LMHeadModel(config).save_pretrained(d)
    return d


def _scramble(net, seed: int = 0):
    """A value network (ValueNet or TokenValueNet) with random values in every tensor, the
    zero-initialized head included, so that an untrained net is a fair baseline."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
        net.target_mean.fill_(0.3)
        net.target_std.fill_(2.0)
        if getattr(net, "image", False):
            net.stat_mean.copy_(torch.randn(net.stat_mean.shape, generator=g))
            net.stat_std.copy_(torch.rand(net.stat_std.shape, generator=g) + 0.5)
    return net.eval()


@pytest.fixture
def scrambled_value():
    """``scrambled_value(net, seed=0)``: the net with random values in every tensor (see _scramble)."""
    return _scramble


@pytest.fixture(scope="module")
def masked_dir(tmp_path_factory):
    """A tiny random masked-diffusion molecules denoiser on disk (two layers, so that LoRA has
    layers to compose)."""
    from rewardiff.worlds.molecules.masked import MaskedDenoiser, MaskedModelConfig
    from rewardiff.worlds.molecules import data as molecules

    tok = molecules.tokenizer()
    d = tmp_path_factory.mktemp("tiny-masked")
    torch.manual_seed(0)
    MaskedDenoiser(MaskedModelConfig(tok.size, tok.max_len, tok.mask_id, dim=32, layers=2, heads=2)).save(d)
    return d


@pytest.fixture(scope="module")
def ar_dir(tmp_path_factory):
    """A tiny random autoregressive molecules model on disk."""
    from rewardiff.worlds.molecules import data as molecules
    from rewardiff.worlds.molecules.autoregressive import ARModelConfig, ARTransformer

    tok = molecules.tokenizer()
    d = tmp_path_factory.mktemp("tiny-ar")
    torch.manual_seed(0)
    ARTransformer(ARModelConfig(tok.size, tok.max_len, tok.mask_id, dim=32, layers=1, heads=2, dropout=0.1)).save(d)
    return d
