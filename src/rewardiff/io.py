"""Atomic file writes and the metrics log, shared by every module that writes a run."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``.

    A reader never sees a half-written file: it sees the old file or the new one.
    Parent folders are created when missing.

    Args:
        path: Destination file.
        data: The complete file content.

    Returns:
        The destination as a ``Path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a report is meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write through ``write(tmp_path)`` (e.g. a safetensors or torch saver), then rename onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` as UTF-8 to ``path`` atomically (see ``atomic_write_bytes``)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def truncate_jsonl(path: str | os.PathLike, step: int) -> None:
    """Keep the complete rows of a JSON-lines log whose ``step`` is at most ``step``.

    Used on resume, so that the steps redone after the last checkpoint are logged once.
    """
    import json

    path = Path(path)
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= step:
            keep.append(line + "\n")
    atomic_write_text(path, "".join(keep))


def save_module(directory: str | os.PathLike, module, config: dict) -> Path:
    """A module's tensors as ``model.safetensors`` and ``config`` as ``config.json`` in
    ``directory``, each written atomically."""
    import json

    from safetensors.torch import save_file

    d = Path(directory)
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    atomic_write(d / "model.safetensors", lambda p: save_file(state, str(p)))
    atomic_write_text(d / "config.json", json.dumps(config, indent=2))
    return d


def is_module_dir(directory: str | os.PathLike, fmt: str) -> bool:
    """Whether ``directory`` holds a module that :func:`save_module` wrote with ``format`` ``fmt``."""
    import json

    d = Path(directory)
    try:
        return (d / "model.safetensors").is_file() and json.loads((d / "config.json").read_text()).get("format") == fmt
    except (OSError, ValueError, AttributeError):
        return False


def load_module(directory: str | os.PathLike, fmt: str, build, missing: str):
    """The module in ``directory`` written by :func:`save_module` with ``format`` ``fmt``:
    ``build(**config)`` (the config without its ``format``) with the saved tensors, in eval mode.

    Raises:
        UserError: ``missing`` when the folder holds no such module; one line when the
            config or the tensors do not fit ``build``.
    """
    from rewardiff.errors import UserError

    d = Path(directory)
    if not is_module_dir(d, fmt):
        raise UserError(missing)
    try:
        net = read_module(d, build, drop=("format",))
    except (TypeError, RuntimeError) as e:
        raise UserError(f"cannot load the model in {d}: {str(e).splitlines()[0]}") from None
    return net.eval()


def read_module(directory: str | os.PathLike, build, drop: tuple[str, ...] = (), tuples: tuple[str, ...] = ()):
    """``build(**config)`` with the tensors :func:`save_module` wrote in ``directory``; the
    config's keys in ``drop`` left out and those in ``tuples`` made tuples again (JSON has lists).

    Raises:
        FileNotFoundError: no ``model.safetensors`` in ``directory``.
    """
    import json

    from safetensors.torch import load_file

    d = Path(directory)
    if not (d / "model.safetensors").exists():
        raise FileNotFoundError(f"no model.safetensors in {d}")
    cfg = {k: tuple(v) if k in tuples else v for k, v in json.loads((d / "config.json").read_text()).items() if k not in drop}
    net = build(**cfg)
    net.load_state_dict(load_file(str(d / "model.safetensors")))
    return net
