"""The Hallucination Score paper's correlation study (arXiv 2507.14367) in miniature: which
metrics of a super-resolved image agree with its hallucinations?

Outputs: the shipped ``shapes-sr`` model on every held-out scene (``sr-held-out``, 256) at
guidance 1 and at guidance 3 (which hallucinates differently), and bicubic upsampling of the
same inputs: 768 images. For each, the world's judge counts the hallucinations against the
ground truth (extra, missing, merged, split, recoloured, wrong kind): the truth of this study.

Metrics, each read so that higher is better (rewards): the feature distances of the shapes
world's reward-model backbone against the ground truth and against the low-resolution input
(``lpips-shapes``, ``lpips-shapes-lr``, ``dists-shapes``, ``dists-shapes-lr``), PSNR and SSIM
against the truth, PSNR against the input (``psnr-lr``), the low-resolution judge
(``sr-hallucination-lr``), and the served hallucination score: ``rewardiff serve-reward
sr-hallucination --last-image`` on loopback read by the ``openai:`` client, which sends the
input, the truth and the output with the paper's kind of question (a 1-9 rating here). On this
machine the served scorer is the world's own judge, so its agreement is 1 by construction up
to the digit mapping: a check of the wire, not a finding; pointed at a vision-language model
it is the paper's score.

Reported: Spearman's rho and Pearson's r of each metric with minus the hallucination count,
with a bootstrap 95 % interval of rho (images resampled, 1,000 times), over all 768 images and
over the model's 512 alone (bicubic is blurry and hallucinates in its own way, which can
make a fidelity metric look better than it is among the model's samples).

    python benchmarks/sr_correlation.py
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "sr_correlation"
METRICS = ("lpips-shapes", "lpips-shapes-lr", "dists-shapes", "dists-shapes-lr", "psnr", "ssim", "psnr-lr", "sr-hallucination-lr")
TEMPLATE = ("The first image is a low-resolution input, the second its true high-resolution image, the third a "
            "super-resolved output ({prompt}). Rate how faithful the output is to the truth, with no invented, missing, "
            "merged or recoloured objects, from 1 (many hallucinations) to 9 (none). Answer with one digit.")


def outputs(prompts: list[str]) -> dict[str, torch.Tensor]:
    from rewardiff import conditions
    from rewardiff.sampling import load_model
    from rewardiff.worlds.superres.data import upsample

    model = load_model("shapes-sr")
    seeds = list(range(len(prompts)))
    out = {}
    for g in (1.0, 3.0):
        chunks = []
        for i in range(0, len(prompts), 64):
            chunks.append(model.generate(prompts[i:i + 64], seeds[i:i + 64], num_inference_steps=15, guidance_scale=g))
        out[f"model-g{g:g}"] = torch.cat(chunks)
    lows = torch.stack([conditions.low_res(p) for p in prompts])
    out["bicubic"] = upsample(lows).clamp(-1, 1)
    return out


def served_scores(x: torch.Tensor, prompts: list[str]) -> np.ndarray:
    """The served judge's 1-9 rating of each output, through HTTP."""
    import re
    import select
    import subprocess

    from rewardiff.rewards.remote import RemoteReward

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rewardiff", "serve-reward", "sr-hallucination", "--port", "0", "--range", "-4,0",
                             "--last-image", "--template", TEMPLATE], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else ""
        m = re.search(r" at (http://\S+/v1):", line)
        if m is None:
            raise RuntimeError(f"the reward server did not start: {line!r}")
        with RemoteReward("hallucination", m.group(1), template=TEMPLATE, context=("low-res", "ground-truth"), concurrency=4) as client:
            return client(x, prompts).numpy()
    finally:
        proc.kill()
        proc.wait(10)


def bootstrap_rho(a: np.ndarray, b: np.ndarray, n: int = 1000, seed: int = 0) -> tuple[float, float]:
    from scipy.stats import spearmanr

    rng = np.random.default_rng(seed)
    rhos = []
    for _ in range(n):
        i = rng.integers(0, len(a), len(a))
        if np.ptp(a[i]) == 0 or np.ptp(b[i]) == 0:
            continue
        rhos.append(spearmanr(a[i], b[i]).statistic)
    return float(np.percentile(rhos, 2.5)), float(np.percentile(rhos, 97.5))


def main() -> None:
    from scipy.stats import pearsonr, spearmanr
    from tqdm import tqdm

    from rewardiff import plugins
    from rewardiff.rewards.registry import get_reward
    from rewardiff.worlds.superres.judge import judge

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    OUT.mkdir(parents=True, exist_ok=True)
    prompts = plugins.load(plugins.PROMPT_SETS["sr-held-out"])()
    outs = outputs(prompts)
    xs = torch.cat(list(outs.values()))
    ps = prompts * len(outs)
    source = np.array([k for k, v in outs.items() for _ in range(len(v))])
    truth = -judge(xs, ps)["count"].astype(float)  # minus the hallucinations: higher is better
    values = {}
    for name in tqdm(METRICS, desc="metrics"):
        r = get_reward(name)
        with torch.no_grad():
            values[name] = torch.cat([r(xs[i:i + 128], ps[i:i + 128]) for i in range(0, len(ps), 128)]).double().numpy()
    values["served hallucination score"] = served_scores(xs, ps).astype(float)
    rows = {}
    for name, v in values.items():
        row = {}
        for subset, mask in (("all", np.ones(len(ps), bool)), ("model", source != "bicubic")):
            a, b = v[mask], truth[mask]
            lo, hi = bootstrap_rho(a, b)
            row[subset] = {"spearman": float(spearmanr(a, b).statistic), "spearman_95": [lo, hi],
                           "pearson": float(pearsonr(a, b).statistic), "n": int(mask.sum())}
        rows[name] = row
    per_source = {k: {"hallucination_rate": float(np.mean(truth[source == k] < 0)), "mean_count": float(-truth[source == k].mean()),
                      **{m: float(values[m][source == k].mean()) for m in ("psnr", "ssim", "lpips-shapes")}} for k in outs}
    result = {"images": len(ps), "sources": per_source, "correlation_with_minus_hallucinations": rows,
              "command": "python benchmarks/sr_correlation.py"}
    from rewardiff.provenance import stamp

    (HERE / "results" / "sr_correlation.json").write_text(json.dumps({**result, **stamp()}, indent=2))
    plot(rows)
    print(f"{'metric':28s} {'rho (all)':>20s} {'rho (model only)':>22s} {'r (all)':>8s}")
    for name, row in rows.items():
        a, m = row["all"], row["model"]
        print(f"{name:28s} {a['spearman']:6.2f} [{a['spearman_95'][0]:5.2f},{a['spearman_95'][1]:5.2f}] "
              f"{m['spearman']:8.2f} [{m['spearman_95'][0]:5.2f},{m['spearman_95'][1]:5.2f}] {a['pearson']:8.2f}")
    for k, s in per_source.items():
        print(f"{k:10s} hallucination rate {s['hallucination_rate']:.3f} mean count {s['mean_count']:.2f} PSNR {s['psnr']:.1f} SSIM {s['ssim']:.3f}")


def plot(rows: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(8, 4))
    for k, (subset, color) in enumerate((("all", "tab:blue"), ("model", "tab:orange"))):
        rho = [rows[n][subset]["spearman"] for n in names]
        err = np.array([[rows[n][subset]["spearman"] - rows[n][subset]["spearman_95"][0],
                         rows[n][subset]["spearman_95"][1] - rows[n][subset]["spearman"]] for n in names]).T
        ax.barh(np.arange(len(names)) + 0.4 * k, rho, 0.4, xerr=err, color=color,
                label={"all": "all 768 images", "model": "the model's 512"}[subset])
    ax.set_yticks(np.arange(len(names)) + 0.2, names)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("Spearman rho with minus the hallucination count (95 % bootstrap)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(OUT / "correlations.png", dpi=120)


if __name__ == "__main__":
    main()
