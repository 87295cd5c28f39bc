"""The resumable pretraining loop of every world's base model.

Every world draws its step's batch with a seed derived from (seed, step), so a run
interrupted and resumed from its last checkpoint sees exactly the batches an uninterrupted
run would. Checkpoints hold the weights, their exponential moving average (EMA, what ships)
and the optimizer state, each written atomically.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from rewardiff.io import atomic_write, atomic_write_text, truncate_jsonl


def _save_checkpoint(out: Path, step: int, model, ema, opt, losses: list[float]) -> None:
    from safetensors.torch import save_file

    ckpt = out / "checkpoint"
    for name, module in (("model", model), ("ema", ema)):
        state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        atomic_write(ckpt / f"{name}.safetensors", lambda p, state=state: save_file(state, str(p)))
    atomic_write(ckpt / "optimizer.pt", lambda p: torch.save(opt.state_dict(), p))
    # written last: its step names a complete checkpoint
    atomic_write_text(ckpt / "state.json", json.dumps({"step": step, "recent_loss": losses[-100:]}))


def _load_checkpoint(out: Path, model, ema, opt) -> int:
    from safetensors.torch import load_file

    ckpt = out / "checkpoint"
    if not (ckpt / "state.json").exists():
        return 0
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    ema.load_state_dict(load_file(str(ckpt / "ema.safetensors")))
    opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    return int(json.loads((ckpt / "state.json").read_text())["step"])


def resumable_loop(out: Path, model, ema, opt, *, steps: int, checkpoint_every: int, ema_decay: float,
                   train_step: Callable[[int], tuple[float, dict]], desc: str, progress: bool) -> None:
    """The pretraining loop of every world: resume from ``out``'s checkpoint, then for each step
    call ``train_step(step) -> (loss, extra metrics)``, update the EMA, log a metrics row, and
    checkpoint every ``checkpoint_every`` steps and at the end.

    Rows after the checkpoint are dropped on resume, so ``metrics.jsonl`` holds each step once.
    """
    start = _load_checkpoint(out, model, ema, opt)
    truncate_jsonl(out / "metrics.jsonl", start)  # steps after the checkpoint are redone
    losses: list[float] = []
    model.train()
    with (out / "metrics.jsonl").open("a") as log:
        bar = tqdm(range(start, steps), initial=start, total=steps, disable=not progress, desc=desc)
        for step in bar:
            t0 = time.time()
            loss, extra = train_step(step)
            _ema_update(ema, model, min(ema_decay, (1 + step) / (10 + step)))
            losses.append(loss)
            log.write(json.dumps({"step": step + 1, "loss": loss, **extra, "seconds": time.time() - t0}) + "\n")
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
            if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
                log.flush()
                _save_checkpoint(out, step + 1, model, ema, opt, losses)


def start_run(out: str | Path, cfg, make_net: Callable[[], nn.Module], weight_decay: float) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """The start of every world's pretraining run in ``out``: the folder, its ``config.json``
    (the dataclass ``cfg``), then, seeded with ``cfg.seed``, the net (``make_net()``), its EMA
    copy (frozen, equal to it) and AdamW. Returns (model, ema, optimizer) for :func:`resumable_loop`,
    which restores a checkpoint over them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", json.dumps(asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    model = make_net()
    ema = make_net()
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    return model, ema, torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=weight_decay)


def optimizer_step(model: nn.Module, opt: torch.optim.Optimizer, loss: Tensor, lr: float) -> float:
    """One update of every pretraining loop: set the learning rate, backpropagate ``loss``, clip
    the gradient norm at 1 and step. Returns the loss as a float."""
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


@torch.no_grad()
def _ema_update(ema, model, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def configure(cls, steps: int | None, seed: int, overrides: dict | None = None):
    """A world's pretraining config ``cls`` (a dataclass): its defaults, then ``steps`` (None:
    the default), ``seed`` and ``overrides`` (``--set key=value`` of ``rewardiff pretrain``).

    Raises:
        UserError: an unknown field (the message lists the fields) or a value of the wrong type.
    """
    from dataclasses import fields

    from rewardiff.errors import UserError

    known = {f.name: f for f in fields(cls)}
    values = {"seed": seed, **({} if steps is None else {"steps": steps})}
    for key, val in (overrides or {}).items():
        if key not in known:
            raise UserError(f"unknown pretraining field {key!r}; fields: {', '.join(known)}")
        default = getattr(cls, key, None)
        kind = type(default) if default is not None else type(val)
        if kind is float and isinstance(val, int) and not isinstance(val, bool):
            val = float(val)
        if not isinstance(val, kind) or (kind is int and isinstance(val, bool)):
            raise UserError(f"pretraining field {key!r} must be {kind.__name__}, got {val!r}")
        values[key] = val
    return cls(**values)
