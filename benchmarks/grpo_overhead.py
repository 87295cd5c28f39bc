"""Time of one GRPO step against its floor: the same transformer calls made bare.

On the tiny random Stable Diffusion 3 pipeline (flow path; ``--family sd`` the UNet one with
DDIM at eta 1), one process alternates on the same batch (1) one GRPO step of our trainer
(``Run.train_step``: SDE sampling through the rollout loop with classifier-free guidance and
per-step log-probabilities, VAE decode, a black-box reward, group advantages, then for every
trained step the transformer again with gradient, the clipped ratio, backward, clipping, AdamW
on the LoRA weights), and (2) the floor: the transformer called on the same [uncond; cond]
batches for every sampling step and every trained step, the step math, the decode, the
reward, the same loss, backward and the optimizer step, written as a plain loop with nothing
around it. The overhead is median(ours) / median(floor) - 1; the target is 15 %.

    python benchmarks/grpo_overhead.py --resolutions 32,64 --steps 10 --repeats 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from overhead import side_by_side  # noqa: E402  (a sibling script: run from benchmarks/ or by path)


def _bare(net, prompts):
    """f(x2, t2) -> the backbone's raw output on [uncond; cond] for ``prompts``."""
    import torch

    cond, uncond = net.encode(prompts), net.encode([""] * len(prompts))
    if isinstance(cond, dict):  # SD3: hidden states and pooled embeddings
        both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
        return lambda x2, tt: net.transformer(hidden_states=x2, timestep=tt, encoder_hidden_states=both["hidden"],
                                              pooled_projections=both["pooled"], return_dict=False)[0]
    both = torch.cat([uncond, cond])
    return lambda x2, tt: net.unet(x2, tt, encoder_hidden_states=both).sample


def floor_step(model, reward, prompts, seeds, T, scale, eta, clip, opt) -> None:
    """The bare calls one GRPO step (every step trained, one minibatch, no KL) makes."""
    import torch

    from rewardiff.finetune.grpo import group_advantages

    net, proc = model.net, model.process
    bare = _bare(net, prompts)
    x = model.noise(seeds)
    ts = proc.timesteps(T)
    prevs = proc.prev_timesteps(ts)
    gens = model.step_generators(seeds)

    def guided(x, t):
        tt = torch.full((2 * len(prompts),), t, dtype=torch.float32 if isinstance(t, float) else torch.long)
        out_u, out_c = bare(torch.cat([x, x]), tt).chunk(2)
        return out_u + scale * (out_c - out_u)

    xs, lps = [x], []
    with torch.no_grad():
        for t, tp in zip(ts, prevs):
            noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens])
            out = proc.step(guided(x, t), t, tp, x, eta, noise)
            x = out.prev
            xs.append(x)
            lps.append(out.log_prob)
        r = reward(model.decode(x), prompts)
    adv, _ = group_advantages(prompts, r)
    d = x[0].numel()
    for j, (t, tp) in enumerate(zip(ts, prevs)):
        step = proc.step(guided(xs[j], t), t, tp, xs[j], eta, torch.zeros_like(x))
        ratio = torch.exp((proc.log_prob(xs[j + 1], step.mean, step.std) - lps[j]) / d)
        loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)).mean() / T
        loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure(pipeline: Path, T: int, batch: int, repeats: int, out: Path, eta: float) -> dict:
    import torch

    from rewardiff.finetune.config import FinetuneConfig
    from rewardiff.finetune.trainer import Run

    prompts_file = out / "prompts.txt"
    prompts_file.write_text("a cat\na dog\na red bird\na small horse\n")
    cfg = FinetuneConfig(model=f"diffusers:{pipeline}", reward="jpeg-compressibility", method="grpo", eta=eta,
                         group_size=2, steps=repeats, batch_size=batch, lr=1e-4, lora_rank=4, num_inference_steps=T,
                         guidance_scale=2.0, ppo_minibatches=1, ppo_clip=1e-4, kl_weight=0.0, prompts=str(prompts_file),
                         eval_prompts=str(prompts_file), eval_samples=2, checkpoint_every=0)
    run = Run(cfg, out / f"run-{T}", progress=False)
    floor_opt = torch.optim.AdamW([p for p in run.model.net.parameters() if p.requires_grad], lr=1e-4)
    ours, floor = side_by_side(run, lambda prompts, seeds: floor_step(run.model, run.reward, prompts, seeds, T, 2.0, cfg.eta,
                                                                      cfg.ppo_clip, floor_opt), repeats)
    mo, mf = statistics.median(ours), statistics.median(floor)
    return {"steps": T, "batch": batch, "ours_s": mo, "floor_s": mf, "overhead": mo / mf - 1, "repeats": repeats,
            "ours_all_s": ours, "floor_all_s": floor}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["sd", "sd3"], default="sd3", help="which tiny random pipeline")
    ap.add_argument("--resolutions", type=lambda s: [int(x) for x in s.split(",")], default=[32, 64])
    ap.add_argument("--steps", type=lambda s: [int(x) for x in s.split(",")], default=[10])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/grpo_overhead.json"))
    args = ap.parse_args()

    import torch

    from rewardiff.models.sd import tiny_pipeline
    from rewardiff.models.sd3 import tiny_sd3_pipeline

    build = tiny_sd3_pipeline if args.family == "sd3" else tiny_pipeline
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for res in args.resolutions:
            pipe = build(Path(tmp) / f"pipe-{args.family}-{res}", resolution=res)
            for T in args.steps:
                row = {"resolution": res, "family": args.family, **measure(pipe, T, args.batch, args.repeats, Path(tmp), 0.7 if args.family == "sd3" else 1.0)}
                rows.append(row)
                print(f"{args.family} res {res} steps {T}: ours {row['ours_s']:.3f} s, floor {row['floor_s']:.3f} s, "
                      f"overhead {row['overhead']:+.1%}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
