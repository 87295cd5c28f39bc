"""Reports of runs: image grids, metric plots, diversity measures and a self-contained HTML page."""

from rewardiff.report.diversity import diversity_by_prompt, pairwise_diversity
from rewardiff.report.grid import GUTTER, grid_image, label_height, save_grid
from rewardiff.report.html import Section, read_metrics, step_rows, training_tail, write_report
from rewardiff.report.plots import plot_bands, plot_curves, plot_reward_curve
from rewardiff.report.strict import strict_dumps, strict_json, write_json

__all__ = [
    "GUTTER",
    "Section",
    "diversity_by_prompt",
    "grid_image",
    "label_height",
    "pairwise_diversity",
    "plot_bands",
    "plot_curves",
    "plot_reward_curve",
    "read_metrics",
    "step_rows",
    "training_tail",
    "save_grid",
    "strict_dumps",
    "strict_json",
    "write_json",
    "write_report",
]
