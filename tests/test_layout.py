"""The package layout: the core knows no world, no class checks on models, every registry entry resolves."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rewardiff import plugins
from rewardiff.errors import UserError

SRC = Path(__file__).resolve().parent.parent / "src" / "rewardiff"
MODEL_CLASSES = {"DiffusionModel", "TokenModel", "HFCausalLM", "GaussianProcess", "FlowProcess", "MaskedProcess"}


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import in a module, those inside functions included;
    ``from rewardiff import worlds`` counts as ``rewardiff.worlds``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def world_imports(source: str) -> list[int]:
    """Lines of ``source`` that import anything of ``rewardiff.worlds``."""
    mods = imported_modules(ast.parse(source))
    return sorted({line for line, mod in mods if mod == "rewardiff.worlds" or mod.startswith("rewardiff.worlds.")})


def model_class_checks(source: str) -> list[int]:
    """Lines of ``source`` with ``isinstance(x, C)`` where C names a model or process class."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
            names = {n.id if isinstance(n, ast.Name) else getattr(n, "attr", None) for n in ast.walk(node.args[1])}
            if names & MODEL_CLASSES:
                lines.append(node.lineno)
    return lines


def _core_files(skip: tuple[str, ...]) -> list[Path]:
    return [p for p in sorted(SRC.rglob("*.py")) if p.relative_to(SRC).parts[0] not in skip]


def test_the_rule_checkers_catch_a_violation():
    assert world_imports("def f():\n    from rewardiff.worlds.shapes import data\n") == [2]
    assert world_imports("from rewardiff import worlds\n") == [1]
    assert world_imports("import rewardiff.worlds.molecules.chem as c\n") == [1]
    assert world_imports("from rewardiff.worldsy import x\nimport rewardiff.rewards\n") == []
    assert model_class_checks("if isinstance(m, TokenModel): pass\n") == [1]
    assert model_class_checks("ok = isinstance(p, (int, mod.MaskedProcess))\n") == [1]
    assert model_class_checks("ok = isinstance(x, Tensor)\n") == []


def test_nothing_outside_worlds_imports_a_world():
    bad = [f"{p.relative_to(SRC)}:{line}" for p in _core_files(("worlds",)) for line in world_imports(p.read_text())]
    assert not bad, f"core modules import world code: {bad}"


def test_no_class_checks_on_models_outside_the_models_package():
    bad = [f"{p.relative_to(SRC)}:{line}" for p in _core_files(("models", "processes")) for line in model_class_checks(p.read_text())]
    assert not bad, f"isinstance on model classes (use capabilities): {bad}"


def test_importing_the_rewards_imports_no_rdkit_and_no_world():
    code = ("import sys, rewardiff.rewards, rewardiff.plugins; from rewardiff.rewards import list_rewards; list_rewards(); "
            "print(sorted(m for m in sys.modules if m.startswith(('rdkit', 'rewardiff.worlds'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def _entries():
    for reg_name in ("MODELS", "PROMPT_SETS", "EVALUATIONS", "TOKENIZERS", "PRETRAIN", "REWARD_STATS", "TEXT_GRIDS", "REWARD_TRAINERS", "MODEL_PREFIXES",
                     "EVALUATION_SUITES", "PROMPT_FEATURES", "FEATURE_DISTANCES", "JUDGES_3D"):
        for name, target in getattr(plugins, reg_name).items():
            yield reg_name, name, target
    for name, (is_dir, loader) in plugins.MODEL_DIRS.items():
        yield "MODEL_DIRS", name, is_dir
        yield "MODEL_DIRS", name, loader
    for name, entry in plugins.REWARDS.items():
        if isinstance(entry.factory, str):
            yield "REWARDS", name, entry.factory


@pytest.mark.parametrize("registry,name,target", list(_entries()), ids=lambda v: str(v))
def test_every_registry_entry_resolves_to_a_callable(registry, name, target):
    assert callable(plugins.load(target)), f"{registry}[{name!r}] = {target!r}"


def test_registries_are_plain_dicts_and_unknown_names_list_the_valid_ones():
    assert all(type(getattr(plugins, n)) is dict for n in ("MODELS", "REWARDS", "PROMPT_SETS", "EVALUATIONS", "PRETRAIN"))
    with pytest.raises(UserError, match=r"unknown world 'moon'; valid worlds: shapes, shapes-flow, shapes-geneval, molecules, molecules-ar"):
        plugins.resolve(plugins.PRETRAIN, "moon", "world")
    with pytest.raises(UserError, match="has no attribute"):
        plugins.load("rewardiff.plugins:no_such_thing")
    with pytest.raises(UserError, match="cannot import"):
        plugins.load("no_such_package.mod:f")


def toy_loader(directory: str | None):
    """A model loader as a world registers it: the 2-D toy world's mixture model."""
    from rewardiff.worlds.toy2d import toy2d_model

    assert directory is None
    return toy2d_model()


def test_a_world_registers_a_model_by_name_without_the_core_importing_it(monkeypatch):
    from rewardiff.models.registry import base_model

    monkeypatch.setitem(plugins.MODELS, "toy2d", "tests.test_layout:toy_loader")
    model = base_model("toy2d")
    assert model.name == "toy2d" and model.capabilities == {"chain", "gaussian"}
    with pytest.raises(UserError, match="unknown model 'toy3d'; use 'shapes', 'shapes-flow', 'shapes-geneval', 'molecules', 'molecules-ar', 'shapes-video', 'shapes-sr', 'shapes-3d', 'toy2d'"):
        base_model("toy3d")


def _readme_layout() -> str:
    text = (SRC.parent.parent / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return "\n".join(line for line in section.splitlines() if line.startswith("    "))  # the indented tree


def test_the_readme_layout_names_every_module_of_the_tree():
    layout = _readme_layout()
    names = {p.relative_to(SRC).parts[0] for p in SRC.iterdir() if p.suffix == ".py" or (p.is_dir() and p.name != "__pycache__")}
    names |= {p.name for p in SRC.rglob("*.py")}
    names -= {"__init__.py", "__main__.py", "weights"}
    missing = sorted(n for n in names if not re.search(rf"\b{re.escape(n.removesuffix('.py'))}\b", layout))
    assert not missing, f"README.md's layout does not name: {missing}"
