"""Model soups: interpolating two fine-tuned LoRA runs, its refusals and the soup command."""

from __future__ import annotations

import json

import pytest
import torch

from rewardiff.errors import UserError
from rewardiff.finetune.trainer import finetune
from tests.helpers import blackbox_cfg


@pytest.fixture(scope="module")
def two_runs(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("soup")
    for name, reward, seed in (("a", "brightness", 1), ("b", "saturation", 2)):
        finetune(blackbox_cfg(tiny_model_dir, method="draft-k", k=1, reward=reward, seed=seed, steps=2, eval_samples=2,
                              checkpoint_every=0, eta=0.0, lr=5e-2), d / name, progress=False)
    return d


def test_soup_endpoints_are_the_ingredients_and_the_middle_is_the_mean(two_runs, tmp_path):
    from safetensors.torch import load_file

    from rewardiff.finetune.soup import soup_model, write_soup
    from rewardiff.finetune.weights import load_finetuned

    a, b = two_runs / "a", two_runs / "b"
    wa, wb = (load_file(str(x / "final" / "trainable.safetensors")) for x in (a, b))
    for alpha, want in ((0.0, wa), (1.0, wb), (0.5, {k: (wa[k] + wb[k]) / 2 for k in wa})):
        got = load_file(str(write_soup(a, b, alpha, tmp_path / f"s{alpha}") / "trainable.safetensors"))
        exact = alpha in (0.0, 1.0)
        for k in want:
            assert torch.equal(got[k], want[k]) if exact else torch.allclose(got[k], want[k], atol=1e-7), (alpha, k)
    # alpha 0 samples exactly what model A samples
    prompts, seeds = ["two red circles"], [4]
    ref = load_finetuned(a).generate(prompts, seeds, num_inference_steps=3, guidance_scale=2.0)
    soup, _ = soup_model(a, b, 0.0)
    assert torch.equal(soup.generate(prompts, seeds, num_inference_steps=3, guidance_scale=2.0), ref)


def test_soup_refuses_models_that_cannot_be_mixed(two_runs, tiny_model_dir, tmp_path):
    from rewardiff.finetune.soup import write_soup

    finetune(blackbox_cfg(tiny_model_dir, method="draft-k", k=1, reward="brightness", steps=1, lora_rank=4, eval_samples=2,
                          checkpoint_every=0, eta=0.0), tmp_path / "r4", progress=False)
    with pytest.raises(UserError, match="lora_rank"):
        write_soup(two_runs / "a", tmp_path / "r4", 0.5, tmp_path / "out")
    with pytest.raises(UserError, match="alpha"):
        write_soup(two_runs / "a", two_runs / "b", 1.5, tmp_path / "out")


def test_soup_cli_writes_the_curve(two_runs, tmp_path):
    from typer.testing import CliRunner

    from rewardiff.cli import app

    res = CliRunner().invoke(app, ["soup", str(two_runs / "a"), str(two_runs / "b"), "--out", str(tmp_path / "s"),
                                   "--alpha", "0.3", "--curve", "3", "--samples", "4"])
    assert res.exit_code == 0, res.output
    table = json.loads((tmp_path / "s" / "soup_curve.json").read_text())
    assert [r["alpha"] for r in table["rows"]] == [0.0, 0.5, 1.0]
    assert set(table["rewards"]) == {"brightness", "saturation"}
    assert (tmp_path / "s" / "soup_curve.png").is_file() and (tmp_path / "s" / "trainable.safetensors").is_file()
