"""The embedded worlds, one folder each, which the core reaches only through :mod:`rewardiff.plugins`.

``WEIGHTS`` is the one place that names the folder of shipped weights (base models, reward
models, tokenizers and reward statistics of every world).
"""

from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent / "weights"
