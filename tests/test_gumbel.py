"""Gumbel-softmax reward fine-tuning (DiffRO) of token generators: the estimator, the samplers,
the KL to the base model, the trainer on token models, and hf:PATH models."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from rewardiff.errors import UserError
from rewardiff.finetune.config import FinetuneConfig
from rewardiff.finetune.gumbel import SoftTokenInputs, gumbel, masked_chain, relaxed_pick, straight_through_gumbel
from rewardiff.finetune.trainer import Run, finetune
from rewardiff.finetune.weights import attach_lora
from rewardiff.models.registry import base_model
from rewardiff.rewards import get_reward

SEEDS = [1, 2, 3, 4]


def _cfg(model: str, **kw) -> FinetuneConfig:
    base = dict(model=model, reward="chem-rm-qed", method="gumbel", steps=4, batch_size=4, lr=1e-2, lora_rank=4, lora_alpha=4.0,
                kl_weight=0.1, eval_samples=8, eval_every=0, checkpoint_every=2, num_inference_steps=8, k=2, seed=3)
    base.update(kw)
    return FinetuneConfig(**base)


# ----------------------------------------------------------------------------- the estimator


def test_straight_through_forward_is_one_hot_and_backward_is_the_relaxation():
    """Forward: exactly one_hot(argmax(l + g)). Backward: the gradient of softmax((l + g) / tau),
    which for a linear read-out w . y is s * (w - s . w) / tau with s the relaxed sample."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=gen).requires_grad_(True)
    g = -torch.log(-torch.log(torch.rand(3, 5, 7, generator=gen)))
    w = torch.randn(3, 5, 7, generator=gen)
    tau = 0.7

    y = straight_through_gumbel(logits, g, tau)
    assert torch.equal(y, F.one_hot((logits + g).argmax(-1), 7).float())  # exact 0/1 values
    (grad_st,) = torch.autograd.grad((w * y).sum(), logits)

    soft = ((logits + g) / tau).softmax(-1)
    (grad_soft,) = torch.autograd.grad((w * soft).sum(), logits)
    torch.testing.assert_close(grad_st, grad_soft, rtol=0, atol=0)
    s = soft.detach()
    torch.testing.assert_close(grad_st, s * (w - (s * w).sum(-1, keepdim=True)) / tau)


# ----------------------------------------------------------------------------- samplers


def test_autoregressive_sampler_pad_absorbing_cache_and_seeds(ar_dir):
    model = base_model(str(ar_dir))
    s = model.sample(SEEDS)
    ids = s.tokens.argmax(-1)
    assert torch.equal(s.tokens, F.one_hot(ids, model.vocab_size).float())
    assert not (ids == model.bos_id).any()  # <mask> is never drawn
    ended = torch.cumsum((ids == model.pad_id).long(), 1) > 0
    assert (ids[ended] == model.pad_id).all()  # after the first pad, only pads
    # the key/value cache gives the logits of one teacher-forced pass
    torch.testing.assert_close(model.teacher_forced_logits(model.net, s.tokens), s.logits, rtol=1e-4, atol=1e-4)
    # a seed names the same sequence in any batch
    assert torch.equal(model.generate([""], [3]), model.generate([""] * 4, SEEDS)[2:3])
    assert len(model.texts(ids)) == len(SEEDS)


@pytest.mark.parametrize("estimator", ["straight-through", "relaxed"])
def test_relaxed_draws_of_the_rollout_pick_the_hard_draws_tokens(masked_dir, estimator):
    """One loop, three draws: the rollout's relaxed and straight-through chains pick the tokens
    of its hard draw (``model.sample``) with the same seeds; straight-through returns them
    one-hot, relaxed returns relaxations whose argmax they are (rows summing to 1, not one-hot)."""
    model = base_model(str(masked_dir))
    cfg = _cfg(str(masked_dir), gumbel_estimator=estimator)
    with torch.no_grad():
        want = model.sample([""] * 4, SEEDS, cfg.num_inference_steps).x0
    tokens = masked_chain(model, SEEDS, cfg, cfg.k, kl=False).x0  # the last k steps with gradient
    assert torch.equal(tokens.argmax(-1), want)
    one_hot = F.one_hot(want, model.process.vocab_size).float()
    if estimator == "straight-through":
        assert torch.equal(tokens, one_hot)
    else:
        assert torch.allclose(tokens.sum(-1), torch.ones(tokens.shape[:2]), atol=1e-5)
        assert (tokens - one_hot).abs().amax() > 1e-3


def test_soft_token_inputs_give_the_forward_values_of_the_ids(masked_dir):
    """One-hot rows read through the embedding hook give the net's outputs on the ids themselves,
    and the gradient reaches the rows."""
    model = base_model(str(masked_dir))
    V = model.process.vocab_size
    with torch.no_grad():
        ids = model.sample([""] * 4, SEEDS, 8).x0
    ids[:, ::3] = model.process.mask_id  # a partly masked state
    t, cond = torch.full((4,), 400), model.encode([""] * 4)
    rows = F.one_hot(ids, V).float().requires_grad_(True)
    with torch.no_grad():
        plain = model.net(ids, t, cond)
        drawn = SoftTokenInputs(model.net, V, drawn=True)(rows, t, cond)
    soft = SoftTokenInputs(model.net, V)(rows, t, cond)
    torch.testing.assert_close(soft, plain, rtol=1e-5, atol=1e-5)  # with gradient, layers round differently
    assert torch.equal(drawn, plain)
    (grad,) = torch.autograd.grad(soft.square().sum(), rows)
    assert float(grad.abs().sum()) > 0


def test_relaxed_sample_reads_back_the_drawn_tokens(ar_dir):
    """The relaxed estimator's sequence, recomputed independently: the drawn tokens are those of
    the plain sampler with the same seeds, and each row is softmax((l + g) / tau) of the logits
    that a teacher-forced pass over the drawn tokens gives (pad after the end)."""
    model, tau = base_model(str(ar_dir)), 0.5
    with torch.no_grad():
        plain = model.sample(SEEDS)
        s = model.sample(SEEDS, relaxed_pick(tau), drawn_back=True)
        logits = model.teacher_forced_logits(model.net, plain.tokens)
    assert torch.equal(s.tokens.argmax(-1), plain.tokens.argmax(-1)) and torch.equal(s.alive, plain.alive)
    want = ((logits + model.noise(SEEDS)) / tau).softmax(-1)
    alive = s.alive.bool()
    assert torch.allclose(s.tokens[alive], want[alive], atol=1e-5)
    assert (s.tokens[alive] - plain.tokens[alive]).abs().amax() > 1e-3  # relaxed, not one-hot
    assert torch.equal(s.tokens[~alive].argmax(-1), torch.full(((~alive).sum(),), model.pad_id))


def test_unknown_estimator_is_a_user_error(ar_dir):
    with pytest.raises(UserError, match="gumbel_estimator"):
        gumbel(base_model(str(ar_dir)), get_reward("chem-rm-qed"), [""], [1], _cfg(str(ar_dir), gumbel_estimator="exact"),
               torch.Generator())


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("estimator", ["relaxed", "straight-through"])
@pytest.mark.parametrize("kind", ["ar", "gpt2", "masked"])
def test_gradient_reaches_the_generator(kind, estimator, ar_dir, gpt2_dir, masked_dir):
    """Through the reward model and the relaxed tokens into the generator's weights."""
    name = {"ar": str(ar_dir), "gpt2": f"hf:{gpt2_dir}", "masked": str(masked_dir)}[kind]
    rank = 4 if kind == "gpt2" else 0
    model = base_model(name)
    attach_lora(model, rank, 4.0)
    cfg = _cfg(name, lora_rank=rank, kl_weight=0.0, gumbel_estimator=estimator)
    out = gumbel(model, get_reward("chem-rm-qed"), [""] * 4, SEEDS, cfg, torch.Generator())
    out.loss.backward()
    grads = {n: p.grad for n, p in model.net.named_parameters() if p.requires_grad}
    if kind == "gpt2":
        assert grads and all("lora" in n for n in grads)
        assert all(float(g.abs().sum()) > 0 for n, g in grads.items() if "lora_B" in n)
    else:
        assert sum(float(g.abs().sum()) > 0 for g in grads.values() if g is not None) >= len(grads) // 2
        embedding = "tok.weight"
        assert float(grads[embedding].abs().sum()) > 0


# ----------------------------------------------------------------------------- the trainer


def test_ar_finetuning_raises_the_surrogate_reward_and_moves_away_from_the_base(ar_dir, tmp_path):
    """A few full fine-tuning steps on chem-rm-qed: the reward model's QED of the fixed
    evaluation seeds rises, the KL to the base is 0 before and positive after, and the run
    writes the SMILES, the drawings and the report."""
    cfg = _cfg(str(ar_dir), lora_rank=0, lr=1e-2, steps=8, batch_size=8, kl_weight=0.01, checkpoint_every=0, eval_samples=16)
    summary = finetune(cfg, tmp_path, progress=False)
    b, a = summary["before"], summary["after"]
    assert a["eval_reward_mean"] > b["eval_reward_mean"] + 0.02
    assert b["eval_kl_to_base"] == 0.0 and a["eval_kl_to_base"] > 0.0
    assert b["eval_true_reward_mean"] == b["eval_qed"]  # chem-rm-qed stands in for RDKit's QED
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9)) and rows[-1]["kl"] > 0
    for name in ("report.html", "samples_before.txt", "samples_after.txt", "samples_before.png", "samples_after.png"):
        assert (tmp_path / name).is_file(), name
    assert len((tmp_path / "samples_after.txt").read_text().splitlines()) == 16
    assert "validity" in (tmp_path / "report.html").read_text()


def test_gumbel_resume_is_bit_identical_on_gpt2(gpt2_dir, tmp_path):
    from safetensors.torch import load_file

    cfg = _cfg(f"hf:{gpt2_dir}", eval_samples=4)
    finetune(cfg, tmp_path / "a", progress=False)
    finetune(_cfg(f"hf:{gpt2_dir}", eval_samples=4, steps=2), tmp_path / "b", progress=False)
    finetune(cfg, tmp_path / "b", resume=True, progress=False)
    a = load_file(str(tmp_path / "a" / "final" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all("lora" in k for k in a) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)  # it trained
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_masked_kl_is_zero_at_the_base(masked_dir):
    model = base_model(str(masked_dir))
    attach_lora(model, 0, 1.0)
    cfg = _cfg(str(masked_dir), lora_rank=0)
    out = gumbel(model, get_reward("chem-rm-qed"), [""] * 4, SEEDS, cfg, torch.Generator())
    assert out.kl.abs().max() < 1e-5  # the same weights (up to the rounding of layers with gradient)
    assert out.grad_from == cfg.num_inference_steps - cfg.k


def _masked_finetune(masked_dir, sign: float, steps: int = 10) -> tuple[float, float]:
    """Mean chem-rm-qed of 16 fixed samples of the masked fixture before and after ``steps`` gumbel
    steps on ``sign`` * the reward (sign -1: the reward's sign flipped, a broken method)."""
    model = base_model(str(masked_dir))
    attach_lora(model, 0, 1.0)
    reward, V = get_reward("chem-rm-qed"), model.process.vocab_size
    cfg = _cfg(str(masked_dir), lora_rank=0, kl_weight=0.0, batch_size=8, gumbel_estimator="relaxed")
    params = [p for p in model.net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)

    def score() -> float:
        with torch.no_grad():
            x0 = model.sample([""] * 16, list(range(100, 116)), cfg.num_inference_steps).x0
            return float(reward(F.one_hot(x0, V).float(), [""] * 16).mean())

    before = score()
    for step in range(steps):
        seeds = list(range(8 * step, 8 * step + 8))
        out = gumbel(model, lambda x, p: sign * reward(x, p), [""] * 8, seeds, cfg, torch.Generator())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return before, score()


def test_masked_finetuning_raises_the_reward_and_a_flipped_sign_lowers_it(masked_dir):
    """The masked-diffusion counterpart of the autoregressive check above: a few gumbel steps on
    the differentiable chem-rm-qed raise it on fixed evaluation seeds; the same steps with the
    reward's sign flipped lower it (so the rise is the gradient's doing, not chance)."""
    before, up = _masked_finetune(masked_dir, 1.0)
    _, down = _masked_finetune(masked_dir, -1.0)
    assert up > before + 0.05  # measured: 0.17 -> 0.32
    assert down < before - 0.05  # measured: 0.17 -> 0.02


# ----------------------------------------------------------------------------- user mistakes


def test_missing_hf_folder_is_a_one_line_user_error(tmp_path):
    with pytest.raises(UserError, match="no Hugging Face model in") as e:
        base_model(f"hf:{tmp_path / 'missing'}")
    assert "\n" not in str(e.value)
    res = subprocess.run([sys.executable, "-m", "rewardiff", "finetune", "--set", f"model=hf:{tmp_path / 'missing'}", "--set",
                          "method=gumbel", "--set", "reward=chem-rm"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "no Hugging Face model in" in res.stderr


@pytest.mark.parametrize("method", ["ddpo", "vard"])
def test_the_black_box_methods_refuse_token_diffusion_with_one_line(masked_dir, method):
    """DDPO and VARD need Gaussian steps (their log-likelihoods, the SDE): a masked model is told
    to use gumbel instead of failing inside the first step."""
    with pytest.raises(UserError, match="use method 'gumbel'"):
        Run(_cfg(str(masked_dir), method=method, reward="qed", eta=1.0), "unused", progress=False)


def test_methods_and_models_must_fit(ar_dir, tiny_model_dir):
    with pytest.raises(UserError, match="samples tokens"):
        Run(FinetuneConfig(model=str(tiny_model_dir), method="gumbel", reward="brightness"), "unused", progress=False)
    with pytest.raises(UserError, match="use method 'gumbel'"):
        Run(_cfg(str(ar_dir), method="draft-k"), "unused", progress=False)
    with pytest.raises(UserError, match="gumbel_tau"):
        gumbel(base_model(str(ar_dir)), get_reward("chem-rm-qed"), [""], [1], _cfg(str(ar_dir), gumbel_tau=0.0), torch.Generator())
