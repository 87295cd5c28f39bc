"""The one training loop: accelerate, LoRA, AdamW, clipping, checkpoints, metrics, report.

Every random draw of step ``s`` (prompts, seeds, truncation points, re-noising) comes from
a generator seeded by (seed, s), and checkpoints hold the trainable weights and the
optimizer state, so a run resumed from its last checkpoint continues bit for bit as the
uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from rewardiff.errors import NonFiniteError, UserError
from rewardiff.finetune.config import FinetuneConfig
from rewardiff.finetune.draft import get_method
from rewardiff.finetune.evaluate import EVAL_SEED, eval_set, evaluate, prompt_set
from rewardiff.finetune.weights import attach_lora, base_model, load_trainable, save_weights
from rewardiff.io import atomic_write, atomic_write_text, truncate_jsonl
from rewardiff.models.base import DiffusionModel


class Run:
    """A fine-tuning run in directory ``out``: everything it writes lives there."""

    def __init__(self, cfg: FinetuneConfig, out: str | Path, progress: bool = True):
        from rewardiff.rewards import get_reward

        get_method(cfg.method)  # fail early, before loading anything heavy
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.reward = get_reward(cfg.reward)
        if not self.reward.differentiable:
            raise UserError(f"reward {cfg.reward!r} is not differentiable; method {cfg.method!r} backpropagates through it")
        self.train_prompts = prompt_set(cfg.prompts)
        self.eval_prompts, self.eval_seeds = eval_set(prompt_set(cfg.eval_prompts), cfg.eval_samples)
        torch.manual_seed(cfg.seed)
        self.model: DiffusionModel = base_model(cfg.model)
        attach_lora(self.model, cfg.lora_rank, cfg.lora_alpha)
        self._setup_accelerate()

    def _setup_accelerate(self) -> None:
        from accelerate import Accelerator

        cfg = self.cfg
        self.acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision)
        params = [p for p in self.model.net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.model.net, self.opt = self.acc.prepare(self.model.net, opt)

    # ------------------------------------------------------------------ checkpoints

    def _ckpt_dir(self, step: int) -> Path:
        return self.out / "checkpoints" / f"step-{step:06d}"

    def save_checkpoint(self, step: int) -> None:
        """Weights, optimizer and step; ``latest`` is switched only once all are on disk."""
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            d = self._ckpt_dir(step)
            save_weights(d, self.acc.unwrap_model(self.model.net), self.cfg)
            atomic_write(d / "optimizer.pt", lambda p: torch.save(self.opt.state_dict(), p))
            atomic_write_text(d / "state.json", json.dumps({"step": step}))
            atomic_write_text(self.out / "checkpoints" / "latest", d.name)
            for old in sorted((self.out / "checkpoints").glob("step-*"))[:-2]:
                _rmtree(old)
        self.acc.wait_for_everyone()

    def resume(self) -> int:
        """Load the last checkpoint; returns its step (0 when there is none)."""
        latest = self.out / "checkpoints" / "latest"
        if not latest.is_file():
            return 0
        d = self.out / "checkpoints" / latest.read_text().strip()
        load_trainable(d, self.acc.unwrap_model(self.model.net))
        self.opt.load_state_dict(torch.load(d / "optimizer.pt", weights_only=True))
        step = int(json.loads((d / "state.json").read_text())["step"])
        truncate_jsonl(self.out / "metrics.jsonl", step)
        return step

    # ------------------------------------------------------------------ the loop

    def batch(self, step: int) -> tuple[list[str], list[int], torch.Generator]:
        """Prompts, seeds and the random source of step ``step``: a function of (seed, step) only."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, len(self.train_prompts), (cfg.batch_size,), generator=gen)
        seeds = torch.randint(0, EVAL_SEED, (cfg.batch_size,), generator=gen)
        return [self.train_prompts[i] for i in idx], seeds.tolist(), gen

    def train_step(self, step: int) -> dict:
        cfg = self.cfg
        prompts, seeds, gen = self.batch(step)
        t0 = time.perf_counter()
        self.model.net.train()
        out = get_method(cfg.method)(self.model, self.reward, prompts, seeds, cfg, gen)
        if not torch.isfinite(out.loss) or not torch.isfinite(out.reward).all():
            raise NonFiniteError(f"non-finite loss or reward at step {step + 1}; the last good checkpoint is kept in {self.out / 'checkpoints'}")
        self.acc.backward(out.loss)
        norm = self.acc.clip_grad_norm_(self.model.net.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else torch.tensor(0.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {"step": step + 1, "loss": float(out.loss.detach()), "reward_mean": float(out.reward.mean()),
                "reward_std": float(out.reward.std()) if len(out.reward) > 1 else 0.0, "kl": float(out.kl.mean()),
                "grad_norm": float(norm), "grad_from": out.grad_from, "nfe": out.nfe, "seconds": time.perf_counter() - t0}

    def evaluate(self, tag: str) -> dict:
        self.model.net.eval()
        res = evaluate(self.model, self.reward, self.eval_prompts, self.eval_seeds, num_inference_steps=self.cfg.num_inference_steps,
                       guidance_scale=self.cfg.guidance_scale, grid_path=self.out / f"samples_{tag}.png")
        return {f"eval_{k}": v for k, v in res.items()}

    def train(self, resume: bool = False) -> dict:
        """Run (or continue) training; returns the summary also written to ``summary.json``."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(_yaml(asdict(cfg)))
        start = self.resume() if resume else 0
        if start == 0:
            truncate_jsonl(self.out / "metrics.jsonl", 0)
        before = self._eval_cached("before")
        log = (self.out / "metrics.jsonl").open("a")
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"{cfg.method}", disable=not self.progress)
        for step in bar:
            row = self.train_step(step)
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                row.update(self.evaluate(f"step{step + 1:06d}"))
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}")
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                self.save_checkpoint(step + 1)
        log.close()
        self.save_checkpoint(cfg.steps)
        save_weights(self.out / "final", self.acc.unwrap_model(self.model.net), cfg)
        return self._finish(before, self.evaluate("after"))

    def _eval_cached(self, tag: str) -> dict:
        path = self.out / f"eval_{tag}.json"
        if path.is_file():
            return json.loads(path.read_text())
        res = self.evaluate(tag)
        path.write_text(json.dumps(res, indent=2))
        return res

    def _finish(self, before: dict, after: dict) -> dict:
        from rewardiff.finetune.run_report import write_run_report

        (self.out / "eval_after.json").write_text(json.dumps(after, indent=2))
        summary = {"method": self.cfg.method, "reward": self.cfg.reward, "steps": self.cfg.steps, "before": before, "after": after}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        write_run_report(self.out, self.cfg, before, after)
        return summary


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _yaml(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)


def finetune(cfg: FinetuneConfig, out: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Fine-tune per ``cfg`` into ``out``; see :class:`Run`."""
    if not math.isfinite(cfg.lr) or cfg.lr <= 0:
        raise UserError(f"config field 'lr' must be a positive number, got {cfg.lr}")
    return Run(cfg, out, progress).train(resume=resume)
