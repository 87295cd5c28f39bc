"""Score distillation onto a differentiable renderer, with VP3D's visual prompt and rewards.

:mod:`rewardiff.distill.sds` holds the SDS gradient (any DDIM-family or flow process);
:mod:`rewardiff.distill.run` the resumable ``rewardiff distill`` loop; settings in
:class:`~rewardiff.distill.config.DistillConfig`.
"""

from rewardiff.distill.config import DistillConfig, load_config
from rewardiff.distill.sds import sds_gradient, sds_loss, t_range_at, weight

__all__ = ["DistillConfig", "load_config", "sds_gradient", "sds_loss", "t_range_at", "weight", "distill"]


def distill(*args, **kwargs):
    """:func:`rewardiff.distill.run.distill` (imported on first use: it reaches the renderer)."""
    from rewardiff.distill.run import distill as run

    return run(*args, **kwargs)
