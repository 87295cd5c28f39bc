"""Free2Guide as its paper ran it, on the moving-shapes video world, against best-of-N, SVDD-PM
and SMC at equal NFE, with the reward a served judge read through the OpenAI-compatible client.

What is compared, and how it is kept fair:

- The reward is black-box and remote: ``rewardiff serve-reward video-judge`` runs as its own
  process on loopback, and every method scores through ``openai:video-judge@URL`` in
  ``digits`` mode (the expected answer digit over 1..9 from the top log-probabilities, as
  Free2Guide reads its vision-language model) on the clip's key frames (four of the eight,
  as the client sends them). The served judge sees only those frames.
- The reading is independent of what the reward saw: the classical judge on all eight frames
  (count, colour, direction of motion, temporal consistency, all four together) on held-out
  prompts (``video-held-out``) and training prompts.
- Equal NFE: Free2Guide (n = 5, the first 6 steps, the paper's) fixes a budget; best-of-N,
  SVDD-PM and SMC take the largest width that spends no more (``Method.plan``); base is the
  floor. With T = 24 steps the budgets meet: Free2Guide 2 (24 + 4 x 6) = 96 NFE a clip,
  best-of-2 and SMC with 2 particles 96, SVDD-PM with M = 2 94. Every method samples the same
  (prompt, seed) grid for a run seed (each run seed draws fresh initial noises, for every method
  alike, base included); the main methods run with two run seeds, the ensembles and the
  ablation with one (CPU time), the spread beside every mean.
- Ensembles (Free2Guide's three): the served judge with an image reward on key frames
  (``keyframes(video-frames-count)``: the shapes world's learned count reward on each key
  frame), as a weighted sum with beta = 0.75 on the judge, a normalized sum and a consensus.
  Named deviation: the weighted sum adds the two on their own scales (1..9 and a clamped
  log-probability in [-3.9, 0]); the paper's ImageReward was standardized.
- The paper's ablation: guiding later (steps 6 .. 11, ``offset: 6``) and longer (the first
  12 steps), each at its own NFE (reported).

    python benchmarks/video_guidance.py                  # resumable: one JSON per (config, seed)
    python benchmarks/video_guidance.py --summary-only
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "video_guidance"
STEPS = 24  # DDIM steps (the paper: 50; guidance on the first 6 either way); 24 makes the budgets meet exactly
GUIDANCE = 2.0
PER_PROMPT = 2  # seeds per prompt
N_CANDIDATES = 5  # Free2Guide's n (LaVie's)
WINDOW = 6  # steps T .. T-5
JUDGE = "video-judge"
IMAGE = "keyframes(video-frames-count)"
SEEDS = (0, 1)  # method seeds of the main comparison
EXTRA_SEEDS = (0,)  # of the ensembles and the ablation
MAIN = ("base", "free2guide", "best-of-n", "svdd-pm", "smc")


def configs(vlm: str) -> dict[str, tuple[str, str | None, dict]]:
    """name -> (method, reward spec, options); widths of the equal-NFE baselines are planned."""
    f2g = dict(window=WINDOW)
    return {
        "base": ("base", None, {}),
        "free2guide": ("free2guide", vlm, f2g),
        "best-of-n": ("best-of-n", vlm, {}),
        "svdd-pm": ("svdd-pm", vlm, {}),
        "smc": ("smc", vlm, {}),
        "free2guide-weighted": ("free2guide", f"0.75*{vlm}+0.25*{IMAGE}", f2g),
        "free2guide-normalized": ("free2guide", f"normalized({vlm}, {IMAGE})", f2g),
        "free2guide-consensus": ("free2guide", f"consensus({vlm}, {IMAGE})", f2g),
        "free2guide-later": ("free2guide", vlm, dict(window=WINDOW, offset=WINDOW)),
        "free2guide-longer": ("free2guide", vlm, dict(window=2 * WINDOW)),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def served(reward: str):
    """``rewardiff serve-reward REWARD`` in a process of its own; yields its base URL."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rewardiff", "serve-reward", reward, "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"the reward server exited: {proc.stderr.read() if proc.stderr else ''}")
            if time.time() > deadline:
                raise RuntimeError("the reward server did not answer /health within 120 s")
            time.sleep(0.5)
        yield url + "/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def grid(prompts: list[str], seed: int) -> tuple[list[str], list[int]]:
    """The (prompt, seed) grid every method samples with run seed ``seed``: PER_PROMPT sample
    seeds of each prompt, a fresh set for each run seed (best-of-N has no randomness of its own,
    so a run seed must change the initial noises, for every method alike)."""
    ps = [p for p in prompts for _ in range(PER_PROMPT)]
    ss = [1000 + 100_000 * seed + i for i in range(len(ps))]
    return ps, ss


def read(clips: torch.Tensor, prompts: list[str]) -> dict:
    """The classical judge on every frame: each reading's accuracy."""
    from rewardiff.worlds.video.judge import judge

    from rewardiff.rewards.wire import DEFAULT_FRAMES, frame_indices

    j = judge(clips, prompts)
    keys = [k for k in ("count_ok", "color_ok", "direction_ok", "consistency", "all_ok", "partial") if k in j]
    out = {k: float(np.mean(j[k])) for k in keys}
    seen = frame_indices(clips.shape[2], DEFAULT_FRAMES)  # the frames the served judge was sent
    out["reward_view_partial"] = float(np.mean(judge(clips[:, :, seen], prompts)["partial"]))
    return out


def run_one(name: str, seed: int, vlm: str, model, prompts: list[str], split: list[str]) -> dict:
    from rewardiff.guidance.sample import budget_plan, guided_sample, make_method
    from rewardiff.rewards.registry import get_reward

    method, spec, options = configs(vlm)[name]
    reward = get_reward(spec) if spec else None
    meth = make_method(method, reward, seed=seed, **options, **({"width": N_CANDIDATES} if method == "free2guide" else {}))
    if method in ("best-of-n", "svdd-pm", "smc"):
        ref = make_method("free2guide", reward, width=N_CANDIDATES, window=WINDOW)
        ref.check(1.0, model.process)
        budget_plan(meth, ref.cost(STEPS, 2), STEPS, GUIDANCE)
    ps, ss = grid(prompts, seed)
    t0 = time.time()
    x, info = guided_sample(model, meth, ps, ss, STEPS, guidance_scale=GUIDANCE, eta=1.0, batch_size=16)
    seconds = time.time() - t0
    held = [i for i, p in enumerate(ps) if p in split]
    train = [i for i, p in enumerate(ps) if p not in split]
    out = {"config": name, "seed": seed, "method": method, "reward": spec, "options": info["options"],
           "nfe_per_sample": info["nfe_per_sample"], "reward_calls_per_sample": info.get("reward_calls_per_sample"),
           "seconds": seconds, "held_out": read(x[held], [ps[i] for i in held]),
           "train": read(x[train], [ps[i] for i in train])}
    if hasattr(reward, "stats"):
        out["client"] = {k: v for k, v in vars(reward.stats).items() if not isinstance(v, list)}
    return out


def summarize() -> dict:
    rows: dict[str, list[dict]] = {}
    for f in sorted(OUT.glob("*-seed*.json")):
        r = json.loads(f.read_text())
        rows.setdefault(r["config"], []).append(r)
    table = {}
    for name, rs in rows.items():
        entry = {"seeds": [r["seed"] for r in rs], "nfe_per_sample": rs[0]["nfe_per_sample"],
                 "options": rs[0]["options"], "seconds": statistics.median(r["seconds"] for r in rs)}
        for split in ("held_out", "train"):
            for k in rs[0][split]:
                vals = [r[split][k] for r in rs]
                entry[f"{split}_{k}"] = statistics.mean(vals)
                entry[f"{split}_{k}_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        table[name] = entry
    return table


def print_table(table: dict) -> None:
    cols = [("held_out", c) for c in ("partial", "all_ok", "count_ok", "color_ok", "direction_ok", "consistency", "reward_view_partial")]
    cols += [("train", "partial"), ("train", "reward_view_partial")]
    head = " ".join(f"{(s[:5] + ':' + c.replace('_ok', '').replace('reward_view_partial', 'seen'))[:15]:>15s}" for s, c in cols)
    print(f"{'config':24s} {'NFE':>5s} {head}   (mean ± sd over method seeds; seen: the judge on the frames the reward was sent)")
    for name, e in table.items():
        cells = []
        for split, c in cols:
            key = f"{split}_{c}"
            cells.append(f"{e[key]:.3f}±{e[key + '_sd']:.3f}" if key in e else "-")
        print(f"{name:24s} {e['nfe_per_sample']:5.0f} " + " ".join(f"{c:>15s}" for c in cells))


def main() -> None:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=",".join(configs("x")))
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="method seeds of the main comparison")
    ap.add_argument("--extra-seeds", default=",".join(map(str, EXTRA_SEEDS)), help="method seeds of the ensembles and the ablation")
    ap.add_argument("--train-prompts", type=int, default=4, help="training prompts read beside the held-out ones")
    ap.add_argument("--summary-only", action="store_true")
    ap.add_argument("--model", default="shapes-video", help="the model (a folder for a smoke run)")
    ap.add_argument("--out", type=Path, default=OUT, help="where the per-run JSON files go")
    args = ap.parse_args()
    OUT = args.out
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.summary_only:
        from tqdm import tqdm

        from rewardiff import plugins
        from rewardiff.sampling import load_model

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        model = load_model(args.model)
        held = plugins.load(plugins.PROMPT_SETS["video-held-out"])()
        train = plugins.load(plugins.PROMPT_SETS["video-train"])()
        rng = np.random.default_rng(0)
        prompts = held + [train[i] for i in sorted(rng.choice(len(train), args.train_prompts, replace=False))]
        def seeds_of(c: str) -> list[int]:
            return [int(x) for x in (args.seeds if c in MAIN else args.extra_seeds).split(",")]

        todo = [(c, s) for c in args.configs.split(",") for s in seeds_of(c)]
        todo = [(c, s) for c, s in todo if not (OUT / f"{c}-seed{s}.json").exists()]
        with served(JUDGE) as url:
            vlm = f"openai:{JUDGE}@{url}"
            for name, seed in tqdm(todo, desc="video guidance"):
                res = run_one(name, seed, vlm, model, prompts, held)
                res["reward"] = (res["reward"] or "").replace(url, "URL")
                (OUT / f"{name}-seed{seed}.json").write_text(json.dumps(res, indent=2))
                print(f"{name} seed {seed}: held-out all_ok {res['held_out'].get('all_ok', float('nan')):.3f} "
                      f"NFE {res['nfe_per_sample']:.0f} {res['seconds']:.0f} s", flush=True)
    table = summarize()
    (OUT.parent / f"{OUT.name}.json").write_text(json.dumps(table, indent=2))
    print_table(table)


if __name__ == "__main__":
    main()
