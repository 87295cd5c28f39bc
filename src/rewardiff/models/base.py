"""DiffusionModel: a denoiser with its process, prompt encoder and decoder (a :class:`~rewardiff.types.Generator`).

This is what samplers, trainers and guidance methods take. The shapes world's pixel model
and (through an adapter) Stable Diffusion's latent UNet both fit it: only ``encode``,
``decode`` and the sample shape differ.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from rewardiff.rollout import any_stochastic, rollout
from rewardiff.types import CHAIN, GAUSSIAN, TOKENS, Process, StepHook, Trajectory


class DiffusionModel:
    """A conditional diffusion model ready to sample.

    Args:
        net: the denoiser module, ``net(x_t, t[B], cond) -> prediction``.
        process: its process: Gaussian (DDPM/DDIM), flow (rectified flow) or masked (tokens).
        encode: prompts -> condition (the empty prompt "" is the unconditional one).
        shape: the shape of one sample in the space the net denoises, e.g. (3, 32, 32).
        decode: samples -> images in [-1, 1] [B, 3, H, W] (identity in pixel space).
        name: a short label for reports.
        output_range: the range decoded outputs are clamped to ((-1, 1) for images; None
            for outputs with no fixed range).
        conditional: whether prompts condition the net (False: every prompt is "" and
            classifier-free guidance has nothing to do).
        texts: outputs -> one string each, for models whose outputs are text (token ids),
            e.g. SMILES; None for images.
        lora_targets: what LoRA adapts in a net without a diffusers backbone (``.unet``, SD3's
            ``.transformer``): names of its layers, or of parameters (e.g.
            ``self_attn.in_proj_weight``); None when LoRA is not supported.
        world: the embedded world whose hooks apply to it (``rewardiff.plugins``), or None.
        check_prompts: raises UserError for prompts the model cannot read (a closed
            vocabulary, an image it cannot read), or None when every prompt is fine.
        unconditional: prompts -> the prompts of classifier-free guidance's unconditional
            branch, one each; None: the empty prompt "" (an image-conditioned model keeps the
            prompt's image and drops its text, :func:`rewardiff.conditions.unconditional`).
    """

    def __init__(
        self,
        net: nn.Module,
        process: Process,
        encode: Callable[[list[str]], Any],
        shape: tuple[int, ...],
        decode: Callable[[Tensor], Tensor] | None = None,
        name: str = "model",
        output_range: tuple[float, float] | None = (-1.0, 1.0),
        conditional: bool = True,
        texts: Callable[[Tensor], list[str]] | None = None,
        lora_targets: list[str] | None = None,
        world: str | None = None,
        check_prompts: Callable[[list[str]], None] | None = None,
        unconditional: Callable[[list[str]], list[str]] | None = None,
    ):
        self.net, self.process, self.encode, self.shape, self.name = net, process, encode, shape, name
        self.output_range, self.conditional, self.texts = output_range, conditional, texts
        self.lora_targets = list(lora_targets) if lora_targets else None
        self.decode = decode or (lambda x: x)
        self.world, self.check_prompts = world, check_prompts
        self._unconditional = unconditional
        self.reference: nn.Module | None = None  # the frozen base model, when one is attached
        # a process over token ids (it has a vocabulary) samples tokens; any other (Gaussian,
        # flow) continuous states with Gaussian steps
        kind = TOKENS if getattr(process, "vocab_size", None) is not None else GAUSSIAN
        self.capabilities = frozenset({CHAIN, kind})

    def unconditional(self, prompts: list[str]) -> list[str]:
        """The prompts whose encoding is the unconditional condition of ``prompts`` (CFG's other branch)."""
        return [""] * len(prompts) if self._unconditional is None else list(self._unconditional(list(prompts)))

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def noise(self, seeds: list[int]) -> Tensor:
        """Initial states x_T (the process's prior: Gaussian noise, or all-mask tokens), one
        generator per sample so that a seed names the same sample in any batch."""
        xs = [self.process.prior(self.shape, torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.stack(xs).to(self.device)

    def output(self, x: Tensor) -> Tensor:
        """Samples in the net's space -> decoded outputs, clamped to ``output_range``."""
        y = self.decode(x)
        return y.clamp(*self.output_range) if self.output_range is not None else y

    def step_generators(self, seeds: list[int]) -> list[torch.Generator]:
        """One generator of step noise (a stochastic step: eta > 0, or any masked step) per sample,
        seeded from the sample's seed."""
        return [torch.Generator().manual_seed(int(s) * 7919 + 17) for s in seeds]

    def sample(
        self,
        prompts: list[str],
        seeds: list[int],
        num_inference_steps: int = 20,
        *,
        eta: float | Sequence[float] = 0.0,
        guidance_scale: float = 1.0,
        grad_steps: Collection[int] = (),
        checkpoint: bool = True,
        hook: StepHook | None = None,
        kl: bool = False,
        keep_states: bool = False,
        x_T: Tensor | None = None,
    ) -> Trajectory:
        """Sample one output per (prompt, seed); ``Trajectory.x0`` stays in the net's space.

        A seed names the same sample in any batch, also with eta > 0 (each sample has its
        own noise stream). With a guidance ``hook`` that selects particles, the prompts and
        seeds are the particles' and the trajectory holds the particles kept at the end.
        """
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        cond = self.encode(prompts)
        uncond = self.encode(self.unconditional(prompts)) if guidance_scale != 1.0 else None
        gen = self.step_generators(seeds) if any_stochastic(self.process, eta, num_inference_steps) else None
        ts = self.process.timesteps(num_inference_steps)
        x_T = self.noise(seeds) if x_T is None else x_T
        ref = self.reference if kl else None
        return rollout(
            self.net, self.process, x_T, cond, ts, eta=eta, guidance_scale=guidance_scale, uncond=uncond,
            grad_steps=grad_steps, checkpoint=checkpoint, reference=ref, hook=hook, generator=gen,
            keep_states=keep_states, prompts=prompts,
        )

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], batch_size: int = 64, progress=None, **kwargs) -> Tensor:
        """Decoded images [N, 3, H, W] in [-1, 1], sampled without gradient in batches
        (``progress(k)`` after each batch of k, when given)."""
        out = []
        for i in range(0, len(prompts), batch_size):
            traj = self.sample(prompts[i : i + batch_size], seeds[i : i + batch_size], **kwargs)
            out.append(self.output(traj.x0))
            if progress is not None:
                progress(len(out[-1]))
        return torch.cat(out)
