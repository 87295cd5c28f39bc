"""A tiny LoRA fine-tuning of a random Stable Diffusion pipeline, run by every process of a
multi-process launch (``torchrun`` or ``accelerate launch``); used by test_multiprocess.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/mp_finetune.py PIPE PROMPTS OUT STEPS [resume] [bf16] [grpo|nft] [fsdp]

Each rank writes ``OUT/rank{r}.pid`` when it starts, and ``OUT/rank{r}.safetensors`` (its trainable tensors after training) and
``OUT/rank{r}.json`` (the process count, and per step the prompts and seeds it trained on and
the rewards of its own samples). With ``fsdp`` the run is sharded (FSDP2), and the JSON holds the
numbers of trainable elements this rank holds and in all. With ``nft`` the method is
DiffusionNFT (groups of 2, its old weights decaying fast). With ``grpo`` the method is GRPO (DDIM with eta 1, groups of
2, a black-box reward) and the JSON also holds each step's advantages of its own rows.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def main(argv: list[str]) -> None:
    from safetensors.torch import save_file

    from rewardiff.finetune import sharding, trainer
    from rewardiff.finetune.config import FinetuneConfig
    from rewardiff.finetune.trainer import Run
    from rewardiff.finetune.weights import trainable_state

    torch.set_num_threads(1)
    pipe, prompts, out, steps = argv[0], argv[1], Path(argv[2]), int(argv[3])
    flags = set(argv[4:])
    fsdp = "fsdp" in flags
    grpo = "grpo" in flags
    method_fields = dict(method="grpo", reward="jpeg-compressibility", eta=1.0, group_size=2, kl_weight=0.04) if grpo else \
        dict(method="nft", reward="jpeg-compressibility", eta=0.0, group_size=2, kl_weight=1e-4, nft_decay_rate=0.1) if "nft" in flags else \
        dict(method="draft-k", reward="brightness", k=1)
    cfg = FinetuneConfig(model=f"diffusers:{pipe}", steps=steps, batch_size=2, lr=1e-2, lora_rank=4, lora_alpha=4.0,
                         num_inference_steps=3, guidance_scale=2.0, prompts=prompts, eval_prompts=prompts, eval_samples=2,
                         eval_every=0, checkpoint_every=2, seed=5, mixed_precision="bf16" if "bf16" in flags else "no",
                         fsdp=fsdp, **method_fields)
    local: list[list[float]] = []  # this process's own rewards, step after step
    advantages: list[list[float]] = []  # grpo: this process's rows' advantages, step after step

    run = Run(cfg, out, progress=False)
    method = run.method
    if grpo:
        from rewardiff.finetune import grpo as grpo_module

        gathered = grpo_module.gathered_advantages

        def recorded(acc, prompts, rewards, global_std):
            adv, flat, zero = gathered(acc, prompts, rewards, global_std)
            local.append(rewards.float().tolist())
            advantages.append(adv.tolist())
            return adv, flat, zero

        grpo_module.gathered_advantages = recorded
    elif cfg.method == "draft-k":  # one loss a step: its rewards recorded
        def recording(*args):
            res = method(*args)
            local.append(res.reward.float().tolist())
            return res

        run.method = recording
    rank = run.acc.process_index
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.pid").write_text(str(os.getpid()))  # for a campaign that kills one rank
    seen = {s: run.batch(s)[:2] for s in range(steps)}
    run.train(resume="resume" in flags)
    net = run.acc.unwrap_model(run.model.net)
    whole = sharding.full_state(net, everywhere=True) if run.units else trainable_state(net)
    save_file(whole, str(out / f"rank{rank}.safetensors"))
    slices = [p.to_local() if sharding.is_sharded(p) else p for _, p in sharding.trainable(net)]
    (out / f"rank{rank}.json").write_text(json.dumps({"processes": run.acc.num_processes, "batches": seen, "rewards": local,
                                                          "advantages": advantages, "mixed_precision": str(run.acc.mixed_precision),
                                                          "sharded_units": len(run.units), "local_numel": sum(t.numel() for t in slices),
                                                          "full_numel": sum(t.numel() for t in whole.values())}))


if __name__ == "__main__":
    main(sys.argv[1:])
    from rewardiff.finetune.trainer import release_process_group

    release_process_group()  # as the command line does after a run
