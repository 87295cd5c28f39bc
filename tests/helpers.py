"""Small builders shared by several test files: a black-box fine-tuning config, a tiny masked
denoiser on an 8-token vocabulary with its black-box reward, skips for shipped weights, and a
one-parameter linear denoiser with its DDIM gradient and its flow gradient in closed form, and
the check that a pretraining run resumes bit-identically."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rewardiff.finetune.config import FinetuneConfig

V, L, MASK = 8, 6, 1  # vocabulary, sequence length and mask id of the tiny masked model


def tiny_cfg(tiny_model_dir, **kw) -> FinetuneConfig:
    """DRaFT-K (k = 1) on the tiny shapes model and ``brightness``: 4 steps of 2 samples, 3 DDIM
    steps, 4 evaluation samples, a checkpoint every 2 steps; ``kw`` overrides."""
    base = dict(model=str(tiny_model_dir), reward="brightness", method="draft-k", steps=4, batch_size=2, lr=1e-2,
                lora_rank=2, lora_alpha=2.0, k=1, num_inference_steps=3, guidance_scale=1.0, eval_samples=4,
                checkpoint_every=2, seed=3)
    base.update(kw)
    return FinetuneConfig(**base)


def blackbox_cfg(tiny_model_dir, **kw) -> FinetuneConfig:
    """A few-step LoRA run of the tiny shapes model on a black-box reward (DDPO unless told)."""
    base = dict(model=str(tiny_model_dir), reward="jpeg-compressibility", method="ddpo", steps=4, batch_size=2, lr=1e-2,
                lora_rank=2, lora_alpha=2.0, num_inference_steps=3, guidance_scale=2.0, eta=1.0, eval_samples=4, eval_every=0,
                checkpoint_every=2, seed=3, ppo_minibatches=1, vard_warmup=4, vard_warmup_steps=4, vard_value_steps=2)
    base.update(kw)
    return FinetuneConfig(**base)


def tiny_masked(seed: int = 0):
    """An unconditional masked-diffusion DiffusionModel over V tokens of length L, random weights."""
    from rewardiff.models.base import DiffusionModel
    from rewardiff.worlds.molecules.masked import MaskedDenoiser, MaskedModelConfig

    torch.manual_seed(seed)
    cfg = MaskedModelConfig(vocab_size=V, max_len=L, mask_id=MASK, dim=16, layers=1, heads=2, ff_mult=2, dropout=0.0)
    net = MaskedDenoiser(cfg).eval()
    return DiffusionModel(net, net.process(), net.encode, (L,), name="tiny-masked", output_range=None, conditional=False)


def count_twos():
    """Black-box reward: the number of tokens equal to 2 (ids, or the argmax of probabilities)."""
    from rewardiff.rewards.base import RewardFn

    return RewardFn("twos", False, None, "count of token 2", lambda x, p: (x.argmax(-1) if x.dim() == 3 else x).eq(2).float().sum(1))


def needs_shipped_molecules() -> None:
    """Skip the calling test when the shipped masked molecules weights are absent."""
    from rewardiff.worlds.molecules.masked import WEIGHTS

    if not (WEIGHTS / "model.safetensors").is_file():
        pytest.skip("no shipped molecules weights")


def needs_shipped_molecules_ar() -> None:
    """Skip the calling test when the shipped autoregressive molecules weights are absent."""
    from rewardiff.worlds.molecules.autoregressive import WEIGHTS

    if not (WEIGHTS / "model.safetensors").is_file():
        pytest.skip("no shipped molecules-ar weights")


def assert_trains_and_resumes_bit_identically(tiny_model_dir, tmp_path, method: str) -> None:
    """A black-box reward (JPEG size) trains the LoRA with ``method``; a run stopped at step 2
    and resumed (with DDPO's reward statistics / VARD's value model from the checkpoint) ends
    with the same weights as the uninterrupted one."""
    import json

    from safetensors.torch import load_file

    from rewardiff.finetune.trainer import finetune

    finetune(blackbox_cfg(tiny_model_dir, method=method, kl_weight=0.1), tmp_path / "a", progress=False)
    finetune(blackbox_cfg(tiny_model_dir, method=method, kl_weight=0.1, steps=2), tmp_path / "b", progress=False)
    finetune(blackbox_cfg(tiny_model_dir, method=method, kl_weight=0.1), tmp_path / "b", resume=True, progress=False)
    a = load_file(str(tmp_path / "a" / "final" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)  # it trained
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["reward_queries"] >= 2 for r in rows) and rows[0]["updates"] == 1
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["before"]["eval_kl_to_base"] == 0.0  # LoRA starts at the base model
    assert summary["after"]["eval_kl_to_base"] > 0.0


def assert_pretraining_resumes_bit_identically(pretrain, cfg, tmp_path) -> None:
    """``pretrain(cfg(steps), out, progress=False)`` run 4 steps straight, and 2 then resumed to 4
    in another folder: the checkpoints' weights and EMA are equal, and the resumed log has each
    step once."""
    import json

    from safetensors.torch import load_file

    pretrain(cfg(4), tmp_path / "a", progress=False)
    pretrain(cfg(2), tmp_path / "b", progress=False)
    pretrain(cfg(4), tmp_path / "b", progress=False)
    for name in ("model", "ema"):
        a = load_file(str(tmp_path / "a" / "checkpoint" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "b" / "checkpoint" / f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


class ScaleDenoiser(nn.Module):
    """A 'sample'-predicting denoiser out = w * x_t: x0_hat is linear in x_t with one parameter."""

    def __init__(self, w: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))

    def forward(self, x, t, cond):
        return self.w * x


def linear_ddim_gradient(process, ts: list[int], w: float, x_T: torch.Tensor, c: torch.Tensor, k: int):
    """Deterministic DDIM (eta = 0) with ``ScaleDenoiser(w)`` on a 'sample'-predicting process,
    by hand: each step maps x_t to (p + q w) x_t with

        p = sqrt(1 - ap) / sqrt(1 - a),   q = sqrt(ap) - sqrt(1 - ap) sqrt(a) / sqrt(1 - a)

    (a, ap: abar before and after the step), so x_0 = C(w) x_T with C the product of the
    factors. For L = mean_b ||x_0 - c||^2 with gradient through the last ``k`` steps only,
    dL/dw = mean_b 2 (x_0 - c) . x_T * sum_{j >= T - k} q_j prod_{i != j} (p_i + q_i w).
    Returns (x_0, dL/dw) in float64."""
    pq = []
    for t, tp in zip(ts, ts[1:] + [-1]):
        a, ap = float(process.alpha_bar(t)), float(process.alpha_bar(tp))
        pq.append((math.sqrt(1 - ap) / math.sqrt(1 - a), math.sqrt(ap) - math.sqrt(1 - ap) * math.sqrt(a) / math.sqrt(1 - a)))
    factors = [p + q * w for p, q in pq]
    T = len(ts)
    dC = sum(pq[j][1] * math.prod(f for i, f in enumerate(factors) if i != j) for j in range(T - k, T))
    x_T = x_T.double()
    x0 = math.prod(factors) * x_T
    grad = (2 * ((x0 - c.double()) * x_T).flatten(1).sum(1) * dC).mean()
    return x0, float(grad)


def linear_flow_factors(ts: list[float], eta: float = 0.0, sde: str = "flow-grpo", n_train: int = 1000) -> list[tuple[float, float, float]]:
    """(p, q, b) of each step of a flow chain with the velocity ``ScaleDenoiser(w)``, out = w x_t,
    written out from the equations (s, s' = t / N at both ends, N = ``n_train``, dt = s' - s): each step maps
    x_t to (p + q w) x_t + b z with z the step's standard normal draw:

        ODE (eta = 0)  p = 1, q = dt, b = 0
        SDE            std_t = eta sqrt(s / (1 - s)) (s = 1 read as s' in the denominator):
                       p = 1 + std_t^2 dt / (2 s), q = (1 + std_t^2 (1 - s) / (2 s)) dt, b = std_t sqrt(-dt)
        CPS            b = s' sin(eta pi / 2), k = sqrt(s'^2 - b^2): from x0_hat = (1 - s w) x_t and
                       eps_hat = (1 + (1 - s) w) x_t, p = 1 - s' + k, q = k (1 - s) - (1 - s') s
    """
    out = []
    for t, tp in zip(ts, list(ts[1:]) + [0.0]):
        s, sp = t / n_train, tp / n_train
        dt = sp - s
        if eta == 0:
            out.append((1.0, dt, 0.0))
        elif sde == "flow-grpo":
            k = eta**2 * s / (1 - (sp if s == 1 else s))
            out.append((1 + k * dt / (2 * s), (1 + k * (1 - s) / (2 * s)) * dt, math.sqrt(-k * dt)))
        else:
            b = sp * math.sin(eta * math.pi / 2)
            k = math.sqrt(max(sp * sp - b * b, 0.0))
            out.append((1 - sp + k, k * (1 - s) - (1 - sp) * s, b))
    return out


def linear_flow_gradient(ts: list[float], w: float, x_T: torch.Tensor, c: torch.Tensor, k: int,
                         eta: float = 0.0, sde: str = "flow-grpo", noises: list[torch.Tensor] | None = None):
    """The flow analogue of :func:`linear_ddim_gradient`: ``ScaleDenoiser(w)`` as the velocity,
    steps x_{j+1} = f_j x_j + b_j z_j with f_j = p_j + q_j w (:func:`linear_flow_factors`), and
    ``noises`` z_j [B, ...] the rollout's draws (None for the ODE). With gradient through the
    last ``k`` steps only, dx_0/dw = sum_{j >= T - k} q_j x_j prod_{i > j} f_i (x_j the states
    visited, constants for the earlier steps), so for L = mean_b ||x_0 - c||^2,
    dL/dw = mean_b 2 (x_0 - c) . dx_0/dw. Returns (x_0, dL/dw) in float64."""
    pqb = linear_flow_factors(ts, eta, sde)
    T = len(ts)
    f = [p + q * w for p, q, _ in pqb]
    x, dx = x_T.double(), torch.zeros_like(x_T, dtype=torch.float64)
    for j, (_, q, b) in enumerate(pqb):
        dx = f[j] * dx + (q * x if j >= T - k else 0.0)  # d x_{j+1} / dw through the window
        x = f[j] * x + (b * noises[j].double() if noises is not None else 0.0)
    grad = (2 * ((x - c.double()) * dx).flatten(1).sum(1)).mean()
    return x, float(grad)


class AffineDenoiser(nn.Module):
    """'sample' prediction x0_hat = x_t / 2 + b: the bias b [2] moves every sample alike."""

    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(2))

    def forward(self, x, t, cond):
        return x * 0.5 + self.b
