"""Learned image-text rewards with published weights: LAION aesthetic, CLIP score, PickScore,
HPS v2 and ImageReward.

Every reward takes images as float [B, 3, H, W] in [-1, 1] plus B prompts and returns [B]; all
are differentiable: the preprocessing (bicubic resize of the short side, center crop, CLIP
mean/std) is done in torch. Weights are read from a local ``path``, by default the environment
variable ``REWARDIFF_<NAME>_PATH`` or ``~/.cache/rewardiff/<name>``; the model loads at the first
call and stays on the device of the images it last scored.

What each reward expects on disk:

- ``aesthetic``: ``<path>/sac+logos+ava1-l14-linearMSE.pth`` (the LAION improved aesthetic
  predictor head) and ``<path>/clip-vit-large-patch14/`` (a transformers snapshot of
  ``openai/clip-vit-large-patch14``).
- ``clip-score``: ``<path>/`` a transformers ``CLIPModel`` snapshot with its tokenizer
  (e.g. ``openai/clip-vit-large-patch14``).
- ``pickscore``: ``<path>/`` the ``yuvalkirstain/PickScore_v1`` snapshot with the tokenizer files
  of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` copied in.
- ``hpsv2``: ``<path>/HPS_v2_compressed.pt`` (or ``HPS_v2.1_compressed.pt``, or ``path`` the file
  itself) from ``xswu/HPSv2``, read by ``open_clip``'s ViT-H-14.
- ``imagereward``: ``<path>/ImageReward.pt`` and ``<path>/med_config.json`` from
  ``THUDM/ImageReward``, read by the ``image-reward`` package.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rewardiff.errors import UserError
from rewardiff.rewards.base import RewardFn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

AESTHETIC_HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_CLIP_DIR = "clip-vit-large-patch14"
AESTHETIC_WIDTHS = (1024, 128, 64, 16)  # 768-1024-128-64-16-1
HPS_FILES = ("HPS_v2_compressed.pt", "HPS_v2.1_compressed.pt")
IMAGEREWARD_FILE, IMAGEREWARD_MED_CONFIG = "ImageReward.pt", "med_config.json"
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072
IMAGEREWARD_WIDTHS = (1024, 128, 64, 16)  # BLIP text feature 768-1024-128-64-16-1
IMAGEREWARD_MAX_TOKENS = 35

# ----------------------------------------------------------------------------- shared pieces


def default_path(name: str) -> Path:
    """``$REWARDIFF_<NAME>_PATH`` when set, else ``~/.cache/rewardiff/<name>`` (``clip-score`` -> CLIP_SCORE)."""
    env = f"REWARDIFF_{name.upper().replace('-', '_')}_PATH"
    value = os.environ.get(env)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "rewardiff" / name


def _resolve(name: str, path: str | Path | None) -> Path:
    return Path(path).expanduser() if path is not None else default_path(name)


def clip_preprocess(
    x: Tensor, size: int, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD
) -> Tensor:
    """CLIP's image transform in torch, differentiable. x [B, 3, H, W] in [-1, 1] -> [B, 3, size, size]

    The short side is resized to ``size`` (bicubic, antialiased when shrinking), the center
    ``size`` x ``size`` crop is kept, and the result normalized with ``mean``/``std`` of [0, 1] pixels.
    """
    x = (x.float() + 1) / 2
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        try:
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=scale < 1)
        except (NotImplementedError, RuntimeError):  # backends without antialiased bicubic
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size]
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def _features(out: Any) -> Tensor:
    """Projected features from ``get_*_features``: a tensor (transformers 4) or an output whose
    ``pooler_output`` holds them (transformers 5)."""
    return out if isinstance(out, Tensor) else out.pooler_output


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _to(module: nn.Module, x: Tensor) -> nn.Module:
    """Move ``module`` to ``x``'s device when it is elsewhere."""
    p = next(module.parameters(), None)
    if p is not None and p.device != x.device:
        module.to(x.device)
    return module


def _lazy(load: Callable[[], Any], score: Callable[[Any, Tensor, list[str]], Tensor]) -> Callable[[Tensor, list[str]], Tensor]:
    """``score(model, x, prompts)`` with ``model = load()`` run once, at the first call."""
    cache: dict[str, Any] = {}

    def fn(x: Tensor, prompts: list[str]) -> Tensor:
        if "model" not in cache:
            cache["model"] = load()
        return score(cache["model"], x, prompts)

    fn.cache = cache  # type: ignore[attr-defined]
    return fn


def _need(model: str, found: bool, what: str, where: str, name: str) -> None:
    """Raise the one-line ``UserError`` for missing weights."""
    if not found:
        env = f"REWARDIFF_{name.upper().replace('-', '_')}_PATH"
        raise UserError(f"{model} weights not found: expected {what}; get them from {where} (or pass path=..., or set {env})")


def _hf_folder_ok(d: Path) -> bool:
    return d.is_dir() and (d / "config.json").is_file()


class _Clip:
    """A transformers ``CLIPModel`` and its tokenizer, loaded from a local folder."""

    def __init__(self, folder: Path, tokenizer: bool = True):
        from transformers import CLIPModel, CLIPTokenizer

        self.model = _freeze(CLIPModel.from_pretrained(str(folder)))
        self.tokenizer = CLIPTokenizer.from_pretrained(str(folder)) if tokenizer else None
        self.size = int(self.model.config.vision_config.image_size)
        self.mean, self.std = _processor_stats(folder)

    def image_embeds(self, x: Tensor) -> Tensor:
        """Unnormalized projected image embeddings. x [B, 3, H, W] in [-1, 1] -> [B, D]"""
        model = _to(self.model, x)
        pixels = clip_preprocess(x, self.size, self.mean, self.std).to(model.dtype)
        return _features(model.get_image_features(pixel_values=pixels))

    def text_embeds(self, prompts: list[str], device: torch.device) -> Tensor:
        """Unnormalized projected text embeddings. B prompts -> [B, D]"""
        max_len = min(int(self.tokenizer.model_max_length), int(self.model.config.text_config.max_position_embeddings))
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
        return _features(self.model.get_text_features(input_ids=tok.input_ids.to(device), attention_mask=tok.attention_mask.to(device)))


def _processor_stats(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """image_mean / image_std from ``preprocessor_config.json`` when the folder has one, else CLIP's."""
    f = folder / "preprocessor_config.json"
    if f.is_file():
        cfg = json.loads(f.read_text())
        return tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD))
    return CLIP_MEAN, CLIP_STD


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine similarity. [B, D], [B, D] -> [B]"""
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)


# ----------------------------------------------------------------------------- MLP heads


class MLPHead(nn.Module):
    """The MLP of the LAION aesthetic predictor and of ImageReward: ``layers`` = Linear, Dropout,
    Linear, Dropout, Linear, Dropout, Linear, Linear (no activations), so its state dict reads
    ``layers.{0,2,4,6,7}.{weight,bias}``. in_dim -> 1024 -> 128 -> 64 -> 16 -> 1
    """

    def __init__(self, in_dim: int, widths: tuple[int, ...] = AESTHETIC_WIDTHS, dropout: tuple[float, ...] = (0.2, 0.2, 0.1)):
        super().__init__()
        mods: list[nn.Module] = []
        dims = (in_dim, *widths)
        for i in range(len(widths)):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dropout):
                mods.append(nn.Dropout(dropout[i]))
        mods.append(nn.Linear(dims[-1], 1))
        self.layers = nn.Sequential(*mods)

    def forward(self, z: Tensor) -> Tensor:
        """[B, in_dim] -> [B, 1]"""
        return self.layers(z)


def head_from_state_dict(state: dict[str, Tensor]) -> MLPHead:
    """An ``MLPHead`` shaped by, and loaded from, a state dict in the published layout (strict)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    linear = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.endswith(".weight")})
    if not linear or any(state[f"layers.{i}.weight"].ndim != 2 for i in linear):
        raise UserError(f"not an aesthetic/ImageReward MLP state dict (keys: {sorted(state)[:6]}...)")
    in_dim = state[f"layers.{linear[0]}.weight"].shape[1]
    widths = tuple(state[f"layers.{i}.weight"].shape[0] for i in linear[:-1])
    head = MLPHead(in_dim, widths)
    head.load_state_dict(state)
    return head


# ----------------------------------------------------------------------------- aesthetic


class Aesthetic:
    """CLIP image embedding, L2-normalized, into the LAION aesthetic MLP: a 1-10 score."""

    def __init__(self, folder: Path):
        self.clip = _Clip(folder / AESTHETIC_CLIP_DIR, tokenizer=False)
        state = torch.load(folder / AESTHETIC_HEAD_FILE, map_location="cpu", weights_only=True)
        self.head = _freeze(head_from_state_dict(state))

    def __call__(self, x: Tensor, prompts: list[str]) -> Tensor:
        """x [B, 3, H, W] in [-1, 1] -> [B]"""
        z = F.normalize(self.clip.image_embeds(x).float(), dim=-1)
        return _to(self.head, z)(z)[:, 0]


def _aesthetic_files(folder: Path) -> bool:
    return (folder / AESTHETIC_HEAD_FILE).is_file() and _hf_folder_ok(folder / AESTHETIC_CLIP_DIR)


def aesthetic(path: str | Path | None = None) -> RewardFn:
    """LAION aesthetic predictor v2 (CLIP ViT-L/14 + MLP), about 1-10."""
    folder = _resolve("aesthetic", path)
    _need(
        "LAION aesthetic predictor", _aesthetic_files(folder),
        f"{folder / AESTHETIC_HEAD_FILE} and a transformers snapshot of openai/clip-vit-large-patch14 in {folder / AESTHETIC_CLIP_DIR}",
        "github.com/christophschuhmann/improved-aesthetic-predictor and huggingface.co/openai/clip-vit-large-patch14",
        "aesthetic",
    )
    return RewardFn(
        "aesthetic", True, None, "LAION aesthetic predictor v2: CLIP ViT-L/14 embedding into an MLP (about 1-10)",
        _lazy(lambda: Aesthetic(folder), lambda m, x, p: m(x, p)),
    )


# ----------------------------------------------------------------------------- clip-score and pickscore


def clip_score_fn(clip: _Clip, x: Tensor, prompts: list[str], scale: float | None = 100.0) -> Tensor:
    """``scale`` x cosine(image embedding, text embedding); ``scale=None`` uses the model's
    ``logit_scale.exp()`` (PickScore). x [B, 3, H, W] in [-1, 1] -> [B]"""
    img = clip.image_embeds(x)
    txt = clip.text_embeds(prompts, x.device)
    c = cosine(img, txt)
    return c * (clip.model.logit_scale.exp().float() if scale is None else scale)


def clip_score(path: str | Path | None = None, scale: float | None = 100.0) -> RewardFn:
    """CLIP score: 100 x cosine of CLIP image and prompt embeddings (scale=None: the logit scale)."""
    folder = _resolve("clip-score", path)
    _need(
        "CLIP (clip-score)", _hf_folder_ok(folder),
        f"a transformers CLIPModel snapshot with its tokenizer files (config.json, model.safetensors, tokenizer.json or vocab.json + merges.txt) in {folder}",
        "huggingface.co/openai/clip-vit-large-patch14",
        "clip-score",
    )
    return RewardFn(
        "clip-score", True, None, "CLIP score: 100 x cosine(CLIP image embedding, prompt embedding)",
        _lazy(lambda: _Clip(folder), lambda m, x, p: clip_score_fn(m, x, p, scale)),
    )


def pickscore(path: str | Path | None = None) -> RewardFn:
    """PickScore v1 (CLIP ViT-H/14 fine-tuned on Pick-a-Pic): logit scale x cosine."""
    folder = _resolve("pickscore", path)
    _need(
        "PickScore_v1", _hf_folder_ok(folder),
        f"the transformers snapshot of yuvalkirstain/PickScore_v1 plus the tokenizer files of laion/CLIP-ViT-H-14-laion2B-s32B-b79K in {folder}",
        "huggingface.co/yuvalkirstain/PickScore_v1 and huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        "pickscore",
    )
    return RewardFn(
        "pickscore", True, None, "PickScore v1: CLIP ViT-H/14 logit scale x cosine(image, prompt)",
        _lazy(lambda: _Clip(folder), lambda m, x, p: clip_score_fn(m, x, p, None)),
    )


# ----------------------------------------------------------------------------- HPS v2


def _hps_file(path: Path) -> Path | None:
    if path.is_file():
        return path
    return next((path / f for f in HPS_FILES if (path / f).is_file()), None)


class HPSv2:
    """open_clip ViT-H-14 with the HPS v2 checkpoint; the score is the cosine of image and prompt."""

    def __init__(self, checkpoint: Path):
        import open_clip

        model = open_clip.create_model("ViT-H-14", pretrained=None, precision="fp32", device="cpu")
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        self.model = _freeze(model)
        self.tokenizer = open_clip.get_tokenizer("ViT-H-14")
        self.size = int(model.visual.image_size[0] if isinstance(model.visual.image_size, (tuple, list)) else model.visual.image_size)

    def __call__(self, x: Tensor, prompts: list[str]) -> Tensor:
        """x [B, 3, H, W] in [-1, 1] -> [B]"""
        model = _to(self.model, x)
        img = model.encode_image(clip_preprocess(x, self.size))
        txt = model.encode_text(self.tokenizer(list(prompts)).to(x.device))
        return hps_score(img, txt)


def hps_score(image_features: Tensor, text_features: Tensor) -> Tensor:
    """HPS v2's score: the diagonal of normalized image @ text features (no logit scale). -> [B]"""
    return cosine(image_features, text_features)


def hpsv2(path: str | Path | None = None) -> RewardFn:
    """HPS v2 (open_clip ViT-H-14 fine-tuned on human preferences): cosine(image, prompt)."""
    folder = _resolve("hpsv2", path)
    where = f"{HPS_FILES[0]} (or {HPS_FILES[1]}) from huggingface.co/xswu/HPSv2 in {folder}"
    try:
        import open_clip  # noqa: F401
    except ImportError:
        raise UserError(f"HPS v2 needs open_clip: pip install open-clip-torch, then put {where}") from None
    ckpt = _hps_file(folder)
    _need("HPS v2", ckpt is not None, where, "huggingface.co/xswu/HPSv2", "hpsv2")
    return RewardFn(
        "hpsv2", True, None, "HPS v2: cosine of open_clip ViT-H-14 image and prompt embeddings",
        _lazy(lambda: HPSv2(ckpt), lambda m, x, p: m(x, p)),
    )


# ----------------------------------------------------------------------------- ImageReward


def imagereward_head_score(head: nn.Module, features: Tensor, mean: float = IMAGEREWARD_MEAN, std: float = IMAGEREWARD_STD) -> Tensor:
    """ImageReward's last step: the MLP on BLIP's [CLS] text feature, standardized. [B, 768] -> [B]"""
    return ((head(features) - mean) / std)[:, 0]


def imagereward_fn(model: Any, x: Tensor, prompts: list[str]) -> Tensor:
    """ImageReward, differentiable: BLIP image embeddings cross-attended by the prompt's BERT
    encoder, its [CLS] feature into the MLP, standardized. ``model`` is an ``ImageReward.ImageReward``
    (``.blip.visual_encoder``, ``.blip.text_encoder``, ``.blip.tokenizer``, ``.mlp``, ``.mean``, ``.std``).
    x [B, 3, H, W] in [-1, 1] -> [B]"""
    model = _to(model, x)
    size = int(getattr(model.blip.visual_encoder, "img_size", 224) or 224)
    image_embeds = model.blip.visual_encoder(clip_preprocess(x, size))
    image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=x.device)
    tok = model.blip.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=IMAGEREWARD_MAX_TOKENS, return_tensors="pt")
    out = model.blip.text_encoder(
        tok.input_ids.to(x.device), attention_mask=tok.attention_mask.to(x.device),
        encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts, return_dict=True,
    )
    return imagereward_head_score(model.mlp, out.last_hidden_state[:, 0, :], float(model.mean), float(model.std))


def _load_imagereward(folder: Path) -> Any:
    """The ``image-reward`` package's model from local files (its ``load`` names the BLIP config
    ``med_config`` or ``med_config_path`` depending on the version; old ones have neither)."""
    import ImageReward as RM

    ckpt, med = str(folder / IMAGEREWARD_FILE), str(folder / IMAGEREWARD_MED_CONFIG)
    params = inspect.signature(RM.load).parameters
    for key in ("med_config", "med_config_path"):
        if key in params:
            return _freeze(RM.load(ckpt, device="cpu", **{key: med}))
    from ImageReward.ImageReward import ImageReward as Net

    net = Net(med_config=med, device="cpu")
    net.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False), strict=False)
    return _freeze(net)


def imagereward(path: str | Path | None = None) -> RewardFn:
    """ImageReward v1.0 (BLIP + MLP trained on human rankings), standardized."""
    folder = _resolve("imagereward", path)
    where = f"{IMAGEREWARD_FILE} and {IMAGEREWARD_MED_CONFIG} from huggingface.co/THUDM/ImageReward in {folder}"
    try:
        import ImageReward  # noqa: F401
    except ImportError:
        raise UserError(f"ImageReward needs its package: pip install image-reward, then put {where}") from None
    found = (folder / IMAGEREWARD_FILE).is_file() and (folder / IMAGEREWARD_MED_CONFIG).is_file()
    _need("ImageReward", found, where, "huggingface.co/THUDM/ImageReward", "imagereward")
    return RewardFn(
        "imagereward", True, None, "ImageReward v1.0: BLIP image-text encoder into an MLP, standardized",
        _lazy(lambda: _load_imagereward(folder), imagereward_fn),
    )


# ----------------------------------------------------------------------------- tiny random builders (tests)


def tiny_clip(directory: str | Path, seed: int = 0, projection_dim: int = 16) -> Path:
    """Save a random tiny transformers ``CLIPModel`` (vision: hidden 32, patch 8, image 32; text:
    hidden 32; 2 layers each) and a byte-level ``CLIPTokenizer`` built offline, in ``directory``."""
    from transformers import CLIPConfig, CLIPModel

    from rewardiff.models.sd import byte_tokenizer

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tokenizer = byte_tokenizer(d, 77)
    tokenizer.save_pretrained(str(d))
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=projection_dim,
    )
    CLIPModel(config).eval().save_pretrained(str(d))
    return d


def aesthetic_state_dict(in_dim: int = 768, seed: int = 0) -> dict[str, Tensor]:
    """A random aesthetic head's state dict in the published layout (``layers.{0,2,4,6,7}``)."""
    torch.manual_seed(seed)
    return MLPHead(in_dim).state_dict()


def tiny_aesthetic(directory: str | Path, seed: int = 0) -> Path:
    """Save a tiny random CLIP in ``<dir>/clip-vit-large-patch14`` and a random aesthetic head
    (published key layout, input width the tiny CLIP's projection) as ``<dir>/sac+logos+ava1-l14-linearMSE.pth``."""
    d = Path(directory)
    tiny_clip(d / AESTHETIC_CLIP_DIR, seed=seed, projection_dim=16)
    torch.save(aesthetic_state_dict(16, seed), d / AESTHETIC_HEAD_FILE)
    return d
