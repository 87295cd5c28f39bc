"""Runs that survive: bad input is one line with nothing written, run folders are never mixed,
checkpoints appear whole or not at all, signals stop at a safe point, failing rewards are named.

Each test removes nothing but checks what a protection promises, so removing the protection
fails it: the range checks (config.validate), the run-folder checks (trainer.check_out), the
lock (trainer.RunLock), the whole-folder checkpoint write and its pruning by step number,
the signal handlers (trainer.StopSignals), and the reward guard (rewards.guard).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from rewardiff.errors import Stopped, UserError
from rewardiff.finetune.config import build_config, load_config
from rewardiff.finetune.trainer import Run, RunLock, finetune
from rewardiff.rewards.guard import GuardedReward, RewardFailure
from rewardiff.rewards.base import RewardFn
from tests.helpers import tiny_cfg

SRC = Path(__file__).resolve().parent.parent / "src"


_cfg = tiny_cfg


def _weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "trainable.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- config values

@pytest.mark.parametrize(("values", "needle"), [
    ({"steps": 0}, "'steps' must be at least 1"),
    ({"steps": -5}, "'steps' must be at least 1"),
    ({"steps": True}, "'steps' expects int, got True"),
    ({"batch_size": 0}, "'batch_size' must be at least 1"),
    ({"k": 0}, "'k' must be between 1 and num_inference_steps"),
    ({"k": 100}, "'k' must be between 1 and num_inference_steps (15)"),
    ({"num_inference_steps": 0}, "'num_inference_steps' must be between 1 and 1000"),
    ({"eval_samples": 0}, "'eval_samples' must be at least 1"),
    ({"seed": 2**40}, "'seed' must be between 0 and"),
    ({"mixed_precision": "fp8"}, "'mixed_precision' must be no, bf16 or fp16"),
    ({"lr": float("nan")}, "'lr' must be a positive number"),
    ({"kl_weight": float("inf")}, "'kl_weight' must be a finite number, got inf"),
    ({"lr": float("inf")}, "'lr' must be a finite number, got inf"),
    ({"eta": 2.0}, "'eta' must be in [0, 1]"),
    ({"model": 5}, "'model' expects str, got 5"),
    ({"reward": ["a"]}, "'reward' expects str, got ['a'] (list)"),
    ({"lr": None}, "'lr' expects float, got None"),
    ({"steps": 2.5}, "'steps' expects int, got 2.5"),
    ({"reward_errors": "ignore"}, "'reward_errors' must be raise or skip"),
    ({"method": "ddpo", "batch_size": 3}, "'ppo_minibatches' must be at least 1 and (ddpo) divide batch_size (3)"),
])
def test_out_of_range_and_mistyped_fields_are_named(values, needle):
    with pytest.raises(UserError) as e:
        build_config(values)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_every_default_and_shipped_preset_passes_the_range_checks():
    build_config({})
    for preset in sorted(Path(__file__).resolve().parent.parent.glob("configs/*.yaml")):
        load_config(preset)


def test_binary_and_directory_config_files_are_one_line_errors(tmp_path):
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00\x81binary")
    with pytest.raises(UserError, match="not UTF-8 text"):
        load_config(tmp_path / "bin.yaml")
    with pytest.raises(UserError, match="is a directory"):
        load_config(tmp_path)


def test_binary_prompt_file_is_a_one_line_error(tmp_path):
    from rewardiff.prompts import prompt_set

    (tmp_path / "p.txt").write_bytes(b"\x80\x81\x82")
    with pytest.raises(UserError, match="not UTF-8 text"):
        prompt_set(str(tmp_path / "p.txt"))


def test_training_prompts_outside_the_vocabulary_are_refused_before_anything_is_written(tiny_model_dir, tmp_path):
    (tmp_path / "p.txt").write_text("two red circles\nfive purple hexagons\n")
    with pytest.raises(UserError, match="config field 'prompts'.*'five'"):
        finetune(_cfg(tiny_model_dir, prompts=str(tmp_path / "p.txt")), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- the command line

def _main(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    from rewardiff.cli import main

    monkeypatch.setattr(sys, "argv", ["rewardiff", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize(("args", "needle"), [
    (["finetune"], "give a CONFIG"),
    (["finetune", "a\nb\x1d\u2028.yaml"], "config file not found: a\\nb\\x1d\\u2028.yaml"),
    (["finetune", "--set", "steps=0"], "'steps' must be at least 1"),
    (["finetune", "--set", "steps=-5"], "'steps' must be at least 1"),
    (["finetune", "--set", "k=100"], "'k' must be between 1"),
    (["finetune", "--set", "mixed_precision=fp16"], "fp16 needs a GPU"),
    (["sample", "--out", "s", "--guidance-scale", "nan"], "--guidance-scale must be a number >= 0"),
    (["sample", "--out", "s", "--seed", "99999999999999999999"], "--seed must be between 0 and"),
    (["sample", "--out", "s", "--method", "best-of-n", "--width", "100000", "--reward", "brightness"], "at most 4096"),
    (["sample", "--out", "s", "--method", "best-of-n", "--nfe-budget", "1000000000", "--reward", "brightness"],
     "more than best-of-n can spend"),
    (["sample", "--out", "s", "--method", "svdd-pm", "--option", "m=abc", "--reward", "brightness"], "has no option 'm'"),
])
def test_bad_arguments_are_one_line_with_status_2_and_write_nothing(tmp_path, monkeypatch, capsys, args, needle):
    monkeypatch.chdir(tmp_path)
    code, err = _main(args + (["--out", "run"] if args[0] == "finetune" else []), monkeypatch, capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_exits_130_with_a_message(tmp_path, monkeypatch, capsys):
    """The parser turns an interrupt into a return value; the entry point must not drop it."""
    import rewardiff.sampling as sampling

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sampling, "sample_to_dir", interrupted)
    code, err = _main(["sample", "--out", str(tmp_path / "s")], monkeypatch, capsys)
    assert code == 130 and "interrupted" in err


def test_a_reward_module_beside_the_user_imports(tmp_path, tiny_model_dir):
    (tmp_path / "myreward.py").write_text("import torch\ndef fn(x, prompts):\n    return x.mean(dim=(1, 2, 3))\n")
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "rewardiff", "sample", "--out", "s", "--model", str(tiny_model_dir), "-n", "2",
                          "--steps", "2", "--reward", "myreward:fn"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["reward"] == "myreward:fn"


# ---------------------------------------------------------------- run folders

def test_an_existing_run_is_never_mixed_with_a_new_one(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, steps=2)
    finetune(cfg, tmp_path / "run", progress=False)
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="already holds a run; continue it with --resume"):
        finetune(_cfg(tiny_model_dir, steps=2, lr=1e-3), tmp_path / "run", progress=False)
    after = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert after == before  # nothing was touched


def test_resume_needs_a_run_and_the_same_config(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="holds no run to continue"):
        finetune(_cfg(tiny_model_dir), tmp_path / "none", resume=True, progress=False)
    finetune(_cfg(tiny_model_dir, steps=2), tmp_path / "run", progress=False)
    with pytest.raises(UserError, match="differs from the run's in 'lr': 0.01 in the run, 0.001 now"):
        finetune(_cfg(tiny_model_dir, steps=2, lr=1e-3), tmp_path / "run", resume=True, progress=False)
    # the fields of RESUMABLE_CHANGES may change: a longer run continues the shorter one
    finetune(_cfg(tiny_model_dir, steps=4), tmp_path / "run", resume=True, progress=False)
    finetune(_cfg(tiny_model_dir, steps=4), tmp_path / "straight", progress=False)
    assert _same(_weights(tmp_path / "run"), _weights(tmp_path / "straight"))
    # and the run's config.yaml says what ran: 4 steps, as the uninterrupted run's does
    assert (tmp_path / "run" / "config.yaml").read_text() == (tmp_path / "straight" / "config.yaml").read_text()
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["steps"] == 4


def test_out_that_is_a_file_or_unwritable(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file, not a directory"):
        finetune(_cfg(tiny_model_dir), tmp_path / "f", progress=False)
    real_mkdir = Path.mkdir

    def read_only(self, *a, **k):
        if self.name == "ro":
            raise OSError(errno.EROFS, "Read-only file system")
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(UserError, match="cannot write the run directory .*ro: Read-only file system"):
        finetune(_cfg(tiny_model_dir), tmp_path / "ro", progress=False)


def test_a_second_process_on_the_same_out_refuses(tiny_model_dir, tmp_path):
    """A lock held by another process (here: a child holding it) stops the run before it writes;
    the lock dies with its holder, even killed."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]);"
                               "from rewardiff.finetune.trainer import RunLock; import time; RunLock(sys.argv[2]); print('held', flush=True);"
                               "time.sleep(120)", str(SRC), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"in use by another rewardiff process \\(pid {holder.pid}\\)"):
            finetune(_cfg(tiny_model_dir, steps=1), out, progress=False)
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    RunLock(out).release()  # free again once its holder is gone


# ---------------------------------------------------------------- checkpoints

def test_checkpoints_are_pruned_by_step_number(tiny_model_dir, tmp_path):
    """A stale folder of a higher step (an earlier pass that went further) must not survive in
    place of the run's own last two: pruning by name kept step-000010 and deleted step-000002."""
    run = Run(_cfg(tiny_model_dir), tmp_path, progress=False)
    (tmp_path / "checkpoints" / "step-000010").mkdir(parents=True)
    run.save_checkpoint(2)
    run.save_checkpoint(4)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-000002", "step-000004"]
    run.save_checkpoint(6)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000004", "step-000006"]


def test_a_failing_checkpoint_write_keeps_the_last_one(tiny_model_dir, tmp_path, monkeypatch):
    """A full disk mid-checkpoint: the error says which checkpoint is whole; it still loads."""
    run = Run(_cfg(tiny_model_dir), tmp_path, progress=False)
    run.save_checkpoint(2)
    real_save = torch.save

    def full(obj, path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError, match="cannot write checkpoint step-000004.*No space left on device; the last complete checkpoint, step-000002, is intact"):
        run.save_checkpoint(4)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000002"]
    assert Run(_cfg(tiny_model_dir), tmp_path, progress=False).resume() == 2


@pytest.mark.parametrize("damage", ["truncated-weights", "bad-state", "no-optimizer", "latest-missing"])
def test_a_damaged_checkpoint_is_a_one_line_error_naming_it(tiny_model_dir, tmp_path, damage):
    finetune(_cfg(tiny_model_dir, steps=4), tmp_path / "run", progress=False)
    d = tmp_path / "run" / "checkpoints" / "step-000004"
    if damage == "truncated-weights":
        w = d / "trainable.safetensors"
        w.write_bytes(w.read_bytes()[:50])
        needle = "trainable.safetensors is missing or unreadable"
    elif damage == "bad-state":
        (d / "state.json").write_text("{not json")
        needle = "state.json is missing or unreadable"
    elif damage == "no-optimizer":
        (d / "optimizer.pt").unlink()
        needle = "optimizer.pt is missing or unreadable"
    else:
        (tmp_path / "run" / "checkpoints" / "latest").write_text("step-000099")
        needle = "names a folder that does not exist"
    with pytest.raises(UserError) as e:
        finetune(_cfg(tiny_model_dir, steps=6), tmp_path / "run", resume=True, progress=False)
    assert needle in str(e.value) and "other checkpoints: step-" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- signals

class _SignalAt:
    """Wraps a method: sends ``sig`` to this process during step ``at`` (0-based)."""

    def __init__(self, method, sig, at):
        self.method, self.sig, self.at, self.calls = method, sig, at, 0

    def __call__(self, *args):
        if self.calls == self.at:
            os.kill(os.getpid(), self.sig)
        self.calls += 1
        return self.method(*args)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_is_bit_identical(tiny_model_dir, tmp_path, sig):
    cfg = _cfg(tiny_model_dir, steps=5, checkpoint_every=0)
    run = Run(cfg, tmp_path / "stopped", progress=False)
    run.method = _SignalAt(run.method, sig, at=2)
    before = signal.getsignal(signal.SIGINT)  # the default handler, or SIG_IGN under a launcher that ignores it
    with pytest.raises(Stopped) as e:
        run.train()
    assert e.value.exit_code == 128 + sig and f"stopped by {signal.Signals(sig).name} after step 3 of 5" in str(e.value)
    assert (tmp_path / "stopped" / "checkpoints" / "latest").read_text() == "step-000003"
    assert signal.getsignal(signal.SIGINT) is before  # the handler in place before the run, restored
    finetune(cfg, tmp_path / "stopped", resume=True, progress=False)
    finetune(cfg, tmp_path / "straight", progress=False)
    assert _same(_weights(tmp_path / "stopped"), _weights(tmp_path / "straight"))


def test_ctrl_c_on_the_command_line_exits_130_and_resumes(tiny_model_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "rewardiff", "finetune", "--out", "run", "--set", f"model={tiny_model_dir}", "--set", "reward=brightness",
            "--set", "steps=400", "--set", "batch_size=1", "--set", "num_inference_steps=2", "--set", "k=1", "--set", "eval_samples=2",
            "--set", "checkpoint_every=0", "--set", "eval_every=0", "--set", "guidance_scale=1"]
    p = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=240)
    assert p.returncode == 130, err
    assert "stopped by SIGINT after step" in err and "continue with --resume" in err
    step = int(json.loads((tmp_path / "run" / "checkpoints" / (tmp_path / "run" / "checkpoints" / "latest").read_text() / "state.json")
                          .read_text())["step"])
    assert step >= 2 and metrics.read_text().count("\n") == step  # nothing logged past the checkpoint


# ---------------------------------------------------------------- rewards that misbehave

def _x(n=3, grad=False):
    return torch.zeros(n, 3, 4, 4, requires_grad=grad)


@pytest.mark.parametrize(("fn", "needle"), [
    (lambda x, p: 1 / 0, "raised ZeroDivisionError: division by zero at step 7"),
    (lambda x, p: ["a", "b", "c"], "raised ValueError"),
    (lambda x, p: None, "raised"),
    (lambda x, p: torch.zeros(2), "returned shape (2,); expected (3,) at step 7"),
    (lambda x, p: torch.tensor([1.0, float("nan"), 2.0]), "returned NaN for 1 of 3 samples"),
    (lambda x, p: torch.tensor([1.0, float("inf"), 2.0]), "returned inf for 1 of 3 samples"),
])
def test_a_plain_reward_function_that_misbehaves_is_named(fn, needle):
    guard = GuardedReward(RewardFn("mine", False, None, "", fn))
    guard.context = "step 7 (batch of 3)"
    with pytest.raises(RewardFailure) as e:
        guard(_x(), ["p"] * 3)
    assert str(e.value).startswith("reward 'mine' ") and needle in str(e.value) and "\n" not in str(e.value)


class _Raw:
    """A reward object whose output is not checked by a wrapper of its own."""

    name, value_range = "raw", None

    def __init__(self, out, differentiable=False):
        self.out, self.differentiable = out, differentiable

    def __call__(self, x, prompts):
        return self.out(x)


@pytest.mark.parametrize(("reward", "needle"), [
    (_Raw(lambda x: [1.0, 2.0, 3.0]), "returned a list"),
    (_Raw(lambda x: torch.ones(3, dtype=torch.long)), "returned dtype torch.int64"),
    (_Raw(lambda x: torch.ones(3, device="meta")), "on meta for samples on cpu"),
    (_Raw(lambda x: x.mean(dim=(1, 2, 3)).detach(), differentiable=True), "carries no gradient"),
])
def test_a_reward_object_that_misbehaves_is_named(reward, needle):
    with pytest.raises(RewardFailure, match=needle):
        GuardedReward(reward)(_x(grad=True), ["p"] * 3)


def test_a_good_reward_passes_through_with_its_gradient():
    guard = GuardedReward(_Raw(lambda x: x.mean(dim=(1, 2, 3)) + 1, differentiable=True))
    x = _x(grad=True)
    r = guard(x, ["p"] * 3)
    r.sum().backward()
    assert torch.equal(r.detach(), torch.ones(3)) and x.grad is not None


def test_a_black_box_reward_past_its_timeout_fails():
    slow = RewardFn("slow", False, None, "", lambda x, p: (time.sleep(5), torch.zeros(len(p)))[1])
    t0 = time.perf_counter()
    with pytest.raises(RewardFailure, match="took longer than reward_timeout \\(0.2 s\\)"):
        GuardedReward(slow, timeout=0.2)(_x(), ["p"] * 3)
    assert time.perf_counter() - t0 < 2
    assert torch.equal(GuardedReward(RewardFn("ok", False, None, "", lambda x, p: torch.ones(len(p))), timeout=2)(_x(), ["p"] * 3),
                       torch.ones(3))


def _flaky_module(tmp_path, monkeypatch, fail_on: int):
    """A differentiable reward that raises on its ``fail_on``-th call (1-based) and only then."""
    (tmp_path / "flaky.py").write_text(
        "calls = 0\n"
        "def reward(x, prompts):\n"
        "    global calls\n"
        "    calls += 1\n"
        f"    if calls == {fail_on}:\n"
        "        raise RuntimeError('scorer unavailable')\n"
        "    return x.mean(dim=(1, 2, 3))\n"
        "reward.differentiable = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("flaky", None)


def test_a_reward_that_fails_in_training_stops_the_run_naming_step_and_batch(tiny_model_dir, tmp_path, monkeypatch):
    _flaky_module(tmp_path, monkeypatch, fail_on=5)  # 1 call for the before-evaluation, then one a step
    with pytest.raises(RewardFailure, match=r"reward 'flaky:reward' raised RuntimeError: scorer unavailable at step 4 \(batch of 2: "
                                            r"prompts .*; seeds \d+, \d+\)"):
        finetune(_cfg(tiny_model_dir, steps=6, reward="flaky:reward"), tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-000002"  # the last good checkpoint is kept


@pytest.mark.parametrize("method", [{}, {"method": "ddpo", "eta": 1.0, "batch_size": 2, "ppo_minibatches": 1},
                                    {"method": "grpo", "eta": 1.0, "batch_size": 2, "group_size": 2}], ids=["draft-k", "ddpo", "grpo"])
def test_reward_errors_skip_skips_the_batch_counts_it_and_updates_nothing(tiny_model_dir, tmp_path, monkeypatch, method):
    """Also for methods that yield their losses (DDPO scores its batch on the first one)."""
    _flaky_module(tmp_path, monkeypatch, fail_on=3)
    run = Run(_cfg(tiny_model_dir, reward="flaky:reward", reward_errors="skip", **method), tmp_path, progress=False)
    run.train_step(0)
    run.train_step(1)
    weights = {n: p.detach().clone() for n, p in run.model.net.named_parameters() if p.requires_grad}
    opt_state = json.dumps({k: str(v) for k, v in run.opt.state_dict()["param_groups"][0].items()})
    row = run.train_step(2)
    assert row["skipped"] == 1 and row["reward_skipped"] == 1 and "scorer unavailable" in row["skip_reason"]
    assert all(torch.equal(weights[n], p) for n, p in run.model.net.named_parameters() if p.requires_grad)
    assert json.dumps({k: str(v) for k, v in run.opt.state_dict()["param_groups"][0].items()}) == opt_state
    row = run.train_step(3)
    assert "skipped" not in row and row["reward_mean"] == row["reward_mean"]  # trains again, a finite reward


def test_sample_scores_before_it_writes(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A failing reward leaves no folder of samples without its summary."""
    (tmp_path / "bad.py").write_text("def fn(x, prompts):\n    raise RuntimeError('down')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, err = _main(["sample", "--out", str(tmp_path / "s"), "--model", str(tiny_model_dir), "-n", "2", "--steps", "2",
                       "--reward", "bad:fn"], monkeypatch, capsys)
    assert code == 2 and "reward 'bad:fn' raised RuntimeError: down" in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("damage", ["finetune-json", "weights"])
def test_sampling_a_damaged_fine_tuned_model_is_a_one_line_error(tiny_model_dir, tmp_path, monkeypatch, capsys, damage):
    finetune(_cfg(tiny_model_dir, steps=2), tmp_path / "run", progress=False)
    final = tmp_path / "run" / "final"
    if damage == "finetune-json":
        (final / "finetune.json").write_text("{broken")
    else:
        w = final / "trainable.safetensors"
        w.write_bytes(w.read_bytes()[:40])
    code, err = _main(["sample", "--out", str(tmp_path / "s"), "--checkpoint", str(tmp_path / "run"), "-n", "1", "--steps", "2"],
                      monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot read" in err, err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(("option", "needle"), [("m=abc", "'m' takes a number, got 'abc'"), ("alpha=nan", "takes a number, got nan"),
                                                ("final=3", "true or false"), ("lookahead=2", "a word")])
def test_guidance_options_of_the_wrong_kind_are_named(option, needle):
    from rewardiff.guidance import make_method
    from rewardiff.rewards import get_reward
    from rewardiff.sampling import parse_options

    name = "dsearch" if option.startswith("m=") else "svdd-pm"
    with pytest.raises(UserError, match=needle):
        make_method(name, get_reward("brightness"), **parse_options([option]))


def test_a_non_finite_loss_stops_the_run_keeping_the_last_checkpoint(tiny_model_dir, tmp_path):
    """A finite reward but a NaN loss (weights blown up): the trainer's own check names the step."""
    from rewardiff.errors import NonFiniteError

    run = Run(_cfg(tiny_model_dir), tmp_path, progress=False)
    method = run.method

    def blown(*args):
        out = method(*args)
        return out._replace(loss=out.loss * float("nan"))

    run.train_step(0)
    run.method = blown
    with pytest.raises(NonFiniteError, match="non-finite loss or reward at step 2"):
        run.train_step(1)
