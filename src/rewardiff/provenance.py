"""Where a figure came from: the machine, the software and the commit, for results kept as JSON."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path


def commit() -> str | None:
    """The git commit of the source tree this package runs from (with ``-dirty`` when it has
    uncommitted changes), or None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev.stdout.strip() + ("-dirty" if dirty else "")


def machine() -> dict:
    """The machine and software: CPU cores, processor, accelerator, Python, torch and thread count."""
    import torch

    from rewardiff import __version__

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "system": platform.system(),
            "gpu": gpu, "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "rewardiff": __version__}


def stamp() -> dict:
    """``{"date", "commit", "machine"}`` to store beside a measured figure."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": commit(),
            "machine": machine()}
