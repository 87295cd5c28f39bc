"""Data-parallel and fully sharded (FSDP) fine-tuning with two processes on the CPU (gloo): tiny
random Stable Diffusion and SD3 pipelines, LoRA, DRaFT-K, GRPO, NFT; launched by torchrun and by
``accelerate launch`` (its FSDP config included).

Every rank ends with the same weights, ranks train on disjoint samples of one global batch,
logged metrics are means over the global batch, checkpoints are written once without a rank
hanging, and a resumed two-process run ends bit for bit where the uninterrupted one does.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rewardiff.finetune.config import FinetuneConfig
from rewardiff.models.sd import tiny_pipeline

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "mp_finetune.py"
PROMPTS = ["a photo of a cat", "a red dog", "a blue bird", "a green tree"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("mp")
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return tiny_pipeline(d / "pipe"), d / "prompts.txt"


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU processes, gloo, even where a GPU is present
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(launcher: str, args: list[str], timeout: int = 240) -> None:
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    elif launcher == "accelerate-fsdp":  # the shipped FSDP config, on the CPU
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml"),
               "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(_free_port())]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    try:
        res = subprocess.run([*cmd, str(SCRIPT), *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:  # a rank waiting forever (a missed barrier) ends here
        pytest.fail(f"{launcher} run {args} did not finish in {timeout} s:\n{(e.stderr or b'')[-3000:]}")
    assert res.returncode == 0, f"{launcher} run {args} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_process_lora_fine_tuning(setup, tmp_path):
    pipe, prompts = setup
    full, part = tmp_path / "full", tmp_path / "part"
    _launch("torchrun", [str(pipe), str(prompts), str(full), "4"])  # uninterrupted, checkpoints at 2 and 4
    _launch("torchrun", [str(pipe), str(prompts), str(part), "2"])  # interrupted after step 2 ...
    assert (part / "checkpoints" / "latest").read_text().strip() == "step-000002"
    _launch("accelerate", [str(pipe), str(prompts), str(part), "4", "resume"])  # ... and resumed to 4

    # 1. the same weights on every rank, the ones written to final/, and they moved
    w0, w1 = _tensors(full / "rank0.safetensors"), _tensors(full / "rank1.safetensors")
    assert w0 and all("lora" in k for k in w0)
    assert _same(w0, w1) and _same(w0, _tensors(full / "final" / "trainable.safetensors"))
    assert any(float(v.abs().sum()) > 0 for k, v in w0.items() if "lora_B" in k)  # lora_B starts at zero

    # 2. checkpoints written once, completely, by the main process only
    ckpts = full / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-000002", "step-000004"]
    for d in ckpts.glob("step-*"):
        assert {"finetune.json", "optimizer.pt", "state.json", "trainable.safetensors"} <= {p.name for p in d.iterdir()}
    assert not list(full.rglob(".*.tmp"))
    assert _same(w0, _tensors(ckpts / "step-000004" / "trainable.safetensors"))

    # 3. the resumed two-process run ends bit for bit as the uninterrupted one, logging each step once
    r0, r1 = _tensors(part / "rank0.safetensors"), _tensors(part / "rank1.safetensors")
    assert _same(r0, r1) and _same(r0, w0)
    assert _same(w0, _tensors(part / "final" / "trainable.safetensors"))
    assert [r["step"] for r in _rows(part)] == [1, 2, 3, 4]
    assert [r["loss"] for r in _rows(part)] == [r["loss"] for r in _rows(full)]

    # 4. data parallel: disjoint samples per rank, effective batch 2 x 2, global-mean metrics
    ranks = [json.loads((full / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [x["processes"] for x in ranks] == [2, 2]
    for step in range(4):
        (p0, s0), (p1, s1) = ranks[0]["batches"][str(step)], ranks[1]["batches"][str(step)]
        assert len(s0) == len(s1) == 2 and not set(s0) & set(s1)
        assert all(p in PROMPTS for p in p0 + p1)
    rows = _rows(full)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for step, row in enumerate(rows):
        both = torch.tensor(ranks[0]["rewards"][step] + ranks[1]["rewards"][step])
        assert len(both) == 4
        assert row["reward_mean"] == pytest.approx(float(both.mean()), rel=1e-6)
        assert row["reward_std"] == pytest.approx(float(both.std()), rel=1e-5, abs=1e-9)
        assert row["loss"] == pytest.approx(-float(both.mean()), rel=1e-6)  # kl_weight 0: loss = -mean reward
        assert row["nfe"] == 4 * 2 * 3  # 4 samples, CFG doubles, 3 DDIM steps
    for name in ("summary.json", "report.html", "samples_before.png", "samples_after.png", "eval_before.json"):
        assert (full / name).is_file(), name


@pytest.mark.slow
def test_two_process_grpo_normalizes_groups_over_the_global_batch(setup, tmp_path):
    """GRPO (the SDE step of DDIM, eta 1) on two processes: each rank's advantages are those of
    the global batch (both ranks' groups, the global std), every rank holds the same weights,
    and a resumed run ends bit for bit as the uninterrupted one."""
    from rewardiff.finetune.grpo import group_advantages

    pipe, prompts = setup
    full, part = tmp_path / "full", tmp_path / "part"
    _launch("torchrun", [str(pipe), str(prompts), str(full), "4", "grpo"])
    _launch("torchrun", [str(pipe), str(prompts), str(part), "2", "grpo"])
    _launch("torchrun", [str(pipe), str(prompts), str(part), "4", "resume", "grpo"])
    w0, w1 = _tensors(full / "rank0.safetensors"), _tensors(full / "rank1.safetensors")
    assert _same(w0, w1) and any(float(v.abs().sum()) > 0 for k, v in w0.items() if "lora_B" in k)
    assert _same(w0, _tensors(part / "rank0.safetensors"))
    ranks = [json.loads((full / f"rank{r}.json").read_text()) for r in (0, 1)]
    for step in range(4):
        (p0, _), (p1, _) = ranks[0]["batches"][str(step)], ranks[1]["batches"][str(step)]
        assert p0[0] == p0[1] and p1[0] == p1[1]  # a group of 2 on each rank
        rewards = torch.tensor(ranks[0]["rewards"][step] + ranks[1]["rewards"][step])
        want, _ = group_advantages(p0 + p1, rewards, global_std=True)
        got = ranks[0]["advantages"][step] + ranks[1]["advantages"][step]
        assert got == pytest.approx(want.tolist(), abs=1e-5)
        local, _ = group_advantages(p0, rewards[:2], global_std=True)
        assert got[:2] != pytest.approx(local.tolist(), abs=1e-3)  # the rank's own std would differ


def test_bf16_mixed_precision_trains_a_step_on_cpu(setup, tmp_path):
    """One process, bf16 autocast through accelerate (also after fp32 runs in this Python process)."""
    from rewardiff.finetune.trainer import Run

    pipe, prompts = setup
    cfg = FinetuneConfig(model=f"diffusers:{pipe}", reward="brightness", method="draft-k", k=1, steps=1, batch_size=2, lr=1e-2,
                         lora_rank=4, num_inference_steps=3, guidance_scale=2.0, prompts=str(prompts), eval_prompts=str(prompts),
                         eval_samples=2, checkpoint_every=0, mixed_precision="bf16")
    run = Run(cfg, tmp_path, progress=False)
    assert run.acc.mixed_precision == "bf16"
    before = {n: p.detach().clone() for n, p in run.model.net.named_parameters() if p.requires_grad}
    row = run.train_step(0)
    assert all(torch.isfinite(torch.tensor(row[k])) for k in ("loss", "reward_mean", "grad_norm"))
    after = dict(run.model.net.named_parameters())
    assert all(after[n].dtype == torch.float32 for n in before)  # autocast: the weights stay fp32
    assert any(not torch.equal(before[n], after[n]) for n in before)
    fp32 = Run(FinetuneConfig(**{**cfg.__dict__, "mixed_precision": "no"}), tmp_path / "fp32", progress=False)
    assert fp32.acc.mixed_precision == "no"


@pytest.fixture(scope="module")
def sd3(setup, tmp_path_factory):
    """A tiny random SD3 pipeline and an uninterrupted two-process (DDP) LoRA run of 4 steps on it."""
    from rewardiff.models.sd3 import tiny_sd3_pipeline

    _, prompts = setup
    d = tmp_path_factory.mktemp("sd3")
    pipe = tiny_sd3_pipeline(d / "pipe")
    _launch("torchrun", [str(pipe), str(prompts), str(d / "full"), "4"])
    return pipe, d / "full"


@pytest.mark.slow
@pytest.mark.xdist_group("sd3")  # one worker builds the SD3 fixture once
def test_two_process_lora_fine_tuning_of_the_sd3_transformer(setup, sd3, tmp_path):
    """The same data-parallel LoRA run on a tiny random Stable Diffusion 3 pipeline (the flow
    path): ranks hold the same weights, the checkpoint is written once, and a run stopped at
    step 2 and resumed (through accelerate) ends bit for bit as the uninterrupted one."""
    _, prompts = setup
    pipe, full = sd3
    part = tmp_path / "part"
    _launch("torchrun", [str(pipe), str(prompts), str(part), "2"])
    _launch("accelerate", [str(pipe), str(prompts), str(part), "4", "resume"])
    w0, w1 = _tensors(full / "rank0.safetensors"), _tensors(full / "rank1.safetensors")
    assert w0 and all("lora" in k and "transformer" in k for k in w0)
    assert _same(w0, w1) and _same(w0, _tensors(full / "final" / "trainable.safetensors"))
    assert any(float(v.abs().sum()) > 0 for k, v in w0.items() if "lora_B" in k)
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["latest", "step-000002", "step-000004"]
    r0, r1 = _tensors(part / "rank0.safetensors"), _tensors(part / "rank1.safetensors")
    assert _same(r0, r1) and _same(r0, w0)
    assert [r["loss"] for r in _rows(part)] == [r["loss"] for r in _rows(full)]


def _close(a: dict, b: dict, atol: float = 1e-6) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.allclose(a[k], b[k], rtol=0, atol=atol) for k in a)


@pytest.mark.slow
@pytest.mark.xdist_group("sd3")  # one worker builds the SD3 fixture once
def test_two_process_fsdp_shards_the_sd3_transformer_and_trains_as_ddp_does(setup, sd3, tmp_path):
    """Fully sharded (FSDP2 on gloo) LoRA fine-tuning of the tiny SD3 pipeline: each rank holds
    about half of every trainable tensor, the run ends where the data-parallel one does (same
    gradients, reduced by another route: within 1e-6), its checkpoints and ``final/`` hold whole
    tensors (the diffusers LoRA file too), a run stopped at step 2 resumes through accelerate's
    FSDP launch config bit for bit, and the sharded checkpoint also resumes unsharded."""
    import shutil

    _, prompts = setup
    pipe, ddp = sd3
    full, part, cross = tmp_path / "full", tmp_path / "part", tmp_path / "cross"
    _launch("torchrun", [str(pipe), str(prompts), str(full), "4", "fsdp"])
    _launch("torchrun", [str(pipe), str(prompts), str(part), "2", "fsdp"])
    shutil.copytree(part, cross)
    _launch("accelerate-fsdp", [str(pipe), str(prompts), str(part), "4", "resume"])  # no fsdp flag: the launcher asks for it
    _launch("torchrun", [str(pipe), str(prompts), str(cross), "4", "resume"])  # data parallel from the sharded checkpoint

    # 1. sharded: each rank holds about half of the trainable elements; the DDP run holds all
    for run, sharded in ((full, True), (part, True), (ddp, False)):
        info = json.loads((run / "rank0.json").read_text())
        assert (info["sharded_units"] > 0) == sharded
        if sharded:
            assert info["local_numel"] <= 0.55 * info["full_numel"], info
        else:
            assert info["local_numel"] == info["full_numel"]

    # 2. whole, equal weights on both ranks and on disk, and they moved
    w0, w1 = _tensors(full / "rank0.safetensors"), _tensors(full / "rank1.safetensors")
    assert _same(w0, w1) and _same(w0, _tensors(full / "final" / "trainable.safetensors"))
    assert _same(w0, _tensors(full / "checkpoints" / "step-000004" / "trainable.safetensors"))
    assert any(float(v.abs().max()) > 1e-3 for k, v in w0.items() if "lora_B" in k)

    # 3. the same training as data parallel
    d0 = _tensors(ddp / "rank0.safetensors")
    assert _close(w0, d0)
    assert [r["loss"] for r in _rows(full)] == pytest.approx([r["loss"] for r in _rows(ddp)], rel=1e-5)
    from rewardiff.finetune.weights import DIFFUSERS_LORA

    assert _close(_tensors(full / "final" / DIFFUSERS_LORA), _tensors(ddp / "final" / DIFFUSERS_LORA))

    # 4. resumed under accelerate's FSDP launch: bit for bit; resumed unsharded: the same training
    assert _same(_tensors(part / "rank0.safetensors"), w0)
    assert [r["loss"] for r in _rows(part)] == [r["loss"] for r in _rows(full)]
    assert json.loads((cross / "rank0.json").read_text())["sharded_units"] == 0
    assert _close(_tensors(cross / "rank0.safetensors"), w0)


@pytest.mark.slow
@pytest.mark.xdist_group("sd3")  # one worker builds the SD3 fixture once
def test_two_process_fsdp_checkpoints_diffusion_nft_old_weights_whole(setup, sd3, tmp_path):
    """DiffusionNFT's old weights are sharded like the trained ones; its checkpoint holds them
    whole, equal to the data-parallel run's."""
    _, prompts = setup
    pipe, _ = sd3
    sharded, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    _launch("torchrun", [str(pipe), str(prompts), str(sharded), "2", "nft", "fsdp"])
    _launch("torchrun", [str(pipe), str(prompts), str(ddp), "2", "nft"])
    a = _tensors(sharded / "checkpoints" / "step-000002" / "nft_old.safetensors")
    b = _tensors(ddp / "checkpoints" / "step-000002" / "nft_old.safetensors")
    assert a and _close(a, b)
    assert _close(_tensors(sharded / "rank0.safetensors"), _tensors(ddp / "rank0.safetensors"))
