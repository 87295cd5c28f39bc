"""The ``rewardiff`` command."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from rewardiff.errors import NonFiniteError, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Steer generative models toward a reward.")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="run directory")] = Path("runs/demo"),
    steps: Annotated[Optional[int], typer.Option(help="training steps (default: the preset's)")] = None,
) -> None:
    """Teach the shipped shapes model to count by reward backpropagation, then write the report."""
    from rewardiff.finetune.presets import demo_config
    from rewardiff.finetune.trainer import finetune as run
    from rewardiff.finetune.trainer import is_run

    cfg = demo_config(steps)
    again = is_run(out)  # a second `make demo` continues (or re-reads) the first one's run
    typer.echo(f"fine-tuning the shapes model with {cfg.method} on {cfg.reward} for {cfg.steps} steps -> {out}"
               + (" (continuing the run there)" if again else ""))
    finished = again and (out / "summary.json").is_file() and (out / "demo.json").is_file()
    t0 = time.perf_counter()
    summary = run(cfg, out, resume=again)
    if finished:  # nothing was trained now: the figures (and the time) are the finished run's
        demo = json.loads((out / "demo.json").read_text())
    else:
        demo = demo_summary(cfg, summary, time.perf_counter() - t0, out)
    typer.echo(f"judge counting accuracy on held-out prompts: {demo['judge_count_before']:.1%} -> {demo['judge_count_after']:.1%}")
    typer.echo(f"reward ({cfg.reward}) on held-out prompts: {demo['reward_before']:.3f} -> {demo['reward_after']:.3f}")
    typer.echo(f"in {demo['seconds']:.0f} s; summary: {out / 'demo.json'}; report: {out / 'report.html'}")


def demo_summary(cfg, summary: dict, seconds: float, out: Path) -> dict:
    """``demo.json`` in the run folder: the judge's counting accuracy and the reward before and
    after on the held-out samples, the time, the machine and the commit."""
    from dataclasses import asdict

    from rewardiff.provenance import stamp
    from rewardiff.report.strict import write_json

    b, a = summary["before"], summary["after"]
    demo = {"command": f"rewardiff demo --out {out}" + ("" if cfg.steps == 200 else f" --steps {cfg.steps}"),
            "judge_count_before": b["eval_judge_count"], "judge_count_after": a["eval_judge_count"],
            "reward": cfg.reward, "reward_before": b["eval_reward_mean"], "reward_after": a["eval_reward_mean"],
            "eval_samples": cfg.eval_samples, "steps": cfg.steps, "seconds": seconds, "seconds_per_step": _step_seconds(out),
            **stamp(), "config": asdict(cfg)}
    write_json(out / "demo.json", demo)
    return demo


def _step_seconds(out: Path) -> float | None:
    """The median training step's seconds in the run's ``metrics.jsonl``."""
    import statistics

    from rewardiff.report import read_metrics

    secs = [row["seconds"] for row in read_metrics(out) if "seconds" in row]
    return statistics.median(secs) if secs else None


@app.command()
def finetune(
    config: Annotated[Optional[Path], typer.Argument(help="YAML preset (configs/*.yaml; every method has one)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a field: key=value")] = None,
    out: Annotated[Path, typer.Option(help="run directory (must not hold a run, unless --resume)")] = Path("runs/finetune"),
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its last checkpoint, with the same config")] = False,
) -> None:
    """Fine-tune a model on a reward (draft, draft-k, draft-lv, alignprop, refl, ddpo, vard, grpo, nft; gumbel for token models).

    Ctrl-C or SIGTERM stops at the end of the current step with a checkpoint (exit status 130 or
    143); --resume continues bit for bit. A mistake in the config or the arguments is one line
    and exit status 2, with nothing written."""
    from rewardiff.finetune.config import load_config
    from rewardiff.finetune.trainer import finetune as run, release_process_group

    if config is None and not set_:
        raise UserError("give a CONFIG (a preset: configs/*.yaml) or fields with --set key=value; see rewardiff finetune --help")
    cfg = load_config(config, set_)
    summary = run(cfg, out, resume=resume)
    release_process_group()
    from rewardiff.report.strict import strict_dumps

    typer.echo(strict_dumps({k: summary[k] for k in ("before", "after")}, indent=2))
    typer.echo(f"report: {out / 'report.html'}")


@app.command()
def sample(
    out: Annotated[Path, typer.Option(help="output directory")],
    model: Annotated[str, typer.Option(help="model: shapes, shapes-sr, shapes-3d, molecules, molecules-ar, hf:DIR, diffusers:DIR or a model directory")] = "shapes",
    checkpoint: Annotated[Optional[Path], typer.Option(help="fine-tuned run or checkpoint directory")] = None,
    prompt: Annotated[Optional[list[str]], typer.Option(help="prompt (repeat for several; default: 'two red circles')")] = None,
    prompts_file: Annotated[Optional[Path], typer.Option(help="file of prompts: one a line (blank lines and # comments "
                                                         "skipped) or a .json list; with --prompt, both are sampled, "
                                                         "the --prompt ones first")] = None,
    n: Annotated[int, typer.Option("-n", help="samples per prompt")] = 8,
    seed: Annotated[int, typer.Option(help="first seed")] = 0,
    reward: Annotated[Optional[str], typer.Option(help="reward to steer toward and to score the samples with")] = None,
    steps: Annotated[int, typer.Option(help="DDIM steps (autoregressive models take one step a token)")] = 15,
    guidance_scale: Annotated[Optional[float], typer.Option(help="classifier-free guidance scale (default: 2; unconditional models take none)")] = None,
    eta: Annotated[Optional[float], typer.Option(help="DDIM eta (default: the method's: 0 for base, best-of-n, gradient; 1 for svdd, dsearch, free2guide, smc)")] = None,
    method: Annotated[str, typer.Option(help="base, best-of-n, gradient, svdd-pm, svdd-mc, dsearch, dsearch-r, free2guide, smc (autoregressive models: base, best-of-n)")] = "base",
    width: Annotated[Optional[int], typer.Option(help="the method's width: best-of-n N, svdd M, dsearch oversample, free2guide n, smc K")] = None,
    nfe_budget: Annotated[Optional[int], typer.Option(help="denoiser evaluations per sample: sets the width")] = None,
    value: Annotated[Optional[Path], typer.Option(help="value model directory (svdd-mc, smc), from rewardiff train-value")] = None,
    option: Annotated[Optional[list[str]], typer.Option(help="method option key=value (alpha, scale, lam, window, m, w, ess, final, replace, ...)")] = None,
) -> None:
    """Sample a model, optionally steered by an inference-time method; writes grid.png (a row per prompt), samples/ and summary.json."""
    from rewardiff.report.strict import strict_dumps
    from rewardiff.sampling import gather_prompts, parse_options, sample_to_dir

    summary = sample_to_dir(out, model, checkpoint, gather_prompts(prompt, prompts_file), n, seed, reward, steps, guidance_scale,
                            eta, method, width, nfe_budget, value, parse_options(option))
    typer.echo(strict_dumps(summary, indent=2))


@app.command()
def pretrain(
    world: Annotated[str, typer.Argument(help="which world model: shapes, shapes-flow, shapes-geneval, shapes-video, shapes-sr, shapes-3d, molecules or molecules-ar")],
    out: Annotated[Optional[Path], typer.Option(help="training directory, resumed when it holds a checkpoint (default: runs/pretrain-WORLD)")] = None,
    steps: Annotated[Optional[int], typer.Option(help="optimizer steps (default: the world's, as its shipped model)")] = None,
    seed: Annotated[int, typer.Option(help="seed")] = 0,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="a field of the world's pretraining config: key=value (dim=192)")] = None,
) -> None:
    """Train a world's base model (resumable), then export it with its card to OUT/model."""
    from rewardiff import plugins
    from rewardiff.sampling import parse_options

    command = plugins.resolve(plugins.PRETRAIN, world, "world")
    typer.echo(command(out or Path(f"runs/pretrain-{world}"), steps, seed, parse_options(set_, "--set")))


@app.command("eval")
def eval_(
    suite: Annotated[str, typer.Argument(help="evaluation suite: geneval-shapes (GenEval's six tasks in the shapes world)")],
    model: Annotated[str, typer.Option(help="model: shapes-geneval, or a model directory")] = "shapes-geneval",
    checkpoint: Annotated[Optional[Path], typer.Option(help="fine-tuned run or checkpoint directory")] = None,
    split: Annotated[str, typer.Option(help="prompts: held-out, train or all")] = "held-out",
    n: Annotated[int, typer.Option("-n", "--n", help="samples per prompt")] = 4,
    steps: Annotated[int, typer.Option(help="sampler steps")] = 15,
    guidance_scale: Annotated[Optional[float], typer.Option(help="classifier-free guidance scale (default: 2)")] = None,
    eta: Annotated[float, typer.Option(help="sampler noise (DDIM eta; flow: SDE noise), 0 for the ODE")] = 0.0,
    seed: Annotated[int, typer.Option(help="first seed (one a sample)")] = 10_000,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("runs/eval"),
) -> None:
    """Sample every prompt of a suite's split n times, judge the samples; writes OUT/geneval.json and OUT/grid.png."""
    from rewardiff import plugins

    run = plugins.resolve(plugins.EVALUATION_SUITES, suite, "evaluation suite")
    typer.echo(run(out, model, checkpoint, split, n, steps, guidance_scale, eta, seed))


@app.command("train-reward")
def train_reward(
    world: Annotated[str, typer.Argument(help="whose reward model: shapes (count and colour), shapes3d (colour counts of 3D renders) or shapes-geneval (the GenEval grammar)")] = "shapes",
    out: Annotated[Path, typer.Option(help="output directory")] = Path("runs/shapes-rm"),
    steps: Annotated[int, typer.Option(help="training steps")] = 600,
    seed: Annotated[int, typer.Option(help="seed")] = 0,
    base_samples: Annotated[int, typer.Option(help="base-model samples labelled by the judge to train on")] = 2048,
) -> None:
    """Train a world's reward model: the shapes one (count and colour heads), the 3D world's, or the GenEval grammar's."""
    from rewardiff import plugins

    card = plugins.resolve(plugins.REWARD_TRAINERS, world, "reward trainer")(out, steps, seed, base_samples)
    typer.echo(json.dumps(card, indent=2))


@app.command("train-value")
def train_value_cmd(
    reward: Annotated[str, typer.Option(help="reward the value predicts (a name, module:function or weighted sum)")],
    out: Annotated[Path, typer.Option(help="output directory (value.safetensors, value.json)")],
    model: Annotated[str, typer.Option(help="base model: shapes, molecules (token value net), or a directory holding model.safetensors")] = "shapes",
    checkpoint: Annotated[Optional[Path], typer.Option(help="fine-tuned run or checkpoint directory to sample instead")] = None,
    trajectories: Annotated[int, typer.Option(help="base-model rollouts to regress on (10% held out)")] = 2048,
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 1500,
    seed: Annotated[int, typer.Option(help="seed of the rollouts, the split and the training")] = 0,
    num_inference_steps: Annotated[int, typer.Option(help="sampler steps: the timesteps the value is fitted at")] = 15,
    guidance_scale: Annotated[float, typer.Option(help="classifier-free guidance scale of the sampler (1 for unconditional models)")] = 2.0,
    eta: Annotated[float, typer.Option(help="DDIM eta of the sampler (1: DDPM-like)")] = 1.0,
) -> None:
    """Train a value model (SVDD-MC) that predicts the final reward from a noisy sampler state."""
    from rewardiff.rewards.value import train_value
    from rewardiff.rewards import get_reward
    from rewardiff.sampling import load_model

    reward_fn = get_reward(reward)
    m = load_model(model, checkpoint)
    card = train_value(
        m, reward_fn, out, trajectories=trajectories, steps=steps, seed=seed, num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, eta=eta, model_name=str(checkpoint) if checkpoint is not None else model,
    )
    mt = card["metrics"]

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    typer.echo(json.dumps({**card, "metrics": {k: v for k, v in mt.items() if k != "r2_by_step"}}, indent=2))
    typer.echo(f"held-out R^2: {fmt(mt['r2_heldout'])} (early {fmt(mt['r2_early'])}, middle {fmt(mt['r2_middle'])}, "
               f"late {fmt(mt['r2_late'])}); train MSE (standardized) {mt['train_mse_standardized']:.3f}")
    typer.echo(f"value model: {out / 'value.safetensors'} (config {out / 'value.json'})")


@app.command()
def soup(
    a: Annotated[Path, typer.Argument(help="model A: a fine-tuning run (or its final/ or a checkpoint)")],
    b: Annotated[Path, typer.Argument(help="model B, fine-tuned from the same base with the same LoRA settings")],
    out: Annotated[Path, typer.Option(help="output directory")],
    alpha: Annotated[float, typer.Option(help="weight of B: (1 - alpha) A + alpha B")] = 0.5,
    curve: Annotated[int, typer.Option(help="also measure both rewards at this many alphas in [0, 1] and plot them (0: no)")] = 0,
    rewards: Annotated[Optional[str], typer.Option(help="the two rewards of the curve, comma-separated (default: the runs' own)")] = None,
    samples: Annotated[int, typer.Option(help="held-out samples per point of the curve")] = 96,
) -> None:
    """Interpolate two fine-tuned models' weights (a model soup); optionally plot the reward trade-off along alpha."""
    from rewardiff.finetune.soup import soup_curve, write_soup

    d = write_soup(a, b, alpha, out)
    typer.echo(f"soup (alpha={alpha}) written to {d}; sample it with: rewardiff sample --checkpoint {d}")
    if curve:
        names = tuple(r.strip() for r in rewards.split(",")) if rewards else None
        if names is not None and len(names) != 2:
            raise UserError(f"--rewards takes two comma-separated rewards, got {rewards!r}")
        table = soup_curve(a, b, out, points=curve, rewards=names, samples=samples)
        typer.echo(json.dumps(table["rows"], indent=2))
        typer.echo(f"plot: {out / 'soup_curve.png'}")


@app.command()
def distill(
    config: Annotated[Optional[Path], typer.Argument(help="YAML of distill fields (configs/distill-*.yaml)")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="the text (default: the config's)")] = None,
    model: Annotated[Optional[str], typer.Option(help="the prior: shapes-3d (default), any rewardiff model, diffusers:DIR")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="a field: key=value (steps=400, visual_prompt=generate, ...)")] = None,
    out: Annotated[Path, typer.Option(help="run directory (must not hold a run, unless --resume)")] = Path("runs/distill"),
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its last checkpoint, with the same config")] = False,
) -> None:
    """Text-to-3D: score distillation (SDS) from a diffusion model onto 3D Gaussians, with VP3D's visual prompt and rewards.

    Writes the scene, a turntable (PNG strip and GIF), summary.json and report.html to --out.
    Ctrl-C or SIGTERM stops at the end of the current step with a checkpoint; --resume continues."""
    from rewardiff.distill.config import load_config
    from rewardiff.distill.run import distill as run
    from rewardiff.report.strict import strict_dumps
    from rewardiff.sampling import parse_options

    fields = parse_options(set_, "--set")
    if prompt is not None:
        fields["prompt"] = prompt
    if model is not None:
        fields["model"] = model
    cfg = load_config(config, fields)
    summary = run(cfg, out, resume=resume)
    typer.echo(strict_dumps(summary, indent=2))
    typer.echo(f"turntable: {out / 'turntable.gif'}; report: {out / 'report.html'}")


@app.command()
def tune(
    out: Annotated[Path, typer.Option(help="run directory; its bank (OUT/bank) is resumed when the bank's settings match")] = Path("runs/tune"),
    model: Annotated[str, typer.Option(help="model whose sampler settings are the arms")] = "shapes",
    prompt_set: Annotated[str, typer.Option(help="the contexts: a prompt set (train, held-out, all) or a prompt file")] = "train",
    prompts: Annotated[int, typer.Option(help="keep this many prompts, spread through the set (0: all)")] = 8,
    methods: Annotated[str, typer.Option(help="methods of the arm grid, comma-separated")] = "base,best-of-n,svdd-pm,smc",
    widths: Annotated[str, typer.Option(help="widths of the arm grid (base takes none)")] = "2,4",
    guidance_scales: Annotated[str, typer.Option(help="classifier-free guidance scales of the arm grid")] = "1.5,3",
    arms: Annotated[int, typer.Option(help="keep this many arms, evenly spaced through the grid (0: all)")] = 0,
    samples: Annotated[int, typer.Option(help="bank samples per (prompt, arm)")] = 4,
    steps: Annotated[int, typer.Option(help="DDIM steps of every arm")] = 15,
    reward: Annotated[str, typer.Option(help="reward the methods steer by")] = "shapes-count",
    rating: Annotated[str, typer.Option(help="reward the simulated users rate with")] = "shapes-count",
    noise: Annotated[float, typer.Option(help="standard deviation of the Gaussian noise on a rating")] = 0.1,
    rounds: Annotated[int, typer.Option(help="users in a stream")] = 1000,
    seeds: Annotated[str, typer.Option(help="stream seeds, comma-separated")] = "0,1,2",
    epsilon: Annotated[str, typer.Option(help="privacy levels of the private agent, comma-separated (inf: no noise)")] = "0.5,1,2,4",
    delta: Annotated[float, typer.Option(help="delta of the private release")] = 1e-5,
    explore: Annotated[int, typer.Option(help="uniform rounds before the private release (0: a quarter of --rounds)")] = 0,
    kernel: Annotated[str, typer.Option(help="kernel on (prompt, setting) features: rbf or matern (5/2)")] = "rbf",
    lengthscale: Annotated[float, typer.Option(help="the kernel's lengthscale")] = 2.0,
    bank_seed: Annotated[int, typer.Option(help="first seed of the bank's samples")] = 0,
) -> None:
    """Learn which sampler setting users prefer per prompt from a stream of ratings, privately.

    Builds a bank of rated samples for every (prompt, setting), then plays the private kernel
    bandit at each --epsilon, GP-UCB and uniform arms on the same simulated streams; writes
    summary.json, regret.png, grid.png and report.html. Ctrl-C keeps the finished bank cells:
    the same command resumes."""
    import signal

    from rewardiff.errors import Stopped
    from rewardiff.tune import TuneConfig, parse_list, run_tune

    cfg = TuneConfig(model=model, prompt_set=prompt_set, prompts=prompts, methods=parse_list(methods, str, "--methods"),
                     widths=parse_list(widths, int, "--widths"), guidance_scales=parse_list(guidance_scales, float, "--guidance-scales"),
                     arms=arms, samples=samples, steps=steps, reward=reward, rating=rating, bank_seed=bank_seed, noise=noise,
                     rounds=rounds, seeds=parse_list(seeds, int, "--seeds"), epsilons=parse_list(epsilon, float, "--epsilon"),
                     delta=delta, explore=explore, kernel=kernel, lengthscale=lengthscale)
    try:
        summary = run_tune(cfg, out)
    except KeyboardInterrupt:
        raise Stopped(signal.SIGINT, f"interrupted; the bank keeps its finished cells in {out / 'bank'}: run the same command to resume") from None
    for name, a in summary["agents"].items():
        c, r = a["cumulative_regret"], a["simple_regret"]
        typer.echo(f"{name:16s} cumulative regret {c['mean']:8.2f} ± {c['std']:6.2f}   simple regret {r['mean']:.3f} ± {r['std']:.3f}")
    s = summary["seconds"]
    typer.echo(f"bank {s['bank_build']:.0f} s, streams {s['streams']:.0f} s; summary: {out / 'summary.json'}; report: {out / 'report.html'}")


@app.command("serve-reward")
def serve_reward(
    name: Annotated[str, typer.Argument(help="reward to serve: a registered name (rewardiff rewards) or package.module:function; images only")],
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port (0: any free one, printed)")] = 8000,
    template: Annotated[Optional[str], typer.Option(help="chat text holding {prompt} that /v1/chat/completions reads the prompt from "
                                                   "(default: the remote reward's digit and yes/no templates)")] = None,
    range_: Annotated[Optional[str], typer.Option("--range", help="LO,HI: the reward values mapped to digit 1 and 9 "
                                                  "(default: the reward's value range)")] = None,
    last_image: Annotated[bool, typer.Option("--last-image", help="score only a chat message's last image (the others are "
                                             "context, e.g. a super-resolution input and its truth)")] = False,
) -> None:
    """Serve a reward over HTTP: POST /score, and /v1/chat/completions as a vision-language server answers the openai: reward."""
    from rewardiff.rewards.server import serve

    serve(name, host, port, template, range_, last_image=last_image)


@app.command()
def rewards() -> None:
    """List the registered rewards."""
    from rewardiff.rewards import list_rewards

    for name, diff, desc in list_rewards():
        typer.echo(f"{name:24s} {'differentiable' if diff else 'black-box':15s} {desc}")


def main() -> None:
    """Entry point: user mistakes print one line and exit 2, never a traceback; a run stopped by
    a signal exits 128 + its number (130 for Ctrl-C, 143 for SIGTERM)."""
    import os

    from rewardiff.errors import Stopped, one_line

    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # a user's `--reward mymodule:fn` beside them imports, as with `python -m`
    try:
        rv = app(standalone_mode=False)
    except (UserError, NonFiniteError) as e:
        typer.echo(f"error: {one_line(str(e))}", err=True)
        sys.exit(2)
    except Stopped as e:
        typer.echo(str(e), err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted; the last checkpoint is intact (resume with --resume)", err=True)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:
        # usage errors of the command-line parser (typer bundles its own click)
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            ctx = getattr(e, "ctx", None)
            where = ctx.command_path if ctx is not None else "rewardiff"
            typer.echo(f"error: {one_line(e.format_message())} (see {where} --help)", err=True)
            sys.exit(e.exit_code)
        if type(e).__name__ == "Abort":  # the parser's name for an interrupt at a prompt
            typer.echo("interrupted", err=True)
            sys.exit(130)
        raise
    if isinstance(rv, int) and rv != 0:  # the parser turns an interrupt it caught into 130
        if rv == 130:
            typer.echo("interrupted; the last checkpoint is intact (resume with --resume)", err=True)
        sys.exit(rv)
