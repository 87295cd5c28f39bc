"""Line plots of a run's metrics, written as PNG files.

Figures are drawn on matplotlib's Agg canvas directly (no ``pyplot``), so plotting needs no
display, touches no global backend state and works from any thread or process.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rewardiff.io import atomic_write_bytes

SMOOTH_MIN_POINTS = 30
"""From this many points on, ``plot_reward_curve`` draws a moving average over the raw curve."""

Point = tuple[float, float]


def _new_figure(width: float = 7.0, height: float = 4.0) -> Any:
    """A matplotlib figure bound to an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig: Any, path: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


def _number(v: Any) -> float | None:
    """``v`` as a finite float, or None when it is missing, not a number or not finite."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def plot_curves(series: Mapping[str, Sequence[Point]], path: str | os.PathLike, xlabel: str = "step",
                ylabel: str = "value", title: str = "", group: Callable[[str], str] | None = None,
                hline: float | None = None) -> Path:
    """Plot one line per named series, with a legend, and write a PNG atomically.

    Args:
        series: Name to list of ``(x, y)`` points. Points are sorted by ``x``; a series with
            few points is drawn with markers so that a single point stays visible.
        path: Destination PNG; parent folders are created.
        xlabel: Label of the x axis.
        ylabel: Label of the y axis.
        title: Title above the plot.
        group: maps a series name to its group (say, a method for its seeds): a group shares
            one colour, its members differ by line style, and the legend names groups,
            beside the axes.
        hline: draw a dashed horizontal line there (a target).

    Returns:
        The path written.
    """
    fig = _new_figure(width=8.5 if group else 7.0)
    ax = fig.add_subplot(1, 1, 1)
    groups: dict[str, int] = {}
    members: dict[str, int] = {}
    for name, points in series.items():
        pts = sorted((float(x), float(y)) for x, y in points)
        if not pts:
            continue
        xs, ys = zip(*pts)
        style: dict[str, Any] = {"label": name}
        if group is not None:
            g = group(name)
            first = g not in groups
            groups.setdefault(g, len(groups))
            members[g] = members.get(g, -1) + 1
            style = {"label": g if first else None, "color": f"C{groups[g] % 10}", "linestyle": ("-", "--", ":", "-.")[members[g] % 4]}
        ax.plot(xs, ys, marker="o" if len(pts) <= 20 else None, markersize=3 if group else 4, **style)
    if hline is not None:
        ax.axhline(hline, color="black", linestyle="--", linewidth=0.8)
    _decorate(ax, xlabel, ylabel, title)
    if not any(len(p) for p in series.values()):
        _no_data(ax)
    elif series and group is not None:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, title="line style: seed", title_fontsize=8)
    elif series:
        ax.legend(loc="best", fontsize=9)
    return _save_png(fig, path)


def plot_bands(series: Mapping[str, Sequence[Sequence[float]]], path: str | os.PathLike, xlabel: str = "step",
               ylabel: str = "value", title: str = "", x: Sequence[float] | None = None) -> Path:
    """Plot one line per named series, its mean over runs (seeds), with a band from the lowest to
    the highest run at each point, and write a PNG atomically.

    Args:
        series: Name to runs, an array-like [S, N]: S runs of N points each (a single run draws
            no band).
        path: Destination PNG; parent folders are created.
        xlabel, ylabel, title: Axis labels and the title.
        x: The N abscissas (default 1, ..., N).

    Returns:
        The path written.
    """
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, runs) in enumerate(series.items()):
        y = np.atleast_2d(np.asarray(runs, dtype=np.float64))  # [S, N]
        if y.size == 0:
            continue
        xs = np.arange(1, y.shape[1] + 1) if x is None else np.asarray(x, dtype=np.float64)
        color = f"C{i % 10}"
        ax.plot(xs, y.mean(0), color=color, label=name)
        if len(y) > 1:
            ax.fill_between(xs, y.min(0), y.max(0), color=color, alpha=0.2, linewidth=0)
    _decorate(ax, xlabel, ylabel, title)
    if any(np.size(r) for r in series.values()):
        ax.legend(loc="best", fontsize=9)
    else:
        _no_data(ax)
    return _save_png(fig, path)


def _decorate(ax: Any, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)


def _no_data(ax: Any) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")


def column(metrics: Iterable[Mapping[str, Any]], key: str, x_key: str = "step") -> list[Point]:
    """The ``(x, y)`` points of ``key`` in the rows that hold both keys as finite numbers."""
    points = []
    for row in metrics:
        x, y = _number(row.get(x_key)), _number(row.get(key))
        if x is not None and y is not None:
            points.append((x, y))
    return sorted(points)


def moving_average(ys: Sequence[float], window: int) -> np.ndarray:
    """Centred moving average; the window shrinks at the ends so the output keeps ``len(ys)``."""
    y = np.asarray(ys, dtype=np.float64)
    if window <= 1 or len(y) == 0:
        return y
    csum = np.concatenate([[0.0], np.cumsum(y)])
    idx = np.arange(len(y))
    lo = np.clip(idx - window // 2, 0, len(y))
    hi = np.clip(idx + (window - window // 2), 0, len(y))
    return (csum[hi] - csum[lo]) / (hi - lo)


def plot_reward_curve(metrics: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                      title: str = "Reward during training") -> Path:
    """Plot ``reward_mean`` against ``step`` from a run's metrics rows and write a PNG.

    With ``SMOOTH_MIN_POINTS`` points or more, the raw curve is drawn faintly under a
    centred moving average (window about a twentieth of the run). Rows that also hold
    held-out evaluations add markers: ``eval_reward_mean`` on the reward axis (it is the same
    reward, so the two read against each other), and ``eval_judge_count`` (a fraction in
    [0, 1]) on a second axis at the right.

    Args:
        metrics: Rows as read by ``read_metrics``; rows without a key are skipped for it.
        path: Destination PNG; parent folders are created.
        title: Title above the plot.

    Returns:
        The path written.
    """
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    handles = _draw_reward(ax, column(metrics, "reward_mean"))
    handles += _draw_eval_reward(ax, column(metrics, "eval_reward_mean"))
    handles += _draw_judge(ax, column(metrics, "eval_judge_count"))
    _decorate(ax, "step", "reward", title)
    if handles:  # on the top axes, so that no line of the second axis crosses it
        fig.axes[-1].legend(handles=handles, loc="best", fontsize=9)
    else:
        _no_data(ax)
    return _save_png(fig, path)


def _draw_reward(ax: Any, points: list[Point]) -> list[Any]:
    if not points:
        return []
    xs, ys = zip(*points)
    if len(points) < SMOOTH_MIN_POINTS:
        return ax.plot(xs, ys, color="C0", marker="o", markersize=3, label="reward (train batch)")
    raw = ax.plot(xs, ys, color="C0", alpha=0.3, linewidth=0.8, label="reward (train batch)")
    window = max(2, len(points) // 20)
    smooth = ax.plot(xs, moving_average(ys, window), color="C0", linewidth=2,
                     label=f"moving average of {window}")
    return raw + smooth


def _draw_eval_reward(ax: Any, points: list[Point]) -> list[Any]:
    if not points:
        return []
    xs, ys = zip(*points)
    return ax.plot(xs, ys, linestyle="none", marker="D", color="C1", markersize=6, label="reward (held-out)")


def _draw_judge(ax: Any, points: list[Point]) -> list[Any]:
    if not points:
        return []
    xs, ys = zip(*points)
    ax2 = ax.twinx()
    ax2.set_ylabel("judge: count correct")
    if all(0.0 <= y <= 1.0 for y in ys):
        ax2.set_ylim(-0.02, 1.02)
    return ax2.plot(xs, ys, linestyle=":", linewidth=1, marker="s", color="C2", markersize=6,
                    label="judge count (held-out)")
