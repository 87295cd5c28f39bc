"""The shapes world trained as a rectified flow: its timesteps, its training, its model folder."""

from __future__ import annotations

import math

import pytest
import torch

from rewardiff.processes.flow import FlowProcess
from rewardiff.processes.gaussian import GaussianProcess


def test_flow_training_timesteps_are_logit_normal():
    """sigma = sigmoid(u), u ~ N(0, 1): median 1/2, and P(sigma < sigmoid(1)) = Phi(1)."""
    t = FlowProcess(1000).training_timesteps(40000, torch.Generator().manual_seed(0))
    sigma = t.double() / 1000
    assert t.dtype == torch.float32 and 0 < float(sigma.min()) and float(sigma.max()) < 1
    assert abs(float(sigma.median()) - 0.5) < 0.01
    phi1 = 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    assert abs(float((sigma < 1 / (1 + math.exp(-1))).double().mean()) - phi1) < 0.01


def test_gaussian_training_timesteps_are_the_uniform_draw_of_before():
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    proc = GaussianProcess.from_config()
    assert torch.equal(proc.training_timesteps(16, g1), torch.randint(0, 1000, (16,), generator=g2))


def test_shapes_flow_pretrains_resumes_and_loads_as_a_flow_model(tmp_path):
    from rewardiff.models.registry import base_model
    from rewardiff.worlds.shapes.pretrain import PretrainConfig, pretrain_shapes

    def cfg(steps):
        return PretrainConfig(steps=steps, batch_size=4, warmup=2, checkpoint_every=2, block_out_channels=(8, 8, 16), process="flow")

    a = pretrain_shapes(cfg(4), tmp_path / "a", progress=False)
    pretrain_shapes(cfg(2), tmp_path / "b", progress=False)
    b = pretrain_shapes(cfg(4), tmp_path / "b", progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    a.save(tmp_path / "model")
    model = base_model(str(tmp_path / "model"))
    assert isinstance(model.process, FlowProcess) and model.name == "shapes-flow"
    images = model.generate(["two red circles", "one blue square"], [0, 1], num_inference_steps=3, guidance_scale=2.0)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_the_flow_objective_is_the_velocity(tmp_path):
    """One training step's loss is the mean squared error to eps - x0 at the drawn sigma."""
    from rewardiff.worlds.shapes import data as shapes
    from rewardiff.worlds.shapes.denoiser import ShapesDenoiser, ShapesModelConfig
    from rewardiff.worlds.shapes.pretrain import PretrainConfig, _train_step

    cfg = PretrainConfig(batch_size=3, process="flow", cond_dropout=0.0, lr=0.0)
    torch.manual_seed(0)
    model = ShapesDenoiser(ShapesModelConfig(block_out_channels=(8, 8, 16), process="flow"))
    proc = model.process()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loss = _train_step(cfg, 0, model, proc, opt)
    gen = torch.Generator().manual_seed(0)
    x0, prompts, _ = shapes.make_batch(3, seed=0)
    torch.rand(3, generator=gen)
    sigma = proc.training_timesteps(3, gen) / 1000
    eps = torch.randn(x0.shape, generator=gen)
    s = sigma.view(-1, 1, 1, 1)
    with torch.no_grad():
        pred = model((1 - s) * x0 + s * eps, sigma * 1000, model.encode(prompts))
    assert abs(loss - float((pred - (eps - x0)).pow(2).mean())) < 1e-5


@pytest.mark.slow
def test_the_shipped_shapes_flow_model_is_a_flow_and_its_card_reproduces():
    """The card's held-out counting accuracy, sampled again (the card's sampler and seeds);
    a tolerance of two images of 96 for floating-point differences between machines."""
    import json

    from rewardiff.models.registry import base_model
    from rewardiff.worlds import WEIGHTS
    from rewardiff.worlds.shapes.card import measure

    model = base_model("shapes-flow")
    assert isinstance(model.process, FlowProcess) and model.name == "shapes-flow"
    card = json.loads((WEIGHTS / "shapes-flow" / "card.json").read_text())
    assert card["training"]["process"] == "flow" and card["steps_done"] == 2000
    assert 0.4 < card["judge_count_held_out"] < 0.9  # imperfect counting: there is something to fix
    from rewardiff.prompts import EVAL_SEED
    from rewardiff.worlds.shapes import data as shapes
    from rewardiff.worlds.shapes.card import CARD_GUIDANCE, CARD_STEPS
    from rewardiff.worlds.shapes.judge import accuracy

    prompts = [p for p in shapes.held_out_prompts() for _ in range(16)]  # as the card measures them
    seeds = [EVAL_SEED + i for i in range(len(prompts))]
    with torch.no_grad():
        images = model.generate(prompts, seeds, num_inference_steps=CARD_STEPS, guidance_scale=CARD_GUIDANCE)
    assert abs(accuracy(images, prompts)["count"] - card["judge_count_held_out"]) <= 2 / 96
