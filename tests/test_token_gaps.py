"""Gaps of the molecules world, closed: LoRA on the masked-diffusion model, eta on the masked
process, ``rewardiff sample`` with autoregressive models, the guidance scale of unconditional
models, Hugging Face LoRA in peft's own layout, and the rollout's ``Process`` protocol."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from rewardiff.cli import app
from rewardiff.errors import UserError
from rewardiff.finetune.config import FinetuneConfig
from rewardiff.finetune.weights import attach_lora
from rewardiff.models.registry import base_model
from rewardiff.worlds.molecules.masked import MaskedDenoiser, MaskedModelConfig
from rewardiff.worlds.molecules import data as molecules

SEEDS = [1, 2, 3, 4]


def _gumbel_cfg(model: str, **kw) -> FinetuneConfig:
    base = dict(model=model, reward="chem-rm-qed", method="gumbel", steps=2, batch_size=4, lr=1e-2, lora_rank=4,
                lora_alpha=8.0, kl_weight=0.1, eval_samples=4, eval_every=0, checkpoint_every=0, num_inference_steps=4, k=4,
                seed=3)
    base.update(kw)
    return FinetuneConfig(**base)


def _inputs(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    tok = molecules.tokenizer()
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, tok.size, (batch, tok.max_len), generator=g)
    x[0, 10:] = tok.mask_id  # a partly masked sequence, as the sampler sees them
    return x, torch.tensor([900, 400, 10][:batch])


def _lora_factors(net: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Layer name -> (A [r, in], B [out, r]) of every peft LoRA layer of ``net``."""
    out = {}
    for name, p in net.named_parameters():
        if name.endswith("lora_A.default.weight"):
            layer = name.removesuffix(".lora_A.default.weight")
            out[layer] = (p.detach(), dict(net.named_parameters())[f"{layer}.lora_B.default.weight"].detach())
    return out


# ----------------------------------------------------------------------------- 1. LoRA on the masked model


def test_masked_lora_acts_in_eval_mode_as_the_merged_weights(masked_dir):
    """LoRA on the masked model: W_eff = W + (alpha / r) B A on the attention's in_proj and the
    feed-forward layers. In eval mode without gradient (where PyTorch's fused fast path used to
    skip the adapters) the adapted net equals a plain copy with merged weights; with lora_B = 0
    it is the base exactly; the reference (adapters off) stays the base."""
    model = base_model(str(masked_dir))
    base = copy.deepcopy(model.net).eval()
    rank, alpha = 4, 8.0
    attach_lora(model, rank, alpha)
    net = model.net.eval()
    x, t = _inputs()
    with torch.no_grad():
        want = base(x, t)
        assert torch.equal(net(x, t), want)  # lora_B starts at 0
        g = torch.Generator().manual_seed(1)
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        got = net(x, t)
        ref = model.reference(x, t)

    factors = _lora_factors(net)
    # the layers adapted: in_proj (through peft's parameter targeting), linear1 and linear2 of every layer
    assert sorted(factors) == sorted(f"encoder.layers.{i}.{n}" for i in range(2) for n in ("self_attn", "linear1", "linear2"))
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for layer, (A, B) in factors.items():
            i, kind = layer.split(".")[2], layer.split(".")[3]
            block = merged.encoder.layers[int(i)]
            w = block.self_attn.in_proj_weight if kind == "self_attn" else getattr(block, kind).weight
            w += (alpha / rank) * B @ A  # [out, in]
        by_hand = merged(x, t)
    assert (got - want).abs().max() > 1e-2  # the adapters act
    torch.testing.assert_close(got, by_hand, rtol=0, atol=1e-5)
    assert torch.equal(ref, want)  # adapters off: the base, to the bit
    with torch.enable_grad():
        net.train()  # dropout is 0: the training path computes the same function
        torch.testing.assert_close(net(x, t).detach(), by_hand, rtol=0, atol=1e-5)
    assert torch.backends.mha.get_fastpath_enabled()  # the global switch is restored after each call


@pytest.mark.parametrize("rank", [0, 4])
def test_masked_kl_to_the_base_is_exactly_zero_before_training(masked_dir, rank):
    """Model and reference compute the same way (per-operation path, sequence-first layout), so
    the KL of the unchanged model to its base is 0 to the bit, with full weights (a frozen copy)
    and with LoRA (the same net, adapters off); and LoRA gets a gradient."""
    from rewardiff.finetune.gumbel import gumbel
    from rewardiff.rewards import get_reward

    model = base_model(str(masked_dir))
    attach_lora(model, rank, 8.0)
    cfg = _gumbel_cfg(str(masked_dir), lora_rank=rank)
    out = gumbel(model, get_reward("chem-rm-qed"), [""] * 4, SEEDS, cfg, torch.Generator())
    assert torch.equal(out.kl, torch.zeros(4))
    out.loss.backward()
    grads = {n: p.grad for n, p in model.net.named_parameters() if p.requires_grad}
    if rank:
        assert grads and all("lora" in n for n in grads)
        assert all(float(g.abs().sum()) > 0 for n, g in grads.items() if "lora_B" in n)


def test_masked_lora_run_reloads_to_the_same_model(masked_dir, tmp_path):
    """Two LoRA steps of ``gumbel`` on the masked model: the adapters move, and the run's weights
    load back (base + adapters from trainable.safetensors) to the trained net's logits."""
    from rewardiff.finetune.trainer import Run
    from rewardiff.finetune.weights import load_finetuned

    run = Run(_gumbel_cfg(str(masked_dir), eval_samples=2), tmp_path, progress=False)
    run.train()
    net = run.acc.unwrap_model(run.model.net).eval()
    assert any(float(p.detach().abs().max()) > 0 for n, p in net.named_parameters() if "lora_B" in n)
    x, t = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(load_finetuned(tmp_path).net(x, t), net(x, t), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- 2. eta on the masked process


def test_check_asks_the_process_whether_eta_draws():
    from rewardiff.guidance import make_method
    from rewardiff.processes.gaussian import GaussianProcess
    from rewardiff.processes.masked import MaskedProcess

    svdd = make_method("svdd-pm", _count_twos())
    svdd.check(0.0, MaskedProcess(8, 1))  # the masked process draws at every step: any eta
    for process in (None, GaussianProcess.from_config()):  # DDIM with eta = 0 draws nothing
        with pytest.raises(UserError, match="needs --eta > 0"):
            svdd.check(0.0, process)
    svdd.check(0.5, GaussianProcess.from_config())


def test_masked_guidance_runs_at_eta_zero_and_eta_changes_nothing():
    """svdd-pm and smc on a masked model with eta = 0: accepted, and the same samples as eta = 1
    (the masked step ignores eta)."""
    from rewardiff.guidance import guided_sample, make_method

    model = _tiny_masked()
    for name in ("svdd-pm", "smc"):
        a, ia = guided_sample(model, make_method(name, _count_twos(), width=2), [""] * 3, [0, 1, 2], 4, guidance_scale=1.0, eta=0.0)
        b, _ = guided_sample(model, make_method(name, _count_twos(), width=2), [""] * 3, [0, 1, 2], 4, guidance_scale=1.0, eta=1.0)
        assert torch.equal(a, b) and ia["eta"] == 0.0, name


def _tiny_masked():
    from rewardiff.models.base import DiffusionModel

    torch.manual_seed(0)
    net = MaskedDenoiser(MaskedModelConfig(vocab_size=8, max_len=6, mask_id=1, dim=16, layers=1, heads=2, ff_mult=2)).eval()
    return DiffusionModel(net, net.process(), net.encode, (6,), name="tiny-masked", output_range=None, conditional=False)


def _count_twos():
    from rewardiff.rewards.base import RewardFn

    return RewardFn("twos", False, None, "count of token 2", lambda x, p: (x.argmax(-1) if x.dim() == 3 else x).eq(2).float().sum(1))


# ----------------------------------------------------------------------------- 3. sample with autoregressive models


def _shipped_ar():
    from rewardiff.worlds.molecules.autoregressive import WEIGHTS

    if not (WEIGHTS / "model.safetensors").is_file():
        pytest.skip("no shipped molecules-ar weights")


def _invoke(*args: str):
    return CliRunner().invoke(app, ["sample", *args])


def test_sample_molecules_ar_best_of_n_keeps_the_best_candidate_by_rdkit_qed(tmp_path):
    """``--model molecules-ar --method best-of-n``: each output is the candidate of highest QED
    (RDKit, computed here) among the N sequences TokenModel.sample draws for its request."""
    from rdkit import Chem
    from rdkit.Chem import QED

    from rewardiff.guidance.sample import particle_seeds
    from rewardiff.worlds.molecules.autoregressive import molecules_ar_model

    _shipped_ar()
    res = _invoke("--model", "molecules-ar", "--method", "best-of-n", "--width", "3", "-n", "4", "--seed", "5", "--reward", "qed",
                  "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    texts = (tmp_path / "samples.txt").read_text().splitlines()
    assert texts == summary["texts"] and len(texts) == 4 and (tmp_path / "grid.png").is_file()
    m = molecules_ar_model()
    assert summary["nfe_per_sample"] == summary["expected_nfe_per_sample"] == 3 * m.max_len  # N sequences of L tokens

    def qed(s: str) -> float:
        mol = Chem.MolFromSmiles(s) if s else None
        return QED.qed(mol) if mol is not None and mol.GetNumAtoms() else 0.0

    for i, got in enumerate(texts):
        cands = m.texts(m.generate([""] * 3, particle_seeds(5 + i, 3)))
        assert got in cands and qed(got) == max(qed(c) for c in cands), (got, cands)
    assert summary["reward_mean"] == pytest.approx(sum(qed(s) for s in texts) / 4, abs=1e-6)


def test_sample_molecules_ar_base_is_token_model_sample(tmp_path):
    """``--method base`` (and best-of-n with N = 1) writes exactly TokenModel.sample's sequences of the seeds."""
    from rewardiff.worlds.molecules.autoregressive import molecules_ar_model

    _shipped_ar()
    m = molecules_ar_model()
    want = m.texts(m.generate([""] * 3, [0, 1, 2]))
    for extra in ([], ["--method", "best-of-n", "--width", "1", "--reward", "qed"]):
        out = tmp_path / str(len(extra))
        res = _invoke("--model", "molecules-ar", "-n", "3", "--out", str(out), *extra)
        assert res.exit_code == 0, res.output
        assert (out / "samples.txt").read_text().splitlines() == want
        assert json.loads((out / "summary.json").read_text())["nfe"] == 3 * m.max_len


def test_sample_hf_model_best_of_n_within_an_nfe_budget(gpt2_dir, tmp_path):
    """``--model hf:DIR``: a budget of 2 L + 10 NFE a sample buys N = 2 sequences of L tokens."""
    L = molecules.tokenizer().max_len
    res = _invoke("--model", f"hf:{gpt2_dir}", "--method", "best-of-n", "--nfe-budget", str(2 * L + 10), "-n", "3", "--reward", "qed",
                  "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len((tmp_path / "samples.txt").read_text().splitlines()) == 3 and (tmp_path / "grid.png").is_file()
    assert summary["method"] == "best-of-n" and summary["options"] == {"n": 2} and summary["reward_calls_per_sample"] == 2
    assert summary["nfe"] == 3 * 2 * L and summary["nfe_budget"] == 2 * L + 10


@pytest.mark.parametrize("model", ["molecules-ar", "hf"])
def test_sample_autoregressive_refuses_diffusion_methods_in_one_line(model, gpt2_dir, tmp_path):
    if model == "molecules-ar":
        _shipped_ar()
    name = model if model == "molecules-ar" else f"hf:{gpt2_dir}"
    res = _invoke("--model", name, "--method", "svdd-pm", "--reward", "qed", "--eta", "0", "--out", str(tmp_path))
    assert isinstance(res.exception, UserError)
    msg = str(res.exception)
    assert "\n" not in msg and "svdd-pm" in msg and "base or best-of-n" in msg


# ----------------------------------------------------------------------------- 4. guidance scale of unconditional models


@pytest.mark.parametrize("model", ["molecules", "molecules-ar"])
def test_explicit_guidance_scale_on_an_unconditional_model_is_a_user_error(model, tmp_path):
    from rewardiff.worlds.molecules.masked import WEIGHTS

    if model == "molecules" and not (WEIGHTS / "model.safetensors").is_file():
        pytest.skip("no shipped molecules weights")
    if model == "molecules-ar":
        _shipped_ar()
    res = _invoke("--model", model, "--guidance-scale", "3", "-n", "1", "--out", str(tmp_path / "a"))
    assert isinstance(res.exception, UserError)
    assert "\n" not in str(res.exception) and "--guidance-scale 3" in str(res.exception) and "unconditional" in str(res.exception)
    assert not (tmp_path / "a").exists()
    res = _invoke("--model", model, "--guidance-scale", "1", "-n", "1", "--steps", "4", "--out", str(tmp_path / "b"))
    assert res.exit_code == 0, res.output  # 1 is no guidance: accepted
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["guidance_scale"] == 1.0


def test_default_guidance_scale_is_two_for_conditional_models_and_one_otherwise():
    from rewardiff.sampling import resolve_guidance_scale

    class M:
        name, conditional = "m", True

    assert resolve_guidance_scale(M(), None) == 2.0 and resolve_guidance_scale(M(), 3.5) == 3.5
    M.conditional = False
    assert resolve_guidance_scale(M(), None) == 1.0 and resolve_guidance_scale(M(), 1.0) == 1.0
    with pytest.raises(UserError, match="--guidance-scale 2 does not apply"):
        resolve_guidance_scale(M(), 2.0)


# ----------------------------------------------------------------------------- 5. HF LoRA in peft's layout


def test_hf_lora_checkpoint_reloads_with_plain_peft_and_transformers(gpt2_dir, tmp_path):
    """Two ``gumbel`` LoRA steps on a tiny GPT-2; ``final/`` holds adapter_config.json and
    adapter_model.safetensors, which PeftModel.from_pretrained puts on a freshly loaded base:
    its logits are our trained model's (1e-5) and not the base's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rewardiff.finetune.trainer import Run

    run = Run(_gumbel_cfg(f"hf:{gpt2_dir}", lr=5e-2), tmp_path, progress=False)
    run.train()
    final = tmp_path / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0

    ids = torch.randint(0, molecules.tokenizer().size, (2, 20), generator=torch.Generator().manual_seed(0))
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(gpt2_dir)), str(final)).eval()
    base = AutoModelForCausalLM.from_pretrained(str(gpt2_dir)).eval()
    ours = run.acc.unwrap_model(run.model.net).eval()
    with torch.no_grad():
        want = ours.lm(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - plain).abs().max() > 1e-4  # the adapter is there and trained


# ----------------------------------------------------------------------------- 6. the Process protocol


class _OnlyProtocol:
    """A process that exposes exactly the members of ``rewardiff.types.Process`` (and counts calls)."""

    def __init__(self, process):
        from rewardiff.types import Process

        self._process, self.calls = process, set()
        for name in [n for n in vars(Process) if not n.startswith("_")]:
            setattr(self, name, self._wrap(name))

    def _wrap(self, name):
        def call(*args, **kwargs):
            self.calls.add(name)
            return getattr(self._process, name)(*args, **kwargs)

        return call


def test_the_rollout_needs_only_the_process_protocol():
    """Both processes fit ``Process``; the rollout (with a selecting hook, which re-scores the
    kept particles through ``log_prob``) runs on a stand-in that has nothing else, and gives
    the real process's samples."""
    from rewardiff.guidance import make_method
    from rewardiff.processes.gaussian import GaussianProcess
    from rewardiff.processes.masked import MaskedProcess
    from rewardiff.rollout import rollout
    from rewardiff.types import Process

    assert isinstance(GaussianProcess.from_config(), Process) and isinstance(MaskedProcess(8, 1), Process)
    model = _tiny_masked()
    seeds = [0, 1, 2, 3]
    x_T, cond, ts = model.noise(seeds), model.encode([""] * 4), model.process.timesteps(4)

    def run(process):
        hook = make_method("svdd-pm", _count_twos(), width=3)  # M = 3 candidates a step, then a Selection
        hook.begin(4, model, 1.0)
        with torch.no_grad():
            return rollout(model.net, process, x_T, cond, ts, eta=1.0, hook=hook, generator=model.step_generators(seeds))

    stand_in = _OnlyProtocol(model.process)
    a, b = run(model.process), run(stand_in)
    assert torch.equal(a.x0, b.x0) and torch.equal(a.log_probs, b.log_probs)
    assert stand_in.calls == {"is_stochastic", "noise_like", "step", "split", "log_prob"}
