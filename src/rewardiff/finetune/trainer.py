"""The one training loop: accelerate, LoRA, AdamW, clipping, checkpoints, metrics, report.

Every random draw of step ``s`` (prompts, seeds, truncation points, re-noising) comes from
a generator seeded by (seed, s), and checkpoints hold the trainable weights and the
optimizer state, so a run resumed from its last checkpoint continues bit for bit as the
uninterrupted run would have.

Several processes (``accelerate launch --num_processes N``, or ``torchrun``) train data
parallel: step ``s`` draws one global batch of ``N * batch_size`` (prompt, seed) pairs and
rank ``r`` takes the ``r``-th slice of ``batch_size``, so ranks never share a sample and the
effective batch is ``N * batch_size``; gradients are averaged across ranks (DDP), so every
rank holds the same weights. Only the main process writes files (metrics, checkpoints,
evaluations, the report); logged metrics are means over the global batch. Checkpoints are
collective: every rank reaches the save and waits until the main process has written it.

Unconditional models (the molecules models, ``hf:PATH``) take "" for every prompt and no
classifier-free guidance; every evaluation adds what the worlds' judges read
(:func:`~rewardiff.finetune.evaluate.evaluate`: the shapes judge, RDKit for molecules).
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
from rewardiff.finetune.diagnostics import kl_to_base
from rewardiff.finetune.evaluate import evaluate
from rewardiff.finetune.methods import check_method, check_model, make_method, needs_reward_gradient
from rewardiff.finetune.weights import attach_lora, load_trainable, save_weights
from rewardiff.models.registry import base_model
from rewardiff.io import atomic_write, atomic_write_text, truncate_jsonl
from rewardiff.prompts import EVAL_SEED, eval_set, prompt_set
from rewardiff.types import TOKENS, Generator, LossOut


class Run:
    """A fine-tuning run in directory ``out``: everything it writes lives there."""

    def __init__(self, cfg: FinetuneConfig, out: str | Path, progress: bool = True):
        from rewardiff.rewards import get_reward

        check_method(cfg.method)  # fail early, before loading anything heavy
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.reward = get_reward(cfg.reward)
        if needs_reward_gradient(cfg.method) and not self.reward.differentiable:
            raise UserError(f"reward {cfg.reward!r} is not differentiable; method {cfg.method!r} backpropagates through it "
                            "(ddpo and vard need only its values)")
        self.train_prompts = prompt_set(cfg.prompts)
        self.eval_prompts, self.eval_seeds = eval_set(prompt_set(cfg.eval_prompts), cfg.eval_samples)
        torch.manual_seed(cfg.seed)
        self.model: Generator = base_model(cfg.model)
        check_model(cfg.method, self.model)
        if not self.model.conditional:  # e.g. molecules: every prompt is ""
            self.train_prompts = [""]
            self.eval_prompts, self.eval_seeds = eval_set([""], cfg.eval_samples)
        attach_lora(self.model, cfg.lora_rank, cfg.lora_alpha)
        self._setup_accelerate()
        self.method = make_method(cfg, self.model, self.acc)

    def _setup_accelerate(self) -> None:
        from accelerate import Accelerator

        from accelerate.state import AcceleratorState

        cfg = self.cfg
        # accelerate keeps one state per Python process and refuses a second Accelerator with
        # other settings (a bf16 run after an fp32 one); each Run starts from its own settings.
        # The process group (PartialState) is kept.
        if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_mixed_precision") != cfg.mixed_precision:
            AcceleratorState._reset_state(reset_partial_state=False)
        trackers = _check_tracker(cfg.tracker)
        self.acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision,
                               log_with=trackers, project_dir=str(self.out / "trackers") if trackers else None)
        params = [p for p in self.model.net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.model.net, self.opt = self.acc.prepare(self.model.net, opt)

    # ------------------------------------------------------------------ checkpoints

    def _ckpt_dir(self, step: int) -> Path:
        return self.out / "checkpoints" / f"step-{step:06d}"

    def save_checkpoint(self, step: int) -> None:
        """Weights, optimizer and step; ``latest`` is switched only once all are on disk.

        Collective: every rank calls it; the main process writes, the others wait at a
        barrier until the checkpoint is complete (weights and optimizer state are the same
        on every rank, so one copy is enough).
        """
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            d = self._ckpt_dir(step)
            save_weights(d, self.acc.unwrap_model(self.model.net), self.cfg)
            atomic_write(d / "optimizer.pt", lambda p: torch.save(self.opt.state_dict(), p))
            if hasattr(self.method, "save"):
                self.method.save(d)
            atomic_write_text(d / "state.json", json.dumps({"step": step}))
            atomic_write_text(self.out / "checkpoints" / "latest", d.name)
            for old in sorted((self.out / "checkpoints").glob("step-*"))[:-2]:
                _rmtree(old)
        self.acc.wait_for_everyone()

    def resume(self) -> int:
        """Load the last checkpoint; returns its step (0 when there is none). Collective."""
        self.acc.wait_for_everyone()
        latest = self.out / "checkpoints" / "latest"
        if not latest.is_file():
            return 0
        d = self.out / "checkpoints" / latest.read_text().strip()
        load_trainable(d, self.acc.unwrap_model(self.model.net))
        self.opt.load_state_dict(torch.load(d / "optimizer.pt", weights_only=True))
        if hasattr(self.method, "load"):
            self.method.load(d)
        step = int(json.loads((d / "state.json").read_text())["step"])
        self.acc.wait_for_everyone()  # every rank has read the checkpoint before anything is written
        if self.acc.is_main_process:
            truncate_jsonl(self.out / "metrics.jsonl", step)
        return step

    # ------------------------------------------------------------------ the loop

    def batch(self, step: int) -> tuple[list[str], list[int], torch.Generator]:
        """Prompts, seeds and the random source of step ``step`` on this process: a function of
        (seed, step, process index, number of processes) only.

        One global batch of ``num_processes * batch_size`` pairs is drawn and this process takes
        its slice, so processes never share a sample. With one process this is the whole batch
        and the generator goes on as before; with several, each process continues with a
        generator of its own (truncation points, re-noising), seeded from the step's generator.
        """
        cfg = self.cfg
        n, rank = self.acc.num_processes, self.acc.process_index
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, len(self.train_prompts), (n * cfg.batch_size,), generator=gen)
        seeds = torch.randint(0, EVAL_SEED, (n * cfg.batch_size,), generator=gen)
        if n > 1:
            rank_seeds = torch.randint(0, 2**62, (n,), generator=gen)
            gen = torch.Generator().manual_seed(int(rank_seeds[rank]))
        mine = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
        return [self.train_prompts[i] for i in idx[mine]], seeds[mine].tolist(), gen

    def train_step(self, step: int) -> dict:
        """One step of the method: one loss, or several with an optimizer step after each
        whose ``step`` flag is set (the gradients of the others accumulate into it)."""
        cfg = self.cfg
        prompts, seeds, gen = self.batch(step)
        t0 = time.perf_counter()
        self.model.net.train()
        res = self.method(self.model, self.reward, prompts, seeds, cfg, gen)
        outs: list[LossOut] = []
        norms = []
        for out in [res] if isinstance(res, LossOut) else res:
            self._check_finite(out, step)
            if out.step or self.acc.num_processes == 1:
                self.acc.backward(out.loss)
            else:
                with self.acc.no_sync(self.model.net):  # gradients are averaged once, at the optimizer step
                    self.acc.backward(out.loss)
            if out.step:
                norm = self.acc.clip_grad_norm_(self.model.net.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else torch.tensor(0.0)
                norms.append(float(norm))
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
            outs.append(out.__class__(*(v.detach() if isinstance(v, torch.Tensor) else v for v in out)))
        return self._row(step, outs, norms, time.perf_counter() - t0)

    def _check_finite(self, out: LossOut, step: int) -> None:
        bad = torch.tensor([float(not torch.isfinite(out.loss) or not torch.isfinite(out.reward).all())], device=self.acc.device)
        if self.acc.num_processes > 1:  # every process stops together, none is left waiting in backward
            bad = self.acc.reduce(bad, "sum")
        if bool(bad.item()):
            raise NonFiniteError(f"non-finite loss or reward at step {step + 1}; the last good checkpoint is kept in {self.out / 'checkpoints'}")

    def _row(self, step: int, outs: list[LossOut], norms: list[float], seconds: float) -> dict:
        """The step's metrics over the global batch (every process holds the same numbers)."""
        stepped = [o for o in outs if o.step] or outs
        loss = torch.stack([o.loss.float() for o in outs]).sum() / max(1, len(stepped))
        reward = torch.cat([o.reward.float().reshape(-1) for o in stepped])
        kl = torch.cat([o.kl.float().reshape(-1) for o in stepped])
        counts = torch.tensor([sum(o.nfe for o in outs), sum(len(o.reward) if o.queries is None else o.queries for o in outs)],
                              device=self.acc.device)
        extra = {k: sum(o.extra[k] for o in outs if o.extra) / sum(1 for o in outs if o.extra) for k in (outs[0].extra or {})}
        if self.acc.num_processes > 1:
            loss = self.acc.gather(loss.reshape(1).to(self.acc.device)).mean()
            reward, kl = self.acc.gather(reward.to(self.acc.device)), self.acc.gather(kl.to(self.acc.device))
            counts = self.acc.reduce(counts, "sum")
            extra = {k: float(self.acc.gather(torch.tensor([v], device=self.acc.device)).mean()) for k, v in extra.items()}
        return {"step": step + 1, "loss": float(loss), "reward_mean": float(reward.mean()),
                "reward_std": float(reward.std()) if len(reward) > 1 else 0.0, "kl": float(kl.mean()),
                "grad_norm": sum(norms) / max(1, len(norms)), "grad_from": outs[-1].grad_from, "nfe": int(counts[0]),
                "reward_queries": int(counts[1]), "updates": len(norms), **extra, "seconds": seconds}

    def evaluate(self, tag: str) -> dict:
        """The fixed evaluation set. Every process computes it (the same numbers: the weights
        and the set are the same) on the unwrapped net; only the main process writes the grid
        (and, for text outputs, the samples)."""
        cfg, main = self.cfg, self.acc.is_main_process
        wrapped = self.model.net
        self.model.net = self.acc.unwrap_model(wrapped)
        try:
            self.model.net.eval()
            scale = cfg.guidance_scale if self.model.conditional else 1.0
            res = evaluate(self.model, self.reward, self.eval_prompts, self.eval_seeds, num_inference_steps=cfg.num_inference_steps,
                           guidance_scale=scale, reward_name=cfg.reward, grid_path=self.out / f"samples_{tag}.png" if main else None,
                           samples_path=self.out / f"samples_{tag}.txt" if main else None)
            res["kl_to_base"] = float(self._kl_to_base().mean())
        finally:
            self.model.net = wrapped
        return {f"eval_{k}": v for k, v in res.items()}

    def _kl_to_base(self) -> torch.Tensor:
        """Per-sample KL of the model's samples to the base model's [N]: of token distributions
        for token models, of the chain's paths otherwise."""
        if TOKENS in self.model.capabilities:
            from rewardiff.finetune.gumbel import kl_to_base_tokens

            return kl_to_base_tokens(self.model, self.eval_seeds, self.cfg)
        return kl_to_base(self.model, self.eval_prompts, self.eval_seeds, self.cfg.num_inference_steps, self.cfg.guidance_scale)

    def train(self, resume: bool = False) -> dict:
        """Run (or continue) training; returns the summary also written to ``summary.json``."""
        cfg = self.cfg
        main = self.acc.is_main_process
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(_yaml(asdict(cfg)))
        start = self.resume() if resume else 0
        if start == 0 and main:
            truncate_jsonl(self.out / "metrics.jsonl", 0)
        if cfg.tracker != "none":
            self.acc.init_trackers(self.out.name or "rewardiff", config={k: v for k, v in asdict(cfg).items() if isinstance(v, (int, float, str, bool))})
        before = self._eval_cached("before")
        self._track({f"before/{k}": v for k, v in before.items()}, start, "samples_before")
        log = (self.out / "metrics.jsonl").open("a") if main else None
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"{cfg.method}", disable=not (self.progress and main))
        for step in bar:
            row = self.train_step(step)
            grid = None
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                row.update(self.evaluate(f"step{step + 1:06d}"))
                grid = f"samples_step{step + 1:06d}"
            self._track({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step + 1, grid)
            if log is not None:
                log.write(json.dumps(row) + "\n")
                log.flush()
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}")
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                self.save_checkpoint(step + 1)
        if log is not None:
            log.close()
        self.save_checkpoint(cfg.steps)
        if main:
            save_weights(self.out / "final", self.acc.unwrap_model(self.model.net), cfg)
        summary = self._finish(before, self.evaluate("after"))
        self._track({f"after/{k}": v for k, v in summary["after"].items()}, cfg.steps, "samples_after")
        if cfg.tracker != "none":
            self.acc.end_training()
        self.acc.wait_for_everyone()  # no process returns before the run's files are complete
        return summary

    def _track(self, values: dict, step: int, grid: str | None) -> None:
        """Send scalars, and the named sample grid when there is one, to the trackers."""
        if self.cfg.tracker == "none" or not self.acc.is_main_process:
            return
        self.acc.log(values, step=step)
        path = self.out / f"{grid}.png" if grid else None
        if path is None or not path.is_file():
            return
        import numpy as np
        from PIL import Image

        image = np.asarray(Image.open(path).convert("RGB"))
        tracker = self.acc.get_tracker(self.cfg.tracker, unwrap=True)
        if self.cfg.tracker == "tensorboard":
            tracker.add_image(grid, image, step, dataformats="HWC")
        else:
            import wandb

            tracker.log({grid: wandb.Image(image)}, step=step)

    def _eval_cached(self, tag: str) -> dict:
        path = self.out / f"eval_{tag}.json"
        cached = path.is_file()
        self.acc.wait_for_everyone()  # every process decided from the same state of the folder
        if cached:
            return json.loads(path.read_text())
        res = self.evaluate(tag)
        if self.acc.is_main_process:
            atomic_write_text(path, json.dumps(res, indent=2))
        return res

    def _finish(self, before: dict, after: dict) -> dict:
        from rewardiff.finetune.run_report import write_run_report

        summary = {"method": self.cfg.method, "reward": self.cfg.reward, "steps": self.cfg.steps, "before": before, "after": after}
        if self.acc.is_main_process:
            (self.out / "eval_after.json").write_text(json.dumps(after, indent=2))
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
            write_run_report(self.out, self.cfg, before, after)
        return summary


def _check_tracker(name: str) -> list[str] | None:
    """The accelerate trackers for ``tracker`` (None for none); UserError when unknown or not installed."""
    import importlib.util

    if name == "none":
        return None
    if name not in ("tensorboard", "wandb"):
        raise UserError(f"unknown tracker {name!r}; valid trackers: none, tensorboard, wandb")
    if importlib.util.find_spec(name) is None:
        raise UserError(f"tracker {name!r} is not installed: pip install {name}")
    return [name]


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
