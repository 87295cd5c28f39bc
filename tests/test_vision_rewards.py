"""Learned image-text rewards on tiny random models of the published architectures."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rewardiff.errors import UserError
from rewardiff.rewards import get_reward, list_rewards
from rewardiff.rewards import vision as V

PROMPTS = ["a red cat on a mat", "two blue squares"]
PUBLISHED_AESTHETIC_SHAPES = {
    "layers.0.weight": (1024, 768), "layers.0.bias": (1024,),
    "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
    "layers.4.weight": (64, 128), "layers.4.bias": (64,),
    "layers.6.weight": (16, 64), "layers.6.bias": (16,),
    "layers.7.weight": (1, 16), "layers.7.bias": (1,),
}


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> Path:
    return V.tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def aesthetic_dir(tmp_path_factory) -> Path:
    return V.tiny_aesthetic(tmp_path_factory.mktemp("tiny-aesthetic"))


def images(b: int = 2, h: int = 40, w: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 3, h, w, generator=g) * 2 - 1).requires_grad_(True)


def check_scores_and_grad(reward, x: torch.Tensor) -> torch.Tensor:
    r = reward(x, PROMPTS[: x.shape[0]])
    assert r.shape == (x.shape[0],) and torch.isfinite(r).all()
    (grad,) = torch.autograd.grad(r.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    return r


def test_registered_and_differentiable():
    rows = {name: flag for name, flag, _ in list_rewards()}
    for name in ("aesthetic", "clip-score", "pickscore", "hpsv2", "imagereward"):
        assert rows[name] is True


@pytest.mark.parametrize("h, w", [(40, 64), (16, 24), (32, 32)])
def test_preprocess_shape_and_grad(h, w):
    x = images(2, h, w)
    p = V.clip_preprocess(x, 32)
    assert p.shape == (2, 3, 32, 32)
    (g,) = torch.autograd.grad(p.sum(), x)
    assert g.abs().sum() > 0
    gray = torch.zeros(1, 3, 32, 32)  # mid-gray 0.5 maps to (0.5 - mean) / std exactly
    expected = (0.5 - torch.tensor(V.CLIP_MEAN)) / torch.tensor(V.CLIP_STD)
    assert torch.allclose(V.clip_preprocess(gray, 32)[0, :, 5, 5], expected, atol=1e-6)


# ----------------------------------------------------------------------------- aesthetic


def test_aesthetic_head_published_layout():
    torch.manual_seed(0)
    state = {k: torch.randn(shape) for k, shape in PUBLISHED_AESTHETIC_SHAPES.items()}
    head = V.head_from_state_dict(state).eval()
    assert set(V.MLPHead(768).state_dict()) == set(PUBLISHED_AESTHETIC_SHAPES)
    assert {k: tuple(v.shape) for k, v in V.aesthetic_state_dict(768).items()} == PUBLISHED_AESTHETIC_SHAPES
    z = torch.randn(3, 768)
    h = z
    for i in (0, 2, 4, 6, 7):  # Linear layers only, no activations, dropout off in eval
        h = h @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    assert torch.allclose(head(z), h, rtol=1e-4, atol=1e-3)
    with pytest.raises(UserError):
        V.head_from_state_dict({"fc.weight": torch.zeros(2, 2)})


def test_aesthetic_through_registry(aesthetic_dir):
    reward = get_reward("aesthetic", path=aesthetic_dir)
    assert reward.fn.cache == {}  # loads lazily, at first call
    r = check_scores_and_grad(reward, images())
    # by hand: L2-normalized CLIP image embedding into the head
    m = reward.fn.cache["model"]
    with torch.no_grad():
        x = images()
        z = F.normalize(V._features(m.clip.model.get_image_features(pixel_values=V.clip_preprocess(x, 32))), dim=-1)
        assert torch.allclose(r.detach(), m.head(z)[:, 0], atol=1e-5)


def test_aesthetic_default_path_from_env(aesthetic_dir, monkeypatch):
    monkeypatch.setenv("REWARDIFF_AESTHETIC_PATH", str(aesthetic_dir))
    assert V.default_path("aesthetic") == aesthetic_dir
    assert get_reward("aesthetic")(images().detach(), PROMPTS).shape == (2,)
    monkeypatch.delenv("REWARDIFF_CLIP_SCORE_PATH", raising=False)
    assert V.default_path("clip-score") == Path.home() / ".cache" / "rewardiff" / "clip-score"


# ----------------------------------------------------------------------------- clip-score, pickscore


def _hand_cosine(clip_dir: Path, x: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import CLIPModel, CLIPTokenizer

    model, tok = CLIPModel.from_pretrained(str(clip_dir)).eval(), CLIPTokenizer.from_pretrained(str(clip_dir))
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        img = V._features(model.get_image_features(pixel_values=V.clip_preprocess(x, 32)))
        txt = V._features(model.get_text_features(input_ids=ids.input_ids, attention_mask=ids.attention_mask))
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    return (img * txt).sum(-1), model.logit_scale.exp().detach()


def test_clip_score_matches_hand_computation(clip_dir):
    x = images()
    r = check_scores_and_grad(get_reward("clip-score", path=clip_dir), x)
    cos, logit_scale = _hand_cosine(clip_dir, x.detach(), PROMPTS)
    assert torch.allclose(r.detach(), 100 * cos, atol=1e-4)
    r2 = get_reward("clip-score", path=clip_dir, scale=None)(x.detach(), PROMPTS)
    assert torch.allclose(r2, logit_scale * cos, atol=1e-4)
    # the prompt matters: swapping prompts changes the scores
    assert not torch.allclose(get_reward("clip-score", path=clip_dir)(x.detach(), PROMPTS[::-1]), r.detach())


def test_pickscore_is_logit_scale_times_cosine(clip_dir):
    x = images(seed=1)
    r = check_scores_and_grad(get_reward("pickscore", path=clip_dir), x)
    cos, logit_scale = _hand_cosine(clip_dir, x.detach(), PROMPTS)
    assert torch.allclose(r.detach(), logit_scale * cos, atol=1e-4)


# ----------------------------------------------------------------------------- HPS v2


class _StandInOpenClip(nn.Module):
    """open_clip's ``encode_image`` / ``encode_text`` over a tiny transformers CLIP."""

    def __init__(self, clip_dir: Path):
        super().__init__()
        self.clip = V._Clip(clip_dir)

    def encode_image(self, pixels):
        return V._features(self.clip.model.get_image_features(pixel_values=pixels))

    def encode_text(self, ids):
        return V._features(self.clip.model.get_text_features(input_ids=ids))


def test_hps_score_on_stand_in_clip(clip_dir):
    m = _StandInOpenClip(clip_dir)
    hps = V.HPSv2.__new__(V.HPSv2)  # the scorer without open_clip: a stand-in model and tokenizer
    hps.model, hps.size = m, 32
    hps.tokenizer = lambda p: m.clip.tokenizer(p, padding="max_length", max_length=77, return_tensors="pt").input_ids
    x = images(seed=2)
    r = check_scores_and_grad(hps, x)
    cos, _ = _hand_cosine(clip_dir, x.detach(), PROMPTS)
    assert torch.allclose(r.detach(), cos, atol=1e-5)
    assert (r.abs() <= 1 + 1e-6).all()


def test_hpsv2_missing(tmp_path):
    with pytest.raises(UserError) as e:
        get_reward("hpsv2", path=tmp_path / "nowhere")
    msg = str(e.value)
    assert "HPS v2" in msg and "HPS_v2" in msg and "\n" not in msg
    if importlib.util.find_spec("open_clip") is None:
        assert "pip install open-clip-torch" in msg


# ----------------------------------------------------------------------------- ImageReward


def test_imagereward_head_and_standardization():
    torch.manual_seed(0)
    head = V.MLPHead(768).eval()
    assert set(head.state_dict()) == set(PUBLISHED_AESTHETIC_SHAPES)
    f = torch.randn(4, 768, requires_grad=True)
    r = V.imagereward_head_score(head, f)
    expected = (head(f)[:, 0] - 0.16717362830052426) / 1.0333394966054072
    assert r.shape == (4,) and torch.allclose(r, expected)
    (g,) = torch.autograd.grad(r.sum(), f)
    assert g.abs().sum() > 0


class _StandInBlipText(nn.Module):
    """BLIP's text encoder interface: token embeddings plus attention-pooled image embeddings."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)

    def forward(self, input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask, return_dict=True):
        q = self.emb(input_ids)  # [B, T, D]
        att = (q @ encoder_hidden_states.transpose(1, 2)).softmax(-1)  # [B, T, N]
        return SimpleNamespace(last_hidden_state=q + att @ encoder_hidden_states)


def test_imagereward_scoring_on_stand_in_blip(clip_dir):
    torch.manual_seed(0)
    dim = 24
    blip = nn.Module()
    blip.visual_encoder = nn.Sequential(nn.Conv2d(3, dim, 8, stride=8), nn.Flatten(2))  # -> [B, D, N]
    blip.visual_encoder.append(type("T", (nn.Module,), {"forward": lambda self, z: z.transpose(1, 2)})())
    blip.visual_encoder.img_size = 32
    blip.tokenizer = V._Clip(clip_dir).tokenizer
    blip.text_encoder = _StandInBlipText(len(blip.tokenizer), dim)
    model = nn.Module()
    model.blip, model.mlp = blip, V.MLPHead(dim)
    model.mean, model.std = V.IMAGEREWARD_MEAN, V.IMAGEREWARD_STD
    V._freeze(model)
    reward = V.RewardFn("imagereward", True, None, "stand-in", V.imagereward_fn)
    check_scores_and_grad(lambda x, p: reward.fn(model, x, p), images(seed=3))


def test_imagereward_missing(tmp_path):
    with pytest.raises(UserError) as e:
        get_reward("imagereward", path=tmp_path)
    msg = str(e.value)
    assert "ImageReward" in msg and "ImageReward.pt" in msg and "\n" not in msg


# ----------------------------------------------------------------------------- missing weights


@pytest.mark.parametrize(
    "name, model",
    [("aesthetic", "aesthetic predictor"), ("clip-score", "CLIP"), ("pickscore", "PickScore")],
)
def test_missing_weights_one_line_error(name, model, tmp_path):
    with pytest.raises(UserError) as e:
        get_reward(name, path=tmp_path / "missing")
    msg = str(e.value)
    assert model in msg and "\n" not in msg and str(tmp_path / "missing") in msg
    assert f"REWARDIFF_{name.upper().replace('-', '_')}_PATH" in msg


def test_aesthetic_missing_head_only(aesthetic_dir, tmp_path):
    (tmp_path / V.AESTHETIC_CLIP_DIR).symlink_to(aesthetic_dir / V.AESTHETIC_CLIP_DIR)
    with pytest.raises(UserError, match="sac\\+logos\\+ava1-l14-linearMSE.pth"):
        get_reward("aesthetic", path=tmp_path)
