"""The registries through which the core reaches every plug-in, world code included.

Each registry is a plain dict from a name to a ``"package.module:attribute"`` string, imported
only when the name is used (:func:`load`), so that a world registers itself here by name
without the core importing it, and importing :mod:`rewardiff.rewards` imports no RDKit. Add an
entry to plug in your own: ``plugins.MODELS["mine"] = "mypkg.models:load"``.

Registries:
    MODELS: model name -> ``loader(directory: str | None) -> Generator``.
    MODEL_DIRS: world name -> ``is_dir(directory) -> bool``, ``loader(directory)``: who reads a
        saved model folder, in order (the first whose test passes loads it).
    MODEL_PREFIXES: ``scheme:`` -> ``loader(rest)`` (``diffusers:DIR``, ``hf:DIR``).
    REWARDS: reward name -> (``factory(**options) -> Reward``, differentiable, description).
    REWARD_STATS: world name -> ``stats(name) -> (mean, std) | None``, for ``z(name)``.
    PROMPT_SETS: prompt set name -> ``prompts() -> list[str]``.
    EVALUATIONS: world name -> ``hook(model, outputs, prompts, reward_name) -> Evaluation | None``,
        called on every evaluation; a hook answers None where its world does not apply.
    TEXT_GRIDS: world name -> ``save(texts, path, legends=None)``: a picture of text outputs
        (molecules drawn from their SMILES), for models of that world (``model.world``).
    TOKENIZERS: tokenizer name -> ``tokenizer(path: str | None) -> tokenizer``.
    PRETRAIN: world model name -> ``pretrain(out: Path, steps: int | None, seed: int, overrides: dict) -> str``
        (trains, exports to ``out/model`` with its card, returns one line for the user).
    REWARD_TRAINERS: world name -> ``train(out, steps, seed, base_samples) -> card``
        (``rewardiff train-reward``).
    EVALUATION_SUITES: suite name -> ``run(out, model, checkpoint, split, n, steps, guidance_scale,
        eta, seed) -> str`` (``rewardiff eval SUITE``: samples, judges, writes OUT, returns what to print).
    FEATURE_DISTANCES: name -> ``factory() -> distance(x, y) -> [B]``: image distances of a world
        (over its reward model's features), for ``rewardiff distill``'s visual consistency.
    JUDGES_3D: world name -> ``judge(views [V, 3, H, W], text) -> dict of figures``: how
        ``rewardiff distill`` reads a distilled scene's turntable (count, colours, consistency).
    PROMPT_FEATURES: world name -> ``features(prompts) -> ndarray [P, d]``: prompts as context vectors
        (``rewardiff tune``); a ValueError names a prompt that is not the world's.
    IMAGE_SOURCES: scheme -> an object with ``low_res(key)`` and ``ground_truth(key)``: images
        that prompts reference (``"shapes-sr:held-out/3"``), see :mod:`rewardiff.conditions`.
"""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple

from rewardiff.errors import UserError

MODELS: dict[str, str] = {
    "shapes": "rewardiff.worlds.shapes.denoiser:shapes_model",
    "shapes-flow": "rewardiff.worlds.shapes.denoiser:shapes_flow_model",
    "shapes-geneval": "rewardiff.worlds.shapes.denoiser:shapes_geneval_model",
    "molecules": "rewardiff.worlds.molecules.masked:molecules_model",
    "molecules-ar": "rewardiff.worlds.molecules.autoregressive:molecules_ar_model",
    "shapes-video": "rewardiff.worlds.video.denoiser:video_model",
    "shapes-sr": "rewardiff.worlds.superres.model:shapes_sr_model",
    "shapes-3d": "rewardiff.worlds.shapes3d.prior:shapes3d_model",
}

MODEL_DIRS: dict[str, tuple[str, str]] = {
    "molecules-ar": ("rewardiff.worlds.molecules.autoregressive:is_ar_dir", "rewardiff.worlds.molecules.autoregressive:molecules_ar_model"),
    "molecules": ("rewardiff.worlds.molecules.masked:is_masked_dir", "rewardiff.worlds.molecules.masked:molecules_model"),
    "video": ("rewardiff.worlds.video.denoiser:is_video_dir", "rewardiff.worlds.video.denoiser:video_model"),
    "superres": ("rewardiff.worlds.superres.model:is_sr_dir", "rewardiff.worlds.superres.model:shapes_sr_model"),
    "shapes3d": ("rewardiff.worlds.shapes3d.prior:is_shapes3d_dir", "rewardiff.worlds.shapes3d.prior:shapes3d_model"),
    "shapes": ("rewardiff.worlds.shapes.denoiser:is_shapes_dir", "rewardiff.worlds.shapes.denoiser:shapes_model"),
}

MODEL_PREFIXES: dict[str, str] = {
    "diffusers:": "rewardiff.models.sd:sd_model",
    "hf:": "rewardiff.models.hf:hf_model",
}


class RewardEntry(NamedTuple):
    """A registered reward: its factory, and what ``rewardiff rewards`` lists without building it."""

    factory: str  # "package.module:function", called with the reward's options
    differentiable: bool
    description: str


_SHAPES_RM = "rewardiff.worlds.shapes.reward_model"
_CHEM = "rewardiff.worlds.molecules.chem"
_CHEM_RM = "rewardiff.worlds.molecules.reward_model"
_VISION = "rewardiff.rewards.vision"
_FIDELITY = "rewardiff.rewards.fidelity"
_PERCEPTUAL = "rewardiff.rewards.perceptual"
_SHAPES_FEAT = "rewardiff.worlds.shapes.feature_rewards"
_GENEVAL = "rewardiff.worlds.shapes.geneval_suite"
_VIDEO = "rewardiff.worlds.video.evaluate"
_SR = "rewardiff.worlds.superres.rewards"

REWARDS: dict[str, RewardEntry] = {
    # plain image rewards
    "brightness": RewardEntry("rewardiff.rewards.image:brightness", True, "Mean luminance (ITU-R BT.601) in [0, 1]."),
    "saturation": RewardEntry("rewardiff.rewards.image:saturation", True, "Mean HSV saturation in [0, 1]."),
    "jpeg-compressibility": RewardEntry("rewardiff.rewards.image:jpeg_compressibility", False,
                                        "Minus the JPEG size in kB at quality 95, as in DDPO."),
    "jpeg-incompressibility": RewardEntry("rewardiff.rewards.image:jpeg_incompressibility", False,
                                          "The JPEG size in kB at quality 95, as in DDPO."),
    # learned vision rewards (weights read from disk, never downloaded)
    "aesthetic": RewardEntry(f"{_VISION}:aesthetic", True, "LAION aesthetic predictor v2 (CLIP ViT-L/14 + MLP), about 1-10."),
    "clip-score": RewardEntry(f"{_VISION}:clip_score", True,
                              "CLIP score: 100 x cosine of CLIP image and prompt embeddings (scale=None: the logit scale)."),
    "pickscore": RewardEntry(f"{_VISION}:pickscore", True, "PickScore v1 (CLIP ViT-H/14 fine-tuned on Pick-a-Pic): logit scale x cosine."),
    "hpsv2": RewardEntry(f"{_VISION}:hpsv2", True, "HPS v2 (open_clip ViT-H-14 fine-tuned on human preferences): cosine(image, prompt)."),
    "imagereward": RewardEntry(f"{_VISION}:imagereward", True, "ImageReward v1.0 (BLIP + MLP trained on human rankings), standardized."),
    # fidelity to an image-conditioned prompt's references (rewardiff.conditions: "TEXT | SCHEME:KEY")
    "psnr": RewardEntry(f"{_FIDELITY}:psnr_reward", True, "PSNR in dB against the prompt's ground truth image (pixels read as [0, 1])."),
    "psnr-lr": RewardEntry(f"{_FIDELITY}:psnr_lr", True, "PSNR in dB of the output area-averaged down to the low-resolution input, against that input."),
    "ssim": RewardEntry(f"{_FIDELITY}:ssim_reward", True, "SSIM (11x11 Gaussian window, sigma 1.5) against the prompt's ground truth image."),
    "lpips": RewardEntry(f"{_PERCEPTUAL}:lpips", True,
                         "Minus LPIPS v0.1 (torchvision VGG16 or AlexNet + the lpips heads; net=, path=, against=gt|lr)."),
    "dists": RewardEntry(f"{_PERCEPTUAL}:dists", True,
                         "Minus DISTS (torchvision VGG16 with L2 pooling + DISTS's alpha/beta; path=, against=gt|lr)."),
    # a vision-language model over HTTP (the spec openai:MODEL@URL; by name it takes model= and url=)
    "openai": RewardEntry("rewardiff.rewards.remote:openai_reward", False,
                          "Remote vision-language judge over an OpenAI-compatible chat API (vLLM, SGLang): openai:MODEL@URL."),
    # the shapes world
    "shapes-count": RewardEntry(f"{_SHAPES_RM}:shapes_count", True,
                                "Shapes world: log p(asked object count) from the learned reward model, clamped at log 0.02."),
    "shapes-color": RewardEntry(f"{_SHAPES_RM}:shapes_color", True,
                                "Shapes world: log p(asked color) from the learned reward model, clamped at log 0.02."),
    "lpips-shapes": RewardEntry(f"{_SHAPES_FEAT}:lpips_shapes", True,
                                "Shapes world: minus the LPIPS-style distance over the reward model's features, to the ground truth."),
    "lpips-shapes-lr": RewardEntry(f"{_SHAPES_FEAT}:lpips_shapes_lr", True,
                                   "Shapes world: minus the LPIPS-style distance over the reward model's features, to the low-res input."),
    "dists-shapes": RewardEntry(f"{_SHAPES_FEAT}:dists_shapes", True,
                                "Shapes world: minus the DISTS-style distance over the reward model's features, to the ground truth."),
    "dists-shapes-lr": RewardEntry(f"{_SHAPES_FEAT}:dists_shapes_lr", True,
                                   "Shapes world: minus the DISTS-style distance over the reward model's features, to the low-res input."),
    "shapes-ensemble": RewardEntry("rewardiff.worlds.shapes.stats:shapes_ensemble", False,
                                   "shapes world: 0.7*z(shapes-count)+0.3*z(jpeg-compressibility), each standardized on base-model samples"),
    "geneval-shapes": RewardEntry(f"{_GENEVAL}:geneval_shapes", False,
                                  "Shapes world: GenEval's rules read by the classical judge; flow_grpo's partial credit in [0, 1] (strict=True: 1/0)."),
    "geneval-shapes-strict": RewardEntry(f"{_GENEVAL}:geneval_shapes_strict", False,
                                         "Shapes world: 1 when GenEval's rules hold for the classical judge's reading, else 0."),
    "geneval-shapes-rm": RewardEntry("rewardiff.worlds.shapes.geneval_rm:geneval_shapes_rm", True,
                                     "Shapes world, GenEval grammar: the learned CNN's stand-in for the judge's partial credit, log(0.02 + 0.98 p) a requirement, averaged (differentiable)."),
    # the video world
    "video-judge": RewardEntry(f"{_VIDEO}:video_judge", False,
                               "Video world: the classical judge's partial credit (count, colour, direction, consistency) in [0, 1]."),
    "video-judge-strict": RewardEntry(f"{_VIDEO}:video_judge_strict", False,
                                      "Video world: 1 when the classical judge reads count, colour, direction and every frame right, else 0."),
    "video-frames-count": RewardEntry("rewardiff.worlds.video.frame_rewards:frames_count", True,
                                      "Video world: the shapes count reward on each frame image (use keyframes(video-frames-count) on clips)."),
    # the 3D shapes world (renders of a scene; a prompt's camera reference is ignored)
    "shapes3d-count": RewardEntry("rewardiff.worlds.shapes3d.reward_model:shapes3d_count", True,
                                  "3D shapes world: sum over colours of log(0.02 + 0.98 p(asked count of that colour)) from the learned CNN."),
    # the super-resolution world (prompts name their input: shapes-sr:held-out/3)
    "sr-hallucination": RewardEntry(f"{_SR}:sr_hallucination", False,
                                    "Super-resolution world: minus the judge's hallucination count against the ground truth."),
    "sr-hallucination-lr": RewardEntry(f"{_SR}:sr_hallucination_lr", False,
                                       "Super-resolution world: minus the hallucinations the low-resolution input shows (output degraded, compared)."),
    # the molecules world
    "qed": RewardEntry(f"{_CHEM}:qed", False, "Molecules: QED drug-likeness in [0, 1] from RDKit (0 for an empty molecule)."),
    "sa": RewardEntry(f"{_CHEM}:sa", False, "Molecules: synthetic accessibility flipped to (10 - SA) / 9 in [0, 1], higher is easier."),
    "logp": RewardEntry(f"{_CHEM}:logp", False, "Molecules: Crippen logP clipped to [-10, 10] (-10 for an empty molecule)."),
    "qed-sa": RewardEntry(f"{_CHEM}:qed_sa", False, "molecules: 0.5*qed+0.5*sa, in [0, 1]"),
    "chem-rm-qed": RewardEntry(f"{_CHEM_RM}:chem_rm_qed", True, "Molecules: the reward model's QED prediction (differentiable)."),
    "chem-rm-sa": RewardEntry(f"{_CHEM_RM}:chem_rm_sa", True, "Molecules: the reward model's (10 - SA) / 9 prediction (differentiable)."),
    "chem-rm-logp": RewardEntry(f"{_CHEM_RM}:chem_rm_logp", True, "Molecules: the reward model's Crippen logP prediction (differentiable)."),
    "chem-rm": RewardEntry(f"{_CHEM_RM}:chem_rm", True, "Molecules: weighted reward-model heads, by default 0.5 qed + 0.5 sa (differentiable)."),
}

REWARD_STATS: dict[str, str] = {
    "shapes": "rewardiff.worlds.shapes.stats:recorded_stats",
}

PROMPT_SETS: dict[str, str] = {
    "train": "rewardiff.worlds.shapes.data:train_prompts",
    "held-out": "rewardiff.worlds.shapes.data:held_out_prompts",
    "all": "rewardiff.worlds.shapes.data:all_prompts",
    "geneval-train": "rewardiff.worlds.shapes.compositions:train_prompts",
    "geneval-held-out": "rewardiff.worlds.shapes.compositions:held_out_prompts",
    "geneval-all": "rewardiff.worlds.shapes.compositions:all_prompts",
    "video-train": "rewardiff.worlds.video.data:train_prompts",
    "video-held-out": "rewardiff.worlds.video.data:held_out_prompts",
    "video-all": "rewardiff.worlds.video.data:all_prompts",
    "animals": "rewardiff.prompts:animals",
    "animals-held-out": "rewardiff.prompts:animals_held_out",
    "sr-train": "rewardiff.worlds.superres.data:train_prompts",
    "sr-held-out": "rewardiff.worlds.superres.data:held_out_prompts",
    "3d-train": "rewardiff.worlds.shapes3d.data:train_prompts",
    "3d-held-out": "rewardiff.worlds.shapes3d.data:held_out_prompts",
    "3d-all": "rewardiff.worlds.shapes3d.data:all_prompts",
}

EVALUATIONS: dict[str, str] = {
    "shapes": "rewardiff.worlds.shapes.evaluate:judge_hook",
    "molecules": "rewardiff.worlds.molecules.evaluate:chemistry_hook",
    "video": "rewardiff.worlds.video.evaluate:judge_hook",
    "superres": "rewardiff.worlds.superres.evaluate:hallucination_hook",
}

TEXT_GRIDS: dict[str, str] = {
    "molecules": "rewardiff.worlds.molecules.draw:save_molecule_grid",
}

TOKENIZERS: dict[str, str] = {
    "molecules": "rewardiff.worlds.molecules.data:tokenizer_at",
}

PRETRAIN: dict[str, str] = {
    "shapes": "rewardiff.worlds.shapes.pretrain:pretrain_command",
    "shapes-flow": "rewardiff.worlds.shapes.pretrain:pretrain_flow_command",
    "shapes-geneval": "rewardiff.worlds.shapes.pretrain:pretrain_geneval_command",
    "molecules": "rewardiff.worlds.molecules.pretrain_masked:pretrain_command",
    "molecules-ar": "rewardiff.worlds.molecules.pretrain_ar:pretrain_command",
    "shapes-video": "rewardiff.worlds.video.pretrain:pretrain_command",
    "shapes-sr": "rewardiff.worlds.superres.pretrain:pretrain_command",
    "shapes-3d": "rewardiff.worlds.shapes3d.pretrain:pretrain_command",
}

REWARD_TRAINERS: dict[str, str] = {
    "shapes": "rewardiff.worlds.shapes.reward_training:train_with_base_samples",
    "shapes3d": "rewardiff.worlds.shapes3d.reward_model:train_command",
    "shapes-geneval": "rewardiff.worlds.shapes.geneval_rm:train_command",
}

EVALUATION_SUITES: dict[str, str] = {
    "geneval-shapes": f"{_GENEVAL}:eval_command",
}

FEATURE_DISTANCES: dict[str, str] = {
    "lpips-shapes": "rewardiff.worlds.shapes.feature_rewards:lpips_shapes_distance",
    "dists-shapes": "rewardiff.worlds.shapes.feature_rewards:dists_shapes_distance",
}

JUDGES_3D: dict[str, str] = {
    "shapes3d": "rewardiff.worlds.shapes3d.judge:multiview",
}

PROMPT_FEATURES: dict[str, str] = {
    "shapes": "rewardiff.worlds.shapes.data:prompt_features",
}

IMAGE_SOURCES: dict[str, str] = {
    "shapes-sr": "rewardiff.worlds.superres.data:SOURCE",
}


def load(target: str) -> Any:
    """The object a ``"package.module:attribute"`` string names (the attribute may be dotted).

    Raises:
        UserError: a module that cannot be imported or a missing attribute.
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"{target!r} must look like package.module:attribute")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:  # ModuleNotFoundError included
        raise UserError(f"cannot import module {module_name!r} ({target}): {e}") from e
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise UserError(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj


def lookup(registry: dict[str, Any], name: str, kind: str) -> Any:
    """``registry[name]``, or a one-line UserError naming the valid names of this ``kind``."""
    if name not in registry:
        raise UserError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(registry)}")
    return registry[name]


def resolve(registry: dict[str, str], name: str, kind: str) -> Any:
    """The object registered under ``name`` (imported now); UserError for an unknown name."""
    return load(lookup(registry, name, kind))
