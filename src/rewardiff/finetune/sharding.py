"""Fully sharded data parallel training (torch FSDP2, ``fully_shard``) for the trainer.

With ``fsdp: true`` (or a launch through accelerate's FSDP config, ``configs/accelerate/fsdp.yaml``)
and more than one process, every process holds a slice of each parameter, its gradient
and its optimizer state instead of a whole copy; a layer's parameters are gathered for its
forward and backward calls and freed after. This is what makes models of FLUX's size
trainable where one copy per process does not fit.

What is sharded: every layer the model's own classes name as not to be split
(``_no_split_modules`` of diffusers' and transformers' models: transformer blocks, ResNet
blocks, CLIP layers), then every child of the net that holds parameters (the backbone,
the text encoders), each one unit; the net's own methods (``encode``) keep working because
they call those children. A frozen copy of the base model (full fine-tuning's reference) is
sharded the same way. Parameters outside every unit stay whole on every process; their
gradients are averaged across processes before the optimizer step
(:func:`average_replicated_grads`), so they stay equal.

Checkpoints stay in the trainer's one format (full tensors): the trainable tensors and the
optimizer state are gathered (collectively) and the main process writes them, so a run
trained sharded resumes with or without sharding and its ``final/`` loads anywhere. Loading
gives every process its slice of the full tensors it reads.

The one trainer loop is unchanged otherwise: accelerate still gives the process group,
gathers and reductions; the model is not handed to ``accelerate.prepare`` (which would
wrap it for DDP, or on a GPU apply accelerate's own FSDP) and the optimizer is torch's.
Mixed precision is FSDP's policy: bf16 parameters in the sharded units' calls, gradients
reduced in fp32, outputs cast back to fp32.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from rewardiff.errors import UserError


def requested(cfg) -> bool:
    """Whether the run asks for sharding: ``fsdp: true``, or accelerate's FSDP launcher
    (``ACCELERATE_USE_FSDP``), which accelerate itself ignores on a CPU."""
    return bool(cfg.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes")


def check(cfg, model) -> None:
    """UserErrors for what the sharded path does not run, before anything is loaded further."""
    from rewardiff.types import TOKENS

    if cfg.mixed_precision == "fp16":
        raise UserError("config field 'fsdp': fp16 is not supported with sharding (its loss scaler needs accelerate's wrapped optimizer); use bf16")
    if TOKENS in model.capabilities:
        raise UserError(f"config field 'fsdp': token models ({model.name}) are not supported with sharding "
                        "(their soft token inputs read the embedding weights outside a forward call); set fsdp: false")


def is_sharded(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _units(net: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """The modules to shard, innermost first: the layers named in any ``_no_split_modules``
    inside ``net``, then the net's children that hold parameters; and those children."""
    names: set[str] = set()
    for m in net.modules():
        names |= set(getattr(m, "_no_split_modules", None) or [])
    inner = [m for m in net.modules() if m is not net and type(m).__name__ in names]

    def callable_children(m: nn.Module) -> list[nn.Module]:  # a ModuleList has no forward: its members do
        out = []
        for c in m.children():
            out += callable_children(c) if isinstance(c, (nn.ModuleList, nn.ModuleDict)) else [c]
        return out

    outer = [c for c in callable_children(net) if any(True for _ in c.parameters()) and all(c is not m for m in inner)]
    return [*reversed(inner), *outer], outer


def shard(model, device: torch.device, num_processes: int, mixed_precision: str = "no") -> list[nn.Module]:
    """Shard ``model.net`` (and a reference copy that shares no parameter with it) over the
    process group in place; returns the sharded units. Collective."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (num_processes,))
    bf16 = mixed_precision == "bf16"
    # inner units hand bf16 to the layers around them; the outermost ones give the rollout fp32
    inner = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    outer = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.float32) \
        if bf16 else MixedPrecisionPolicy()
    done: list[nn.Module] = []
    nets = [model.net]
    ref = getattr(model, "reference", None)
    own = {id(p) for p in model.net.parameters()}
    if isinstance(ref, nn.Module) and not any(id(p) in own for p in ref.parameters()):
        nets.append(ref)  # full fine-tuning's frozen copy
    for net in nets:
        net.to(device)
        units, top = _units(net)
        for unit in units:
            fully_shard(unit, mesh=mesh, mp_policy=outer if any(unit is t for t in top) else inner)
            done.append(unit)
    return done


def trainable(net: nn.Module) -> list[tuple[str, Tensor]]:
    return [(n, p) for n, p in net.named_parameters() if p.requires_grad]


def is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def full_state(net: nn.Module, everywhere: bool = False) -> dict[str, Tensor]:
    """The trainable tensors as whole CPU tensors on the main process, ``{}`` on the others
    (on every process with ``everywhere``). Collective: every process calls it. One tensor is
    gathered at a time, so a process holds at most one whole parameter beyond its slices on
    its device, and only the main process fills CPU memory."""
    keep = everywhere or is_main()
    out = {}
    for n, p in trainable(net):
        t = full(p.detach())
        if keep:
            out[n] = t.cpu().contiguous().clone()
        del t
    return out


def full(t: Tensor) -> Tensor:
    """A tensor whole (collective for a sharded one)."""
    return t.full_tensor() if is_sharded(t) else t


def like(param: Tensor, value: Tensor) -> Tensor:
    """``value`` (a whole tensor, the same on every process) laid out as ``param``: this
    process's slice when ``param`` is sharded. No communication."""
    if not is_sharded(param):
        return value.to(param.device, param.dtype)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements, src_data_rank=None)


@contextlib.contextmanager
def no_grad_sync(units: Iterable[nn.Module]) -> Iterator[None]:
    """Backward passes inside accumulate local gradients without reducing them (what DDP's
    ``no_sync`` does); the next backward outside reduces the sum."""
    units = list(units)
    for u in units:
        u.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        for u in units:
            u.set_requires_gradient_sync(True)


def average_replicated_grads(params: Iterable[Tensor], num_processes: int) -> None:
    """Average the gradients of the trainable parameters no unit shards (collective)."""
    import torch.distributed as dist

    for p in params:
        if p.grad is not None and not is_sharded(p):
            dist.all_reduce(p.grad)
            p.grad.div_(num_processes)


def clip_grad_norm(params: list[Tensor], max_norm: float) -> float:
    """Clip the (sharded) gradients to a global norm ``max_norm``; returns the norm before."""
    grads = [p for p in params if p.grad is not None]
    sharded = [p for p in grads if is_sharded(p)]
    whole = [p for p in grads if not is_sharded(p)]
    sq = torch.zeros((), dtype=torch.float64)
    if sharded:
        norm = torch.nn.utils.get_total_norm([p.grad for p in sharded], 2.0)
        sq = sq + float(full(norm)) ** 2
    if whole:
        sq = sq + float(torch.nn.utils.get_total_norm([p.grad for p in whole], 2.0)) ** 2
    total = float(sq.sqrt())
    if max_norm > 0 and total > 0:
        scale = min(1.0, max_norm / (total + 1e-6))
        for p in grads:
            p.grad.mul_(scale)
    return total


def optimizer_state(net: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimizer's state with whole tensors, keyed by parameter name, on the main process
    (empty elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(net, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(net: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Load what :func:`optimizer_state` wrote: the main process passes it, the others ``{}``;
    every process keeps its slice. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(net, opt, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def indexed(state: dict, names: list[str]) -> dict:
    """An optimizer state keyed by parameter name (torch's distributed state-dict format) in
    the layout ``Optimizer.state_dict()`` writes (parameters numbered in ``names``' order), so
    that a checkpoint reads alike however it was trained."""
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: v for n, v in state.get("state", {}).items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state.get("param_groups", [])]}


def named(state: dict, names: list[str]) -> dict:
    """The inverse of :func:`indexed`."""
    return {"state": {names[int(i)]: v for i, v in state.get("state", {}).items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state.get("param_groups", [])]}
