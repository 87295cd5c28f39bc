"""Feature-distance and fidelity rewards against an image-conditioned prompt's references:
LPIPS-style and DISTS-style distances (hand-worked values, identities, monotonicity, gradients),
PSNR and SSIM (closed forms), the low-resolution variants' invariance to detail the downsampling
removes, and the real LPIPS / DISTS loaders on random backbones saved in torchvision's layout."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rewardiff import conditions
from rewardiff.errors import UserError
from rewardiff.rewards import features as FD
from rewardiff.rewards import get_reward, list_rewards
from rewardiff.rewards.fidelity import psnr, ssim
from rewardiff.worlds.shapes.feature_rewards import shapes_distance

NAMES = ("lpips-shapes", "lpips-shapes-lr", "dists-shapes", "dists-shapes-lr", "psnr", "psnr-lr", "ssim", "lpips", "dists")

# torchvision's layouts, written out: (index in ``features``, out channels, in channels, kernel) of each conv
VGG16_CONVS = [(0, 64, 3), (2, 64, 64), (5, 128, 64), (7, 128, 128), (10, 256, 128), (12, 256, 256), (14, 256, 256),
               (17, 512, 256), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512)]
ALEX_CONVS = [(0, 64, 3, 11), (3, 192, 64, 5), (6, 384, 192, 3), (8, 256, 384, 3), (10, 256, 256, 3)]
IMAGENET_SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)  # LPIPS's scaling layer, as published
IMAGENET_SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)


def rand_images(b: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, size // 4, size // 4, generator=g) * 2 - 1  # blocky images with some fine noise
    return (F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
            + 0.1 * torch.randn(b, 3, size, size, generator=g)).clamp(-1, 1)


def noisy(x: torch.Tensor, s: float, seed: int = 1) -> torch.Tensor:
    return x + s * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


def save_png(path: Path, im: torch.Tensor) -> Path:
    arr = ((im.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(arr).save(path)
    return path


def file_prompts(tmp_path: Path, high: torch.Tensor, low: torch.Tensor | None = None, gt: bool = True) -> list[str]:
    """Prompts "shapes | file:low_i.png;gt=high_i.png"; ``low`` defaults to ``high`` area-averaged by 4."""
    low = F.avg_pool2d(high, 4) if low is None else low
    out = []
    for i in range(high.shape[0]):
        lo, hi = save_png(tmp_path / f"low{i}.png", low[i]), save_png(tmp_path / f"high{i}.png", high[i])
        out.append(f"shapes | file:{lo}" + (f";gt={hi}" if gt else ""))
    return out


# ----------------------------------------------------------------------------- hand-worked distances


def test_lpips_distance_matches_the_hand_computed_value():
    # layer 1: two positions; x = (3, 4), (1, 0) and y = (4, 3), (0, 2) over 2 channels
    # unit-normalised: (.6, .8), (1, 0) and (.8, .6), (0, 1); squared differences (.04, .04), (1, 1)
    # weights (1, 3): .04 + .12 = .16 and 1 + 3 = 4, spatial mean 2.08
    # layer 2: one channel, x = 2, y = -5 -> 1 and -1, squared difference 4, weight .5: 2. Total 4.08.
    fx = [torch.tensor([[[[3.0, 1.0]], [[4.0, 0.0]]]]), torch.tensor([[[[2.0]]]])]
    fy = [torch.tensor([[[[4.0, 0.0]], [[3.0, 2.0]]]]), torch.tensor([[[[-5.0]]]])]
    w = [torch.tensor([1.0, 3.0]), torch.tensor([0.5])]
    assert FD.lpips_distance(fx, fy, w).item() == pytest.approx(4.08, abs=1e-6)
    assert FD.lpips_distance(fx, fy).item() == pytest.approx(1.04 + 4.0, abs=1e-6)  # ones: (.08 + 2) / 2 + 4


def test_skipping_the_channel_normalisation_changes_the_pinned_value(monkeypatch):
    # without it: (-1, 1) -> 1 + 3 = 4 and (1, -2) -> 1 + 12 = 13, mean 8.5; layer 2: 49 * .5
    monkeypatch.setattr(FD, "unit_normalize", lambda f, eps=0.0: f)
    fx = [torch.tensor([[[[3.0, 1.0]], [[4.0, 0.0]]]]), torch.tensor([[[[2.0]]]])]
    fy = [torch.tensor([[[[4.0, 0.0]], [[3.0, 2.0]]]]), torch.tensor([[[[-5.0]]]])]
    value = FD.lpips_distance(fx, fy, [torch.tensor([1.0, 3.0]), torch.tensor([0.5])]).item()
    assert value == pytest.approx(8.5 + 24.5) and value != pytest.approx(4.08)


def test_dists_distance_matches_the_hand_computed_value():
    # channel 1: x = 0 2 0 2 (mean 1, var 1), y = 1 1 3 3 (mean 2, var 1), cov = 8/4 - 2 = 0
    #   texture 2*1*2 / (1 + 4) = .8, structure 0 / 2 = 0
    # channel 2: x = y = 1 2 3 4: texture 1, structure 1
    # alpha (1, 1), beta (3, 1), sum 6: similarity (.8 + 1 + 3 * 0 + 1) / 6 = 2.8 / 6, distance 3.2 / 6
    fx = torch.tensor([[[[0.0, 2.0], [0.0, 2.0]], [[1.0, 2.0], [3.0, 4.0]]]])
    fy = torch.tensor([[[[1.0, 1.0], [3.0, 3.0]], [[1.0, 2.0], [3.0, 4.0]]]])
    d = FD.dists_distance([fx], [fy], [torch.tensor([1.0, 1.0])], [torch.tensor([3.0, 1.0])], c1=0.0, c2=0.0)
    assert d.item() == pytest.approx(3.2 / 6, abs=1e-6)
    # equal weights: (.8 + 1 + 0 + 1) / 4 = .7
    assert FD.dists_distance([fx], [fy]).item() == pytest.approx(0.3, abs=1e-5)


def test_the_shapes_feature_network_reads_each_scale_of_the_reward_model():
    from rewardiff.worlds.shapes.reward_model import load_reward_model

    net = load_reward_model()
    x, y = rand_images(2, seed=8), rand_images(2, seed=9)
    # the shipped backbone: two blocks of (conv, norm, SiLU) at 32x32, pool, two at 16x16, pool, two at 8x8
    cuts = [(0, 6), (0, 13), (0, 20)]
    fx = [net.features[a:b](x) for a, b in cuts]
    fy = [net.features[a:b](y) for a, b in cuts]
    assert [tuple(f.shape[1:]) for f in fx] == [(32, 32, 32), (64, 16, 16), (64, 8, 8)]
    assert shapes_distance("lpips")(x, y).tolist() == pytest.approx(FD.lpips_distance(fx, fy).tolist(), rel=1e-5)
    assert shapes_distance("dists")(x, y).tolist() == pytest.approx(FD.dists_distance(fx, fy).tolist(), rel=1e-5)


def test_psnr_of_a_known_mse():
    x = torch.zeros(2, 3, 8, 8)
    y = x.clone()
    y[0] += 0.2  # 0.1 on [0, 1] pixels: MSE 0.01, 20 dB
    y[1, :, :4] += 0.4  # 0.2 on half the pixels: MSE 0.02, 10 log10(50) dB
    assert psnr(x, y).tolist() == pytest.approx([20.0, 10 * math.log10(50)], abs=1e-4)
    assert psnr(x, x).tolist() == [100.0, 100.0]


def test_ssim_of_a_constant_shift():
    # constant a = .25 on [0, 1], shifted by .5: variances and covariance 0, so the structure
    # term is C2 / C2 = 1 and SSIM = (2 a (a + c) + C1) / (a^2 + (a + c)^2 + C1), C1 = 1e-4
    x = torch.full((1, 3, 16, 16), -0.5)
    y = x + 1.0
    expected = (2 * 0.25 * 0.75 + 1e-4) / (0.25**2 + 0.75**2 + 1e-4)
    assert ssim(x, y).item() == pytest.approx(expected, rel=1e-5)


def _ssim_by_loops(a: np.ndarray, b: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """SSIM of two [H, W] images on [0, 1] by explicit window sums (Wang et al. 2004)."""
    t = np.arange(size) - (size - 1) / 2
    w = np.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / (2 * sigma**2))
    w /= w.sum()
    c1, c2, vals = 0.01**2, 0.03**2, []
    for i in range(a.shape[0] - size + 1):
        for j in range(a.shape[1] - size + 1):
            pa, pb = a[i:i + size, j:j + size], b[i:i + size, j:j + size]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
            cov = (w * (pa - ma) * (pb - mb)).sum()
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_matches_explicit_window_sums():
    g = np.random.default_rng(0)
    a = g.random((13, 14))
    b = np.clip(a + 0.3 * g.standard_normal(a.shape), 0, 1)
    x = torch.tensor(a * 2 - 1, dtype=torch.float32).view(1, 1, 13, 14)
    y = torch.tensor(b * 2 - 1, dtype=torch.float32).view(1, 1, 13, 14)
    assert ssim(x, y).item() == pytest.approx(_ssim_by_loops(a, b), abs=1e-5)


# ----------------------------------------------------------------------------- identities, monotonicity, gradients


@pytest.fixture(scope="module")
def metrics(real_dirs):
    from rewardiff.rewards.perceptual import dists_metric, lpips_metric

    return {
        "lpips-shapes": shapes_distance("lpips"), "dists-shapes": shapes_distance("dists"),
        "psnr": lambda x, y: -psnr(x, y), "ssim": lambda x, y: 1 - ssim(x, y),
        "lpips-vgg": lpips_metric(real_dirs["lpips"], "vgg"), "lpips-alex": lpips_metric(real_dirs["lpips"], "alex"),
        "dists": dists_metric(real_dirs["dists"]),
    }


ALL = ("lpips-shapes", "dists-shapes", "psnr", "ssim", "lpips-vgg", "lpips-alex", "dists")


@pytest.mark.parametrize("name", ALL)
def test_distance_is_zero_on_itself_and_symmetric(metrics, name):
    m = metrics[name]
    x, y = rand_images(2, seed=0), rand_images(2, seed=1)
    zero = -100.0 if name == "psnr" else 0.0
    assert m(x, x).tolist() == pytest.approx([zero, zero], abs=1e-5)
    assert m(x, y).tolist() == pytest.approx(m(y, x).tolist(), rel=1e-5, abs=1e-6)
    assert (m(x, y) > zero + 1e-4).all()


@pytest.mark.parametrize("name", ALL)
def test_more_noise_gives_a_larger_distance(metrics, name):
    x = rand_images(2, seed=2)
    d = [metrics[name](x, noisy(x, s)) for s in (0.02, 0.1, 0.3, 0.8)]
    for lo, hi in zip(d, d[1:]):
        assert (hi > lo).all(), [v.tolist() for v in d]


@pytest.mark.parametrize("name", ("lpips-shapes", "dists-shapes", "psnr", "ssim", "psnr-lr", "lpips-shapes-lr", "dists-shapes-lr"))
def test_reward_gradients_reach_the_output_and_never_the_references(tmp_path, name):
    high = rand_images(2, seed=3)
    prompts = file_prompts(tmp_path, high)
    reward = get_reward(name)
    assert reward.differentiable
    x = noisy(high, 0.2).requires_grad_(True)
    r = reward(x, prompts)
    assert r.shape == (2,) and torch.isfinite(r).all()
    (gx,) = torch.autograd.grad(r.sum(), x)
    assert torch.isfinite(gx).all() and gx.abs().sum() > 0
    # the same comparison with references that could take a gradient: none reaches them
    ref = FD.references(prompts, "lr" if name.endswith("-lr") else "gt", x).requires_grad_(True)
    metric = psnr if name.startswith("psnr") else (lambda a, b: 1 - ssim(a, b)) if name == "ssim" else shapes_distance(name.split("-")[0])
    out = FD.compare(metric, x, ref, "lr" if name.endswith("-lr") else "gt")
    gx2, gref = torch.autograd.grad(out.sum(), [x, ref], allow_unused=True)
    assert gref is None and gx2.abs().sum() > 0


def test_the_reward_is_minus_the_distance_and_best_at_the_truth(tmp_path):
    high = rand_images(2, seed=4)
    prompts = file_prompts(tmp_path, high)
    truth = torch.stack([conditions.ground_truth(p) for p in prompts])  # the PNG-quantised images
    for name in ("lpips-shapes", "dists-shapes"):
        reward, dist = get_reward(name), shapes_distance(name.split("-")[0])
        assert reward(truth, prompts).tolist() == pytest.approx([0.0, 0.0], abs=1e-5)
        x = noisy(truth, 0.3)
        assert reward(x, prompts).tolist() == pytest.approx((-dist(x, truth)).tolist(), rel=1e-5)
    assert get_reward("ssim")(truth, prompts).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)


# ----------------------------------------------------------------------------- against the low-resolution input


def block_pattern(b: int, size: int = 32, amp: float = 0.3) -> torch.Tensor:
    """Detail that averages out in every aligned 4x4 block: +amp on each block's centre 2x2,
    -amp/3 on its 12 other pixels (so that neither a point sample nor a 2x2 blend sees 0)."""
    i = torch.arange(size) % 4
    centre = ((i == 1) | (i == 2)).float()
    inner = centre[:, None] * centre[None, :]
    return (amp * inner - amp / 3 * (1 - inner)).expand(b, 3, size, size)


LR_PAIRS = (("lpips-shapes-lr", "lpips-shapes"), ("dists-shapes-lr", "dists-shapes"), ("psnr-lr", "psnr"))


@pytest.mark.parametrize("lr_name, gt_name", LR_PAIRS)
def test_the_lr_variant_ignores_detail_the_downsampling_removes(tmp_path, lr_name, gt_name):
    high = rand_images(2, seed=5) * 0.6
    prompts = file_prompts(tmp_path, high)
    x = noisy(high, 0.1, seed=7)
    detailed = x + block_pattern(2)
    lr, gt = get_reward(lr_name), get_reward(gt_name)
    assert lr(detailed, prompts).tolist() == pytest.approx(lr(x, prompts).tolist(), abs=1e-4)
    assert (gt(detailed, prompts) - gt(x, prompts)).abs().min() > 1e-2


@pytest.mark.parametrize("downsample", ["subsample", "bilinear"])
def test_an_lr_comparison_without_area_averaging_is_caught(tmp_path, monkeypatch, downsample):
    high = rand_images(2, seed=5) * 0.6
    prompts = file_prompts(tmp_path, high)
    x = noisy(high, 0.1, seed=7)
    detailed = x + block_pattern(2)
    wrong = {"subsample": lambda im, size: im[..., ::4, ::4],
             "bilinear": lambda im, size: F.interpolate(im, size=size, mode="bilinear", align_corners=False)}[downsample]
    monkeypatch.setattr(FD, "area_downsample", wrong)
    reward = get_reward("lpips-shapes-lr")
    assert (reward(detailed, prompts) - reward(x, prompts)).abs().min() > 1e-3


def test_a_prompt_without_ground_truth_is_a_one_line_error_naming_it(tmp_path):
    high = rand_images(1, seed=6)
    prompts = file_prompts(tmp_path, high, gt=False)
    for name in ("lpips-shapes", "dists-shapes", "psnr", "ssim"):
        with pytest.raises(UserError) as e:
            get_reward(name)(high, prompts)
        assert prompts[0] in str(e.value) and "ground truth" in str(e.value) and "\n" not in str(e.value)
    assert torch.isfinite(get_reward("lpips-shapes-lr")(high, prompts)).all()  # the input is there
    with pytest.raises(UserError, match="names no image"):
        get_reward("psnr-lr")(high, ["two red circles"])
    with pytest.raises(UserError, match="against must be 'gt'"):
        get_reward("lpips-shapes", against="hr")


def test_registered_with_one_line_descriptions():
    rows = {name: (flag, desc) for name, flag, desc in list_rewards()}
    for name in NAMES:
        assert rows[name][0] is True and rows[name][1] and "\n" not in rows[name][1]
    assert get_reward("psnr-lr").name == "psnr-lr" and get_reward("dists-shapes-lr").name == "dists-shapes-lr"


# ----------------------------------------------------------------------------- real LPIPS / DISTS files


def _conv(g: torch.Generator, out: int, inp: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(out, inp, k, k, generator=g) * math.sqrt(2 / (inp * k * k))  # He: activations keep their scale
    return w, 0.01 * torch.randn(out, generator=g)


def torchvision_state(convs: list[tuple], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, out, inp, *k in convs:
        state[f"features.{i}.weight"], state[f"features.{i}.bias"] = _conv(g, out, inp, k[0] if k else 3)
    state["classifier.6.bias"] = torch.zeros(10)  # torchvision's files hold the classifier too; it is ignored
    return state


@pytest.fixture(scope="module")
def real_dirs(tmp_path_factory):
    g = torch.Generator().manual_seed(9)
    lp, di = tmp_path_factory.mktemp("lpips"), tmp_path_factory.mktemp("dists")
    vgg = torchvision_state(VGG16_CONVS, 1)
    torch.save(vgg, lp / "vgg16-397923af.pth")
    torch.save(vgg, di / "vgg16-397923af.pth")
    torch.save(torchvision_state(ALEX_CONVS, 2), lp / "alexnet-owt-7be5be79.pth")
    for net, chns in (("vgg", (64, 128, 256, 512, 512)), ("alex", (64, 192, 384, 256, 256))):
        torch.save({f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(chns)}, lp / f"{net}.pth")
    torch.save({"alpha": torch.rand(1, 1475, 1, 1, generator=g), "beta": torch.rand(1, 1475, 1, 1, generator=g)}, di / "weights.pt")
    return {"lpips": lp, "dists": di}


def _vgg_by_hand(state: dict, x: torch.Tensor, pool: str) -> list[torch.Tensor]:
    """relu1_2 ... relu5_3 of torchvision's VGG16 run from its state dict, conv by conv."""
    h, outs = x, []
    hann = torch.tensor([0.25, 0.5, 0.25])
    for n, (i, out, _) in enumerate(VGG16_CONVS):
        h = F.relu(F.conv2d(h, state[f"features.{i}.weight"], state[f"features.{i}.bias"], padding=1))
        if n in (1, 3, 6, 9, 12):
            outs.append(h)
            if n < 12:
                if pool == "max":
                    h = F.max_pool2d(h, 2)
                else:  # L2 pooling: sqrt of the Hanning-weighted mean of squares, stride 2
                    win = (hann[:, None] * hann[None, :]).expand(out, 1, 3, 3)
                    h = (F.conv2d(h * h, win, stride=2, padding=1, groups=out) + 1e-12).sqrt()
    return outs


def _lpips_by_hand(state: dict, heads: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS v0.1 from its definition: scaled inputs, VGG16 relu taps, unit-normalised, weighted squared differences."""
    fx = _vgg_by_hand(state, (x - IMAGENET_SHIFT) / IMAGENET_SCALE, "max")
    fy = _vgg_by_hand(state, (y - IMAGENET_SHIFT) / IMAGENET_SCALE, "max")
    total = torch.zeros(x.shape[0])
    for k, (a, b) in enumerate(zip(fx, fy)):
        a, b = a / (a.norm(dim=1, keepdim=True) + 1e-10), b / (b.norm(dim=1, keepdim=True) + 1e-10)
        total = total + ((a - b) ** 2 * heads[f"lin{k}.model.1.weight"]).sum(1).mean((1, 2))
    return total


def test_real_lpips_equals_its_definition_over_the_saved_backbone(real_dirs, tmp_path):
    from rewardiff.rewards.perceptual import lpips_metric

    folder = real_dirs["lpips"]
    state, heads = torch.load(folder / "vgg16-397923af.pth"), torch.load(folder / "vgg.pth")
    x, y = rand_images(2, seed=10), rand_images(2, seed=11)
    assert lpips_metric(folder, "vgg")(x, y).tolist() == pytest.approx(_lpips_by_hand(state, heads, x, y).tolist(), rel=1e-4)
    prompts = file_prompts(tmp_path, y)
    truth = torch.stack([conditions.ground_truth(p) for p in prompts])  # y as its PNG holds it
    reward = get_reward("lpips", net="vgg", path=str(folder))
    assert reward(x, prompts).tolist() == pytest.approx((-_lpips_by_hand(state, heads, x, truth)).tolist(), rel=1e-4)


def test_real_dists_equals_its_definition_over_the_saved_backbone(real_dirs, tmp_path, monkeypatch):
    folder = real_dirs["dists"]
    state, w = torch.load(folder / "vgg16-397923af.pth"), torch.load(folder / "weights.pt")
    x, y = rand_images(2, seed=12), rand_images(2, seed=13)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def stages(im):
        unit = (im + 1) / 2
        return [unit] + _vgg_by_hand(state, (unit - mean) / std, "l2")

    alpha, beta = w["alpha"].flatten(), w["beta"].flatten()
    total, sim, c = alpha.sum() + beta.sum(), 0, 0
    for a, b in zip(stages(x), stages(y)):
        n = a.shape[1]
        ma, mb = a.mean((2, 3)), b.mean((2, 3))
        va, vb = ((a - ma[..., None, None]) ** 2).mean((2, 3)), ((b - mb[..., None, None]) ** 2).mean((2, 3))
        cov = ((a - ma[..., None, None]) * (b - mb[..., None, None])).mean((2, 3))
        tex, struct = (2 * ma * mb + 1e-6) / (ma**2 + mb**2 + 1e-6), (2 * cov + 1e-6) / (va + vb + 1e-6)
        sim = sim + (alpha[c:c + n] * tex + beta[c:c + n] * struct).sum(1)
        c += n
    monkeypatch.setenv("REWARDIFF_DISTS_PATH", str(folder))
    from rewardiff.rewards.perceptual import dists_metric

    assert dists_metric(folder)(x, y).tolist() == pytest.approx((1 - sim / total).tolist(), rel=1e-4, abs=1e-6)
    prompts = file_prompts(tmp_path, y)
    r = get_reward("dists", against="lr")(x, prompts)  # found through the environment variable
    assert r.shape == (2,) and torch.isfinite(r).all() and (r < 0).all()


def test_real_lpips_alexnet_loads_and_scores_small_images(real_dirs, tmp_path):
    x = rand_images(2, size=16, seed=14)  # upsampled to the 32 px AlexNet needs
    prompts = file_prompts(tmp_path, x)
    for against in ("gt", "lr"):
        r = get_reward("lpips", net="alex", path=real_dirs["lpips"], against=against)(noisy(x, 0.2), prompts)
        assert r.shape == (2,) and torch.isfinite(r).all() and (r < 0).all()


def test_missing_or_wrong_weight_files_are_one_line_errors(real_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("REWARDIFF_LPIPS_PATH", str(tmp_path))
    with pytest.raises(UserError) as e:
        get_reward("lpips")
    msg = str(e.value)
    assert str(tmp_path / "vgg16-397923af.pth") in msg and "REWARDIFF_LPIPS_PATH" in msg and "\n" not in msg
    (tmp_path / "vgg16-397923af.pth").symlink_to(real_dirs["lpips"] / "vgg16-397923af.pth")
    with pytest.raises(UserError, match=r"vgg\.pth") as e:
        get_reward("lpips")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"weights\.pt"):
        get_reward("dists", path=tmp_path)
    with pytest.raises(UserError, match="net must be 'vgg' or 'alex'"):
        get_reward("lpips", net="squeeze", path=real_dirs["lpips"])
    wrong = tmp_path / "alexnet-owt-7be5be79.pth"
    wrong.symlink_to(real_dirs["lpips"] / "vgg16-397923af.pth")
    (tmp_path / "alex.pth").symlink_to(real_dirs["lpips"] / "alex.pth")
    x = rand_images(1, seed=15)
    with pytest.raises(UserError, match="is not torchvision's alex state dict") as e:
        get_reward("lpips", net="alex")(x, file_prompts(tmp_path, x))
    assert "\n" not in str(e.value)
