"""LoRA attachment, the frozen reference model, and fine-tuned weights on disk.

A fine-tuned model is stored as its trainable tensors only (``trainable.safetensors``:
LoRA matrices, or every weight for full fine-tuning) beside the run's ``finetune.json``;
loading rebuilds the base model, attaches the same adapters and fills them in.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from rewardiff.errors import UserError
from rewardiff.finetune.config import FinetuneConfig, build_config
from rewardiff.io import atomic_write, atomic_write_text
from rewardiff.models.base import DiffusionModel

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "time_emb_proj"]


class Backbone(NamedTuple):
    """The diffusers model inside a net that LoRA adapts through peft's ``add_adapter``.

    Fields:
        module: the model (a UNet, SD3's transformer).
        name: its attribute on the net, and the prefix of its tensors in diffusers' LoRA files.
        targets: the layers adapted.
        pipeline: the diffusers pipeline class whose ``save_lora_weights`` writes its LoRA.
    """

    module: nn.Module
    name: str
    targets: list[str]
    pipeline: str


def lora_backbone(net: nn.Module) -> Backbone | None:
    """The net's :class:`Backbone`: the attribute it names in ``backbone`` (SD3's
    ``"transformer"``) with its ``lora_layers`` and ``lora_pipeline``, by default its ``.unet``
    with :data:`LORA_TARGETS` (Stable Diffusion, SDXL, the shapes model); None without one."""
    name = getattr(net, "backbone", "unet")
    module = getattr(net, name, None)
    if module is None:
        return None
    return Backbone(module, name, list(getattr(net, "lora_layers", LORA_TARGETS)),
                    getattr(net, "lora_pipeline", "StableDiffusionPipeline"))


def attach_lora(model: DiffusionModel, rank: int, alpha: float) -> None:
    """Freeze the net and add LoRA adapters (peft) to its diffusers backbone
    (:func:`lora_backbone`: a UNet, SD3's transformer; token models and the masked molecules
    model: to their ``lora_targets``); ``rank`` 0 trains every weight."""
    net = model.net
    if rank <= 0:
        net.requires_grad_(True)
        model.reference = _frozen_copy(net)
        return
    backbone = lora_backbone(net)
    if backbone is None:
        attach_layer_lora(model, rank, alpha)
        return
    from peft import LoraConfig, inject_adapter_in_model

    net.requires_grad_(False)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=backbone.targets)
    # lora_B starts at zero: the adapted model equals the base
    if hasattr(backbone.module, "add_adapter"):  # diffusers' PeftAdapterMixin
        backbone.module.add_adapter(cfg)
    else:  # a diffusers model without it (UNet3DConditionModel): peft itself, with the same layer names
        inject_adapter_in_model(cfg, backbone.module)
    model.reference = AdapterOff(net)


def switch_adapters(module: nn.Module, on: bool) -> None:
    """Enable or disable every peft LoRA layer inside ``module`` (what diffusers'
    ``enable_adapters`` / ``disable_adapters`` do, for any module)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in module.modules():
        if isinstance(m, BaseTunerLayer):
            m.enable_adapters(on)


class AdapterOff:
    """The base model seen through a net whose backbone has LoRA: adapters disabled for the call."""

    def __init__(self, net: nn.Module):
        backbone = lora_backbone(net)
        assert backbone is not None
        self.net, self.backbone = net, backbone.module

    def __call__(self, x: Tensor, t: Tensor, cond) -> Tensor:
        switch_adapters(self.backbone, False)
        try:
            return self.net(x, t, cond)
        finally:
            switch_adapters(self.backbone, True)


def attach_layer_lora(model, rank: int, alpha: float) -> None:
    """LoRA on the named layers of a net without a diffusers backbone (``model.lora_targets``:
    token models, the masked molecules model), injected by peft; the reference is the same net
    with its adapters disabled.

    A target that names a parameter rather than a layer (the masked model's
    ``self_attn.in_proj_weight``) goes to peft's ``target_parameters``: the adapter is added to
    that weight for the duration of its module's forward call.
    """
    from peft import LoraConfig, inject_adapter_in_model

    targets = list(getattr(model, "lora_targets", None) or [])
    if not targets:
        raise UserError(f"no LoRA layers known for model {model.name!r}; fine-tune every weight with lora_rank=0")
    net = model.net
    net.requires_grad_(False)
    params = [t for t in targets if any(n == t or n.endswith("." + t) for n, _ in net.named_parameters())]
    layers = [t for t in targets if t not in params]
    conv1d = any(type(m).__name__ == "Conv1D" for n, m in net.named_modules() if n.rsplit(".", 1)[-1] in layers)
    extra = {"target_parameters": params} if params else {}
    cfg = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=layers, fan_in_fan_out=conv1d, **extra)
    inject_adapter_in_model(cfg, net)  # lora_B starts at zero: the adapted model equals the base
    model.reference = LayerAdapterOff(net)


class LayerAdapterOff(nn.Module):
    """The base model seen through a net with peft LoRA layers: every adapter disabled for the call.

    A module over the same net (no copy), so that code walking the reference's modules (the
    Gumbel method's soft token inputs) finds the net's own layers.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, *args, **kwargs):
        switch_adapters(self.net, False)
        try:
            return self.net(*args, **kwargs)
        finally:
            switch_adapters(self.net, True)


def _frozen_copy(net: nn.Module) -> nn.Module:
    ref = copy.deepcopy(net)
    ref.requires_grad_(False)
    ref.eval()
    return ref


def trainable_state(net: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().contiguous().clone() for n, p in net.named_parameters() if p.requires_grad}


def save_weights(directory: Path, net: nn.Module, cfg: FinetuneConfig, state: dict[str, Tensor] | None = None) -> None:
    """Write ``trainable.safetensors`` and ``finetune.json`` atomically into ``directory``.

    ``state``: the trainable tensors whole, by name, when the net holds only slices of them
    (a sharded run gathers them first); by default they are read from the net."""
    from safetensors.torch import save_file

    state = trainable_state(net) if state is None else state
    atomic_write(directory / "trainable.safetensors", lambda p: save_file(state, str(p)))
    if cfg.model.startswith("diffusers:") and cfg.lora_rank > 0:
        save_diffusers_lora(directory, net, state)
    if cfg.model.startswith("hf:") and cfg.lora_rank > 0:
        save_peft_adapter(directory, net, cfg.model.removeprefix("hf:"))
    atomic_write_text(directory / "finetune.json", json.dumps(asdict(cfg), indent=2))


DIFFUSERS_LORA = "pytorch_lora_weights.safetensors"


def save_diffusers_lora(directory: Path, net: nn.Module, state: dict[str, Tensor] | None = None) -> None:
    """The backbone's LoRA (a UNet's, SD3's transformer's) in the layout
    ``pipeline.load_lora_weights(directory)`` reads, written by its pipeline class's
    ``save_lora_weights`` with the adapter's rank and alpha recorded, so plain diffusers
    reproduces the fine-tuned model."""
    import diffusers
    from peft.utils import get_peft_model_state_dict

    backbone = lora_backbone(net)
    assert backbone is not None
    module = backbone.module
    own = None
    if state is not None:  # whole tensors named from the net: the backbone's, named from it
        prefix = backbone.name + "."
        own = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    layers = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(module, state_dict=own).items()}
    meta = module.peft_config["default"].to_dict()
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    save = getattr(diffusers, backbone.pipeline).save_lora_weights

    tmp = directory / ".diffusers-lora.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save(str(tmp), weight_name=DIFFUSERS_LORA, **{f"{backbone.name}_lora_layers": layers,
                                                       f"{backbone.name}_lora_adapter_metadata": meta})
        os.replace(tmp / DIFFUSERS_LORA, directory / DIFFUSERS_LORA)  # atomic: old file or new, never half
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def save_peft_adapter(directory: Path, net: nn.Module, base_dir: str) -> None:
    """A Hugging Face model's LoRA in the layout ``PeftModel.save_pretrained`` writes, so that
    plain peft and transformers reproduce the fine-tuned model:
    ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), directory)``.

    ``adapter_model.safetensors`` holds the factors as ``base_model.model.<layer>.lora_A.weight``
    (the layer's name in the language model, the adapter name left out) and
    ``adapter_config.json`` the LoraConfig they were trained with, its base model recorded.
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(net)  # "lm.<layer>.lora_A.weight": ``net`` is the HFCausalLM wrapper
    layers = {"base_model.model." + k.removeprefix("lm."): v.detach().contiguous() for k, v in state.items()}
    cfg = copy.deepcopy(net.peft_config["default"])
    cfg.base_model_name_or_path, cfg.task_type, cfg.inference_mode = str(Path(base_dir).resolve()), "CAUSAL_LM", True
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.to_dict().items()}
    atomic_write(directory / PEFT_WEIGHTS, lambda p: save_file(layers, str(p), metadata={"format": "pt"}))
    atomic_write_text(directory / PEFT_CONFIG, json.dumps(meta, indent=2, sort_keys=True))


def load_trainable(directory: Path, net: nn.Module) -> None:
    """Fill the net's trainable tensors from ``directory``; every one must be present."""
    from safetensors.torch import load_file

    state = load_file(str(directory / "trainable.safetensors"))
    params = dict(net.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    unknown = [n for n in state if n not in params]
    if missing or unknown:
        raise UserError(f"weights in {directory} do not fit the model ({len(missing)} missing, {len(unknown)} unknown tensors)")
    from rewardiff.finetune.sharding import like

    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(like(params[n], v))  # a sharded run: this process's slice


def weights_dir(directory: str | Path) -> Path:
    """The folder holding ``finetune.json`` + ``trainable.safetensors``: a run, its ``final/``, or a checkpoint."""
    d = Path(directory)
    for cand in (d, d / "final"):
        if (cand / "finetune.json").is_file() and (cand / "trainable.safetensors").is_file():
            return cand
    raise UserError(f"no fine-tuned weights (finetune.json + trainable.safetensors) in {d}")


def load_finetuned(directory: str | Path) -> DiffusionModel:
    """A fine-tuned model from a run directory, its ``final/`` folder, or a checkpoint folder."""
    d = weights_dir(directory)
    try:
        saved = json.loads((d / "finetune.json").read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {d / 'finetune.json'} ({type(e).__name__}): the fine-tuned model's config is damaged") from None
    cfg = build_config(saved)
    from rewardiff.models.registry import base_model

    model = base_model(cfg.model)
    attach_lora(model, cfg.lora_rank, cfg.lora_alpha)
    try:
        load_trainable(d, model.net)
    except UserError:
        raise
    except Exception as e:  # a truncated or corrupt safetensors file
        raise UserError(f"cannot read {d / 'trainable.safetensors'}: {str(e).splitlines()[0][:100]}") from None
    model.net.eval()
    return model
