"""The one training loop: accelerate, LoRA, AdamW, clipping, checkpoints, metrics, report.

Every random draw of step ``s`` (prompts, seeds, truncation points, re-noising) comes from
a generator seeded by (seed, s), and checkpoints hold the trainable weights and the
optimizer state, so a run resumed from its last checkpoint continues bit for bit as the
uninterrupted run would have. Dropout stays off while a method samples and trains (the
network is in eval mode): a draw of the global generator would break that, and the
likelihood ratios of DDPO, GRPO and NFT would compare two different random sub-networks.

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

import errno
import itertools
import json
import os
import re
import signal
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from rewardiff.errors import NonFiniteError, Stopped, UserError
from rewardiff.finetune.config import FinetuneConfig
from rewardiff.finetune import sharding
from rewardiff.finetune.diagnostics import kl_to_base
from rewardiff.finetune.evaluate import evaluate
from rewardiff.finetune.methods import check_method, check_model, make_method, needs_reward_gradient
from rewardiff.finetune.weights import attach_lora, load_trainable, save_weights
from rewardiff.models.registry import base_model
from rewardiff.io import atomic_write, atomic_write_text, truncate_jsonl
from rewardiff.prompts import EVAL_SEED, eval_set, prompt_set
from rewardiff.report.strict import strict_dumps, write_json
from rewardiff.rewards.guard import GuardedReward, RewardFailure, describe_batch
from rewardiff.types import TOKENS, Generator, LossOut


class Run:
    """A fine-tuning run in directory ``out``: everything it writes lives there."""

    def __init__(self, cfg: FinetuneConfig, out: str | Path, progress: bool = True):
        from rewardiff.rewards import get_reward

        check_method(cfg.method)  # fail early, before loading anything heavy
        if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise UserError("config field 'mixed_precision': fp16 needs a GPU; use bf16 or no on a CPU")
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.reward = GuardedReward(get_reward(cfg.reward), cfg.reward_timeout)
        self.skipped = 0  # batches skipped because the reward failed (reward_errors: skip)
        if needs_reward_gradient(cfg.method) and not self.reward.differentiable:
            raise UserError(f"reward {cfg.reward!r} is not differentiable; method {cfg.method!r} backpropagates through it "
                            "(ddpo, vard, grpo and nft need only its values)")
        self.train_prompts = prompt_set(cfg.prompts)
        self.eval_prompts, self.eval_seeds = eval_set(prompt_set(cfg.eval_prompts), cfg.eval_samples)
        torch.manual_seed(cfg.seed)
        self.model: Generator = base_model(cfg.model)
        check_model(cfg.method, self.model)
        if not self.model.conditional:  # e.g. molecules: every prompt is ""
            self.train_prompts = [""]
            self.eval_prompts, self.eval_seeds = eval_set([""], cfg.eval_samples)
        elif getattr(self.model, "check_prompts", None) is not None:  # a text encoder that knows its own words only
            for field in ("prompts", "eval_prompts"):
                try:
                    self.model.check_prompts(self.train_prompts if field == "prompts" else list(dict.fromkeys(self.eval_prompts)))
                except UserError as e:
                    raise UserError(f"config field {field!r} ({getattr(cfg, field)}): {e}") from None
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
        self.units: list = []  # the FSDP units when the run is sharded (finetune/sharding.py)
        self._gathered: tuple | None = None  # (step, whole trainable tensors) of the last step's checkpoint, sharded runs
        if sharding.requested(cfg) and self.acc.num_processes > 1:
            sharding.check(cfg, self.model)
            self.units = sharding.shard(self.model, self.acc.device, self.acc.num_processes, cfg.mixed_precision)
        elif cfg.fsdp:
            import warnings

            warnings.warn("fsdp: true with one process: nothing to shard, the run trains unsharded "
                          "(launch several: accelerate launch --config_file configs/accelerate/fsdp.yaml ...)", stacklevel=2)
        self.params = [p for p in self.model.net.parameters() if p.requires_grad]  # what the optimizer steps
        opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if self.units:  # sharded by FSDP: not wrapped again by accelerate
            self.opt = opt
        else:
            self.model.net, self.opt = self.acc.prepare(self.model.net, opt)

    def _trainable_names(self) -> list[str]:
        return [n for n, _ in sharding.trainable(self.acc.unwrap_model(self.model.net))]

    # ------------------------------------------------------------------ checkpoints

    def _ckpt_dir(self, step: int) -> Path:
        return self.out / "checkpoints" / f"step-{step:06d}"

    def _agree(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any process (every process gets the same answer). Collective."""
        if self.acc.num_processes == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.acc.device)
        return bool(self.acc.reduce(t, "sum").item() > 0)

    def save_checkpoint(self, step: int) -> None:
        """Weights, optimizer, the method's state and the step, as one folder that appears whole.

        The folder is written under a temporary name and renamed into place, and ``latest``
        is switched only then; a run killed at any moment leaves the previous checkpoint and
        ``latest`` intact. A write that fails (a full disk, a read-only folder) removes its
        partial folder and raises a UserError saying which checkpoint is still whole.

        Collective: every rank calls it; the main process writes, the others wait until it has
        written (weights and optimizer state are the same on every rank, so one copy is enough).
        """
        self.acc.wait_for_everyone()
        error = ""
        gathered = self._gather()
        # the last step's whole tensors serve the final save too; an earlier step's are not held on to
        self._gathered = (step, gathered[0]) if step == self.cfg.steps else None
        if self.acc.is_main_process:
            try:
                self._write_checkpoint(step, *gathered)
            except OSError as e:
                error = (f"cannot write checkpoint step-{step:06d} in {self.out / 'checkpoints'}: {e.strerror or e}; "
                         f"{self._last_checkpoint_text()} (resume with --resume once it can be written)")
        if self._agree(bool(error)):
            raise UserError(error or "the main process could not write the checkpoint (see its message); the last complete one is intact")

    def _gather(self) -> tuple[dict | None, dict | None]:
        """Sharded runs: the trainable tensors and the optimizer state whole, gathered from every
        process (collective; the optimizer state on the main process only), and the method's
        state readied for writing. (None, None) otherwise: they are whole already."""
        if not self.units:
            return None, None
        net = self.acc.unwrap_model(self.model.net)
        state = sharding.full_state(net)
        opt_state = sharding.optimizer_state(net, self.opt)
        if hasattr(self.method, "gather"):
            self.method.gather()
        return state, sharding.indexed(opt_state, self._trainable_names()) if self.acc.is_main_process else None

    def _write_checkpoint(self, step: int, state: dict | None = None, opt_state: dict | None = None) -> None:
        import shutil

        root = self.out / "checkpoints"
        d, tmp = self._ckpt_dir(step), root / f".tmp-step-{step:06d}"
        _rmtree(tmp)
        try:
            save_weights(tmp, self.acc.unwrap_model(self.model.net), self.cfg, state=state)
            atomic_write(tmp / "optimizer.pt", lambda p: torch.save(opt_state if opt_state is not None else self.opt.state_dict(), p))
            if hasattr(self.method, "save"):
                self.method.save(tmp)
            atomic_write_text(tmp / "state.json", json.dumps({"step": step, "reward_skipped": self.skipped}))
            if d.exists():  # an earlier pass wrote this step before being stopped: the same content
                shutil.rmtree(d)
            os.replace(tmp, d)
        finally:
            _rmtree(tmp)
        atomic_write_text(root / "latest", d.name)
        ckpts = _checkpoints(root)
        below = [s for s, _ in ckpts if s < step]
        keep = {step, max(below)} if below else {step}  # this one and the one before it, by step number
        for s, path in ckpts:
            if s not in keep:
                _rmtree(path)

    def _last_checkpoint_text(self) -> str:
        latest = self.out / "checkpoints" / "latest"
        name = latest.read_text().strip() if latest.is_file() else ""
        return f"the last complete checkpoint, {name}, is intact" if name else "no earlier checkpoint was written"

    def resume(self) -> int:
        """Load the last checkpoint; returns its step (0 when there is none). Collective.

        Raises:
            UserError: ``latest`` names a missing folder, or a file of the checkpoint is
                missing or unreadable; the message names it and the other checkpoints.
        """
        self.acc.wait_for_everyone()
        root = self.out / "checkpoints"
        latest = root / "latest"
        if self.acc.is_main_process and root.is_dir():  # what a killed write left: never part of a checkpoint
            for stale in [*root.glob(".tmp-step-*"), *root.glob(".*.tmp"), *self.out.glob(".*.tmp")]:
                _rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
        if not latest.is_file():
            return 0
        d = root / latest.read_text(errors="replace").strip()
        others = ", ".join(p.name for _, p in _checkpoints(root) if p != d) or "none"

        def broken(what: str) -> UserError:
            return UserError(f"cannot resume from {d}: {what}; other checkpoints: {others} "
                             f"(write one's name into {latest} to resume from it, or start afresh in a new --out)")

        if not d.is_dir():
            raise broken("checkpoints/latest names a folder that does not exist")
        try:
            state = json.loads((d / "state.json").read_text())
            step = int(state["step"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise broken(f"state.json is missing or unreadable ({type(e).__name__})") from None
        try:
            load_trainable(d, self.acc.unwrap_model(self.model.net))
        except UserError:
            raise
        except Exception as e:  # a truncated or corrupt safetensors file
            raise broken(f"trainable.safetensors is missing or unreadable ({str(e).splitlines()[0][:80]})") from None
        try:
            opt_state = torch.load(d / "optimizer.pt", weights_only=True)
            if self.units:  # every process its slice of the main process's copy
                net = self.acc.unwrap_model(self.model.net)
                sharding.load_optimizer_state(net, self.opt, sharding.named(opt_state, self._trainable_names())
                                              if self.acc.is_main_process else {})
            else:
                self.opt.load_state_dict(opt_state)
        except Exception as e:
            raise broken(f"optimizer.pt is missing or unreadable ({type(e).__name__})") from None
        if hasattr(self.method, "load"):
            try:
                self.method.load(d)
            except Exception as e:
                raise broken(f"the {self.cfg.method} state is missing or unreadable ({str(e).splitlines()[0][:80]})") from None
        self.skipped = int(state.get("reward_skipped", 0))
        self.acc.wait_for_everyone()  # every rank has read the checkpoint before anything is written
        if self.acc.is_main_process:
            truncate_jsonl(self.out / "metrics.jsonl", step)
        return step

    # ------------------------------------------------------------------ the loop

    def batch(self, step: int) -> tuple[list[str], list[int], torch.Generator]:
        """Prompts, seeds and the random source of step ``step`` on this process: a function of
        (seed, step, process index, number of processes) only.

        One global batch of ``num_processes * batch_size`` pairs is drawn and this process takes
        its slice, so processes never share a sample. With ``group_size`` G > 1 (grpo, nft) the
        batch is made of groups, one prompt G times in a row with G different seeds; G divides
        ``batch_size``, so a group never spans two processes. With one process this is the whole batch
        and the generator goes on as before; with several, each process continues with a
        generator of its own (truncation points, re-noising), seeded from the step's generator.
        """
        cfg = self.cfg
        n, rank = self.acc.num_processes, self.acc.process_index
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        G = cfg.group_size  # grpo, nft: each prompt G times in a row, whole groups on every process
        idx = torch.randint(0, len(self.train_prompts), (n * cfg.batch_size // G,), generator=gen).repeat_interleave(G)
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
        self.model.net.eval()  # no dropout: see the module doc
        self.reward.context = describe_batch(step + 1, prompts, seeds)
        failure = None
        try:
            res = self.method(self.model, self.reward, prompts, seeds, cfg, gen)
            if not isinstance(res, LossOut):  # a generator samples and scores on its first loss: take it here
                res = iter(res)
                res = itertools.chain([next(res)], res)
        except RewardFailure as e:
            failure = e
        if self._agree(failure is not None):  # every process skips or stops together
            self.opt.zero_grad(set_to_none=True)
            if cfg.reward_errors != "skip":
                raise failure or RewardFailure(f"the reward failed on another process at step {step + 1} (see its message)")
            self.skipped += 1
            return {"step": step + 1, "skipped": 1, "reward_skipped": self.skipped,
                    "skip_reason": str(failure) if failure else "the reward failed on another process",
                    "seconds": time.perf_counter() - t0}
        outs: list[LossOut] = []
        norms = []
        for out in [res] if isinstance(res, LossOut) else res:
            self._check_finite(out, step)
            if out.step or self.acc.num_processes == 1:
                self.acc.backward(out.loss)
            else:  # gradients are averaged once, at the optimizer step
                with sharding.no_grad_sync(self.units) if self.units else self.acc.no_sync(self.model.net):
                    self.acc.backward(out.loss)
            if out.step:
                if self.units:
                    sharding.average_replicated_grads(self.params, self.acc.num_processes)
                    norm = sharding.clip_grad_norm(self.params, cfg.grad_clip) if cfg.grad_clip > 0 else 0.0
                else:
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
        (and, for text outputs, the samples) and shows the progress: the samples, then the
        base model along their paths for the KL."""
        cfg, main = self.cfg, self.acc.is_main_process
        wrapped = self.model.net
        self.model.net = self.acc.unwrap_model(wrapped)
        n = len(self.eval_seeds)
        self.reward.context = f"the evaluation {tag!r} ({n} held-out samples)"
        bar = tqdm(total=2 * n, desc=f"evaluating ({tag})", unit="sample", leave=False, disable=not (self.progress and main))
        try:
            self.model.net.eval()
            scale = eval_guidance(cfg) if self.model.conditional else 1.0
            res = evaluate(self.model, self.reward, self.eval_prompts, self.eval_seeds, num_inference_steps=eval_steps(cfg),
                           guidance_scale=scale, reward_name=cfg.reward, grid_path=self.out / f"samples_{tag}.png" if main else None,
                           samples_path=self.out / f"samples_{tag}.txt" if main else None, progress=bar.update)
            res["kl_to_base"] = float(self._kl_to_base(bar.update).mean())
        finally:
            bar.close()
            self.model.net = wrapped
        return {f"eval_{k}": v for k, v in res.items()}

    def _kl_to_base(self, progress=None) -> torch.Tensor:
        """Per-sample KL of the model's samples to the base model's [N]: of token distributions
        for token models, of the chain's paths otherwise."""
        if TOKENS in self.model.capabilities:
            from rewardiff.finetune.gumbel import kl_to_base_tokens

            return kl_to_base_tokens(self.model, self.eval_seeds, self.cfg, progress=progress)
        return kl_to_base(self.model, self.eval_prompts, self.eval_seeds, eval_steps(self.cfg), eval_guidance(self.cfg),
                          progress=progress)

    def train(self, resume: bool = False) -> dict:
        """Run (or continue) training; returns the summary also written to ``summary.json``.

        The run directory is locked for the run's lifetime (``.lock``, released by the
        operating system even when the process is killed), so a second process aimed at the
        same ``--out`` refuses to start. SIGINT (Ctrl-C) and SIGTERM (a cluster's pre-emption)
        stop the run at the end of the current step: it writes a checkpoint, says where, and
        raises :class:`~rewardiff.errors.Stopped` (exit status 130 or 143); a second Ctrl-C
        stops at once, with the last checkpoint intact.
        """
        cfg = self.cfg
        main = self.acc.is_main_process
        lock = None
        error = ""
        if main:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                lock = RunLock(self.out)
                check_out(self.out, cfg, resume)  # again, now that no other process can start here
                # a resumed run may have changed the fields of RESUMABLE_CHANGES (a longer run): the
                # folder's config is the one that runs now
                atomic_write_text(self.out / "config.yaml", _yaml(asdict(cfg)))
            except UserError as e:
                error = str(e)
            except OSError as e:
                error = f"cannot write the run directory {self.out}: {e.strerror or e}"
        if self._agree(bool(error)):
            if lock is not None:
                lock.release()
            raise UserError(error or f"the main process refused the run directory {self.out} (see its message)")
        try:
            with StopSignals() as stop:
                return self._train(resume, stop)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES):
                raise UserError(f"cannot write to {self.out}: {e.strerror}; {self._last_checkpoint_text()}") from None
            raise
        finally:
            if lock is not None:
                lock.release()

    def _train(self, resume: bool, stop: "StopSignals") -> dict:
        cfg = self.cfg
        main = self.acc.is_main_process
        start = self.resume() if resume else 0
        if start >= cfg.steps and (self.out / "summary.json").is_file():
            return json.loads((self.out / "summary.json").read_text())  # the run is complete: nothing to redo
        if start == 0 and main:
            truncate_jsonl(self.out / "metrics.jsonl", 0)
        if cfg.tracker != "none":
            self.acc.init_trackers(self.out.name or "rewardiff", config={k: v for k, v in asdict(cfg).items() if isinstance(v, (int, float, str, bool))})
        before = self._eval_cached("before")
        self._track({f"before/{k}": v for k, v in before.items()}, start, "samples_before")
        log = (self.out / "metrics.jsonl").open("a") if main else None
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"{cfg.method}", disable=not (self.progress and main))
        saved = start
        try:
            for step in bar:
                self._stop_if_asked(stop, step, saved)
                row = self.train_step(step)
                grid = None
                if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                    row.update(self.evaluate(f"step{step + 1:06d}"))
                    grid = f"samples_step{step + 1:06d}"
                self._track({k: v for k, v in row.items() if k != "step"}, step + 1, grid)
                if log is not None:
                    log.write(strict_dumps(row) + "\n")
                    log.flush()
                if "reward_mean" in row:
                    bar.set_postfix(reward=f"{row['reward_mean']:.3f}")
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                    self.save_checkpoint(step + 1)
                    saved = step + 1
            self._stop_if_asked(stop, cfg.steps, saved)
        finally:
            if log is not None:
                log.close()
            bar.close()
        if saved < cfg.steps:
            self.save_checkpoint(cfg.steps)
        step, state = self._gathered or (None, None)
        if self.units and step != cfg.steps:  # else the checkpoint of this step gathered them already
            state = sharding.full_state(self.acc.unwrap_model(self.model.net))  # collective
        self._gathered = None
        if main:
            save_weights(self.out / "final", self.acc.unwrap_model(self.model.net), cfg, state=state)
        summary = self._finish(before, self.evaluate("after"))
        self._track({f"after/{k}": v for k, v in summary["after"].items()}, cfg.steps, "samples_after")
        if cfg.tracker != "none":
            self.acc.end_training()
        self.acc.wait_for_everyone()  # no process returns before the run's files are complete
        return summary

    def _stop_if_asked(self, stop: "StopSignals", step: int, saved: int) -> None:
        """At a safe point (between steps): when a stop signal came to any process, checkpoint
        step ``step`` (unless it is the last one saved) and raise Stopped. Collective."""
        if not self._agree(stop.signum is not None):
            return
        if step > saved:
            self.save_checkpoint(step)
        where = self._ckpt_dir(step) if step > 0 else None
        name = signal.Signals(stop.signum).name if stop.signum else "a signal on another process"
        raise Stopped(stop.signum or signal.SIGTERM, f"stopped by {name} after step {step} of {self.cfg.steps}; "
                      + (f"checkpoint {where}; continue with --resume" if where else "no step was trained yet; start again to run it"))

    def _track(self, values: dict, step: int, grid: str | None) -> None:
        """Send scalars, and the named sample grid when there is one, to the trackers."""
        if self.cfg.tracker == "none" or not self.acc.is_main_process:
            return
        self.acc.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)  # numbers only: no text, no null read back
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
            write_json(path, res)
        return res

    def _finish(self, before: dict, after: dict) -> dict:
        from rewardiff.finetune.run_report import write_summary

        summary = {"method": self.cfg.method, "reward": self.cfg.reward, "steps": self.cfg.steps, "before": before, "after": after}
        if self.acc.is_main_process:
            write_summary(self.out, self.cfg, summary)
        return summary


RESUMABLE_CHANGES = ("steps", "eval_every", "checkpoint_every", "tracker", "fsdp")
"""Fields a resumed run may change: they decide how long it runs, what it writes and how the
work is laid out over the processes (``fsdp``: checkpoints are whole either way), not what
it computes, so the resumed run stays the one it continues."""


def eval_steps(cfg: FinetuneConfig) -> int:
    """The sampler steps of evaluations: ``eval_inference_steps``, or the training chain's."""
    return cfg.eval_inference_steps or cfg.num_inference_steps


def eval_guidance(cfg: FinetuneConfig) -> float:
    """The guidance scale of evaluations: ``eval_guidance_scale``, or the training chain's."""
    return cfg.guidance_scale if cfg.eval_guidance_scale < 0 else cfg.eval_guidance_scale


def is_run(out: Path) -> bool:
    """Whether ``out`` holds (part of) a fine-tuning run."""
    return any((out / name).exists() for name in ("config.yaml", "metrics.jsonl", "checkpoints", "summary.json"))


def check_out(out: Path, cfg: FinetuneConfig, resume: bool) -> None:
    """A UserError, before anything is written, when ``out`` cannot take this run.

    ``out`` must be a directory (or not exist yet) under a writable parent. Without
    ``resume`` it must not hold a run already (two runs in one folder would mix their
    checkpoints and logs); with ``resume`` it must hold one, started with the same config
    except for the fields of :data:`RESUMABLE_CHANGES`. A run folder without a checkpoint yet
    (stopped before its first) is resumed from step 0.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    parent = out if out.exists() else next((p for p in out.absolute().parents if p.exists()), Path("/"))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot write to {parent} (read-only or no permission)")
    if not resume:
        if is_run(out):
            raise UserError(f"--out {out} already holds a run; continue it with --resume, or choose another --out (nothing was changed)")
        return
    if not is_run(out):
        raise UserError(f"--resume: {out} holds no run to continue; start it without --resume")
    import yaml

    try:
        saved = yaml.safe_load((out / "config.yaml").read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError, yaml.YAMLError) as e:  # UnicodeDecodeError is a ValueError
        raise UserError(f"--resume: the run's config {out / 'config.yaml'} is missing or unreadable ({type(e).__name__})") from None
    now = asdict(cfg)
    changed = [k for k in now if k not in RESUMABLE_CHANGES and saved.get(k, now[k]) != now[k]]
    if changed:
        k = changed[0]
        more = f" (and {len(changed) - 1} more: {', '.join(changed[1:])})" if len(changed) > 1 else ""
        raise UserError(f"--resume: the config differs from the run's in {k!r}: {saved.get(k)!r} in the run, {now[k]!r} now{more}; "
                        f"resume with the run's config ({out / 'config.yaml'}) or choose another --out")


class RunLock:
    """An exclusive lock on a run directory (``out/.lock``, holding the owner's pid).

    ``fcntl.flock``: the operating system releases it when the process ends, however it ends,
    so a killed run never leaves a stale lock. Where flock is missing (Windows) it is a no-op.
    """

    def __init__(self, out: Path):
        self.path, self.fd = Path(out) / ".lock", None
        try:
            import fcntl
        except ImportError:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"--out {out} is in use by another rewardiff process (pid {owner}); wait for it, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


class StopSignals:
    """While active, SIGINT and SIGTERM only ask the run to stop (``signum`` is set); a second
    SIGINT raises KeyboardInterrupt at once. Outside the main thread it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        import sys

        print(f"\n{signal.Signals(signum).name}: stopping after the current step (Ctrl-C again to stop at once)", file=sys.stderr)

    def __enter__(self) -> "StopSignals":
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def _checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints under ``root``, by step number."""
    found = []
    for d in root.glob("step-*"):
        m = re.fullmatch(r"step-(\d+)", d.name)
        if m and d.is_dir():
            found.append((int(m.group(1)), d))
    return sorted(found)


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


def release_process_group() -> None:
    """Tear down the process group of a multi-process launch, once a process's work is done.

    Called by the command line after a run, before the interpreter exits: a group left to the
    interpreter's teardown can abort the process there ("terminate called without an active
    exception", exit -6, seen once in 2-process FSDP runs on gloo) after every file is written."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def finetune(cfg: FinetuneConfig, out: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Fine-tune per ``cfg`` into ``out``; see :class:`Run`.

    Everything that can be checked is checked before anything is loaded or written: the
    config's values (:func:`~rewardiff.finetune.config.validate`) and the run directory
    (:func:`check_out`); a mistake is a UserError and leaves ``out`` as it was.
    """
    from rewardiff.finetune.config import validate

    validate(cfg)
    check_out(Path(out), cfg, resume)
    return Run(cfg, out, progress).train(resume=resume)
