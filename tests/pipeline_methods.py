"""Every method on a diffusers pipeline, its transformer's calls counted: the checks shared by
the Stable Diffusion 3 and FLUX tests."""

from __future__ import annotations

import json
import math

from rewardiff.finetune.config import FinetuneConfig

PROMPTS = ["a photo of a cat", "a red dog"]
T, N_EVAL, B = 2, 2, 2  # sampler steps, evaluation samples, trajectories a step


def count_rows(monkeypatch, cls) -> dict:
    """Rows through ``cls.forward`` (a transformer class; a CFG call on [uncond; cond] counts 2 a sample)."""
    count = {"rows": 0}
    forward = cls.forward

    def counted(self, *args, **kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        count["rows"] += x.shape[0]
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", counted)
    return count


def pipeline_config(pipe_dir, tmp_path, **kw) -> FinetuneConfig:
    """A small run on the pipeline in ``pipe_dir`` with :data:`PROMPTS` for training and
    evaluation (written to ``tmp_path/prompts.txt``); ``kw`` sets the method and the rest."""
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    prompts = str(tmp_path / "prompts.txt")
    base = dict(model=f"diffusers:{pipe_dir}", reward="brightness", batch_size=B, lora_rank=4, prompts=prompts,
                eval_prompts=prompts, eval_samples=N_EVAL, eval_every=0, checkpoint_every=0)
    return FinetuneConfig(**{**base, **kw})


def finetune_table(C: int) -> dict:
    """method: (config, NFE of one step) with C evaluations a denoiser call."""
    return {  # method: (config, NFE of one step)
        "draft": ({}, C * T * B),  # the chain
        "draft-k": ({"k": 1}, C * T * B),
        "draft-lv": ({"lv_n": 2}, C * T * B + C * 2 * B),  # the chain, then one step for each of lv_n re-noised copies
        "alignprop": ({}, C * T * B),
        "refl": ({}, C * 2 * B),  # the chain up to step s = 1 (refl_start 0.75 of T = 2), then one call to x0_hat
        "ddpo": ({"eta": 1.0, "ppo_minibatches": 1}, C * T * B + C * T * B),  # sampling, then every (stochastic) step again
        "vard": ({"eta": 1.0, "vard_warmup": 2, "vard_warmup_steps": 2, "vard_value_steps": 1},
                 C * T * 2 + C * T * B + C * T * B),  # 2 warm-up trajectories, the batch's chain, then every step again
        "grpo": ({"eta": 0.7, "group_size": 2, "ppo_minibatches": 1}, C * T * B + C * T * B),  # as ddpo, one group of 2
        "nft": ({"group_size": 2, "ppo_minibatches": 1}, C * T * B + 2 * T * B),  # ODE samples, then old and new velocity (no CFG) at T timesteps
    }


GUIDANCE = {
    "best-of-n": (2, {}),
    "gradient": (None, {"scale": 0.5}),
    "svdd-pm": (2, {}),
    "dsearch": (2, {"m": 2, "w": 2}),
    "free2guide": (2, {"window": 1}),
    "smc": (2, {}),
}


def assert_finetune_runs_with_its_nfe(pipe_dir, tmp_path, calls, method: str, C: int, guidance_scale: float) -> None:
    """One step of ``method`` (LoRA, T = 2, no checkpointing, so every transformer call is an
    evaluation): finite rewards, the NFE the method reports in metrics.jsonl is the one of
    :func:`finetune_table`, and the transformer's rows equal it plus the two evaluations' (C T N
    samples, then C T N along the KL path and C T N of the base model: 3 C T N each)."""
    from rewardiff.finetune.trainer import finetune

    options, nfe = finetune_table(C)[method]
    cfg = pipeline_config(pipe_dir, tmp_path, method=method, steps=1, lr=1e-3, num_inference_steps=T, guidance_scale=guidance_scale,
                          checkpointing=False, **{"k": T, **options})
    summary = finetune(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 1 and math.isfinite(steps[0]["reward_mean"]) and math.isfinite(steps[0]["loss"])
    assert math.isfinite(summary["after"]["eval_reward_mean"])
    assert steps[0]["nfe"] == nfe
    assert calls["rows"] == nfe + 2 * 3 * C * T * N_EVAL


def assert_guidance_runs_with_its_cost(pipe_dir, tmp_path, calls, method: str, C: int) -> None:
    """``rewardiff sample`` with ``method`` (its default eta: 1 for the stochastic ones, the
    Flow-GRPO SDE), T = 2, two prompts: a finite mean reward, and the transformer's rows equal
    the NFE it reports and its ``cost(T, C)`` per sample."""
    from rewardiff.guidance import make_method
    from rewardiff.rewards import get_reward
    from rewardiff.sampling import sample_to_dir

    width, options = GUIDANCE[method]
    s = sample_to_dir(tmp_path / "out", f"diffusers:{pipe_dir}", None, PROMPTS, 1, 0, "brightness", T, float(C), None,
                      method=method, width=width, options=options)
    cost = make_method(method, get_reward("brightness"), width=width, **options).cost(T, C)
    assert math.isfinite(s["reward_mean"]) and (tmp_path / "out" / "grid.png").is_file()
    assert calls["rows"] == s["nfe"] == cost * len(PROMPTS)
    assert s["expected_nfe_per_sample"] == cost
