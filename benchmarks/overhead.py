"""Time per fine-tuning step against the floor: the same network calls made bare.

For a Stable Diffusion pipeline (the tiny random one unless ``--pipeline`` names a saved
pipeline; ``--family sd3`` the tiny random Stable Diffusion 3 one, on the flow path) at each
resolution and number of sampler steps, one process alternates two things on
the same batch: (1) a DRaFT-K step (K = 1) of our trainer (``Run.train_step``: sampling through
the rollout loop with classifier-free guidance, VAE decode, reward, backward, clipping, AdamW
on the LoRA weights), and (2) the floor: the UNet (SD3: the transformer) called on the same [uncond; cond] batch for
every step (no gradient but the last), the VAE decode and the reward with gradient, backward
and the optimizer step, written as a plain loop with no library code around it. The
overhead is median(ours) / median(floor) - 1.

    python benchmarks/overhead.py --resolutions 32,64 --steps 10,20 --repeats 10
    python benchmarks/overhead.py --family sd3 --resolutions 32,64 --steps 10,20 --repeats 10 --out benchmarks/results/overhead_sd3.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def floor_step(model, reward, prompts, seeds, T, scale, opt) -> None:
    """The bare calls one DRaFT-K (K = 1) step makes, with nothing around them."""
    import torch

    net, proc = model.net, model.process
    cond = net.encode(prompts)
    uncond = net.encode([""] * len(prompts))
    if isinstance(cond, dict):  # SD3: hidden states and pooled embeddings
        both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}

        def bare(x2, tt):
            return net.transformer(hidden_states=x2, timestep=tt, encoder_hidden_states=both["hidden"],
                                   pooled_projections=both["pooled"], return_dict=False)[0]
    else:
        both = torch.cat([uncond, cond])

        def bare(x2, tt):
            return net.unet(x2, tt, encoder_hidden_states=both).sample
    x = model.noise(seeds)
    ts = proc.timesteps(T)
    prevs = proc.prev_timesteps(ts)
    for i, (t, tp) in enumerate(zip(ts, prevs)):
        with torch.set_grad_enabled(i == T - 1):
            tt = torch.full((2 * len(prompts),), t, dtype=torch.float32 if isinstance(t, float) else torch.long)
            out_u, out_c = bare(torch.cat([x, x]), tt).chunk(2)
            x = proc.step(out_u + scale * (out_c - out_u), t, tp, x).prev
    loss = -reward(model.decode(x), prompts).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def side_by_side(run, floor, repeats: int, warmup: int = 2) -> tuple[list[float], list[float]]:
    """Seconds of ``run.train_step`` and of ``floor(prompts, seeds)`` on the same batch, in
    alternation, ``repeats`` times after ``warmup`` rounds."""
    ours, bare = [], []
    for step in range(repeats + warmup):
        prompts, seeds, _ = run.batch(step)
        t0 = time.perf_counter()
        run.train_step(step)
        a = time.perf_counter() - t0
        t0 = time.perf_counter()
        floor(prompts, seeds)
        b = time.perf_counter() - t0
        if step >= warmup:
            ours.append(a)
            bare.append(b)
    return ours, bare


def measure(pipeline: Path, T: int, batch: int, repeats: int, out: Path, checkpointing: bool) -> dict:
    import torch

    from rewardiff.finetune.config import FinetuneConfig
    from rewardiff.finetune.trainer import Run

    prompts_file = out / "prompts.txt"
    prompts_file.write_text("a cat\na dog\na red bird\na small horse\n")
    cfg = FinetuneConfig(model=f"diffusers:{pipeline}", reward="brightness", method="draft-k", k=1, steps=repeats,
                         batch_size=batch, lr=1e-4, lora_rank=4, num_inference_steps=T, guidance_scale=2.0,
                         prompts=str(prompts_file), eval_prompts=str(prompts_file), eval_samples=2, checkpoint_every=0,
                         checkpointing=checkpointing)
    run = Run(cfg, out / f"run-{T}", progress=False)
    floor_opt = torch.optim.AdamW([p for p in run.model.net.parameters() if p.requires_grad], lr=1e-4)
    ours, floor = side_by_side(run, lambda prompts, seeds: floor_step(run.model, run.reward, prompts, seeds, T, 2.0, floor_opt), repeats)
    mo, mf = statistics.median(ours), statistics.median(floor)
    return {"steps": T, "batch": batch, "checkpointing": checkpointing, "ours_s": mo, "floor_s": mf, "overhead": mo / mf - 1, "repeats": repeats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", type=Path, default=None, help="a saved diffusers pipeline (default: the tiny random one)")
    ap.add_argument("--family", choices=["sd", "sd3"], default="sd", help="which tiny random pipeline (without --pipeline)")
    ap.add_argument("--resolutions", type=lambda s: [int(x) for x in s.split(",")], default=[32, 64])
    ap.add_argument("--steps", type=lambda s: [int(x) for x in s.split(",")], default=[10, 20])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--checkpointing", type=lambda s: [x == "on" for x in s.split(",")], default=[True, False],
                    help="our gradient checkpointing: on,off (the floor never recomputes)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/overhead.json"))
    args = ap.parse_args()

    import torch

    from rewardiff.models.sd import tiny_pipeline
    from rewardiff.models.sd3 import tiny_sd3_pipeline

    build = tiny_sd3_pipeline if args.family == "sd3" else tiny_pipeline

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for res in args.resolutions if args.pipeline is None else [0]:
            pipe = args.pipeline or build(Path(tmp) / f"pipe-{res}", resolution=res)
            for T in args.steps:
                for ckpt in args.checkpointing:
                    row = {"resolution": res or "pipeline", "family": args.family, **measure(pipe, T, args.batch, args.repeats, Path(tmp), ckpt)}
                    rows.append(row)
                    print(f"res {row['resolution']} steps {T} checkpointing {'on' if ckpt else 'off'}: ours {row['ours_s']:.3f} s, "
                          f"floor {row['floor_s']:.3f} s, overhead {row['overhead']:+.1%}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
