"""The layering of common/, orchestrator/ and workers/, enforced on every module's imports.

Every import counts, at module level or inside a function (a lazy import is still a
dependency), relative ones resolved, and `importlib.import_module("x")` / `__import__("x")`
with a literal name too. The rules (docs/design.md §6):

* `common/` is shared by both sides: it imports nothing from orchestrator/ or workers/, and
  never torch or Ray.
* `orchestrator/optimizers/` is plain numpy: no torch, no workers/, no Ray.
* `orchestrator/schedule.py` is the pure state machine, and `orchestrator/state.py` its state:
  no torch, Ray, workers/, driver, evaluators, checkpoint or validation (the results the
  schedule is told are common/messages.py's).
* The driver side (all of orchestrator/) reaches workers/ only through the entry points in
  ENTRY_POINTS: the in-process evaluator module `orchestrator/evaluation/local.py` (the
  `EvalWorker`, and the zero-shot, gradient-LoRA and merge functions the commands call), and
  the Ray evaluator's spawn of the actor class `workers/actor.py`.
* workers/ never imports orchestrator/.
* Ray is imported only by the Ray evaluator (`pool.py`, `ray_eval.py`; `dispatch.py` uses the
  pool's handle) and the actor (`workers/actor.py`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "orchestrator", "workers")

ENTRY_POINTS = {  # driver-side module -> what of workers/ it may import
    "orchestrator/evaluation/local.py": ("workers",),
    "orchestrator/evaluation/ray_eval.py": ("workers.actor",),
}
RAY_FILES = ("orchestrator/evaluation/pool.py", "orchestrator/evaluation/ray_eval.py",
             "workers/actor.py")


def module_name(path: str) -> tuple[str, bool]:
    """('orchestrator.evaluation.pool', False) for 'orchestrator/evaluation/pool.py'; a
    package's __init__.py gives the package's name and True."""
    parts = path[: -len(".py")].split("/")
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def imported_names(source: str, path: str) -> set[str]:
    """Every module name the source imports anywhere. `from a import b` gives `a` and `a.b`
    (b may be a submodule); relative imports are resolved against `path`."""
    module, is_package = module_name(path)
    names: set[str] = set()
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                parent = ".".join(base + ([node.module] if node.module else []))
            else:
                parent = node.module
            names.add(parent)
            names.update(f"{parent}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and _dynamic_import(node.func) and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                names.add(first.value)
    return names


def _dynamic_import(func: ast.expr) -> bool:
    return ((isinstance(func, ast.Name) and func.id in ("__import__", "import_module"))
            or (isinstance(func, ast.Attribute) and func.attr == "import_module"))


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(path: str, names: set[str]) -> list[str]:
    """One line per import of `names` (made by the module at `path`) that breaks a rule."""
    problems: list[str] = []

    def forbid(prefixes: tuple[str, ...], why: str, allow: tuple[str, ...] = ()) -> None:
        for name in sorted(names):
            if (any(_within(name, p) for p in prefixes)
                    and not any(_within(name, a) for a in allow)):
                problems.append(f"{path} imports {name}: {why}")

    if path.startswith("common/"):
        forbid(("orchestrator", "workers", "torch", "ray"),
               "common/ imports neither side, nor torch or Ray")
    if path.startswith("orchestrator/optimizers/"):
        forbid(("torch", "workers", "ray"), "the optimisers are plain numpy")
    if path in ("orchestrator/schedule.py", "orchestrator/state.py"):
        forbid(("torch", "ray", "workers", "orchestrator.driver", "orchestrator.evaluation",
                "orchestrator.checkpoint", "orchestrator.validation"),
               "the schedule is a pure state machine")
    if path.startswith("orchestrator/"):
        forbid(("workers",), "the driver side reaches workers/ only through ENTRY_POINTS",
               allow=ENTRY_POINTS.get(path, ()))
    if path.startswith("workers/"):
        forbid(("orchestrator",), "workers/ never imports the driver side")
    if path not in RAY_FILES:
        forbid(("ray",), "only the Ray evaluator and the actor import Ray")
    return problems


def package_modules() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for package in PACKAGES
                  for p in (ROOT / package).rglob("*.py"))


def test_every_module_keeps_to_its_layer():
    modules = package_modules()
    assert len(modules) > 40 and "orchestrator/schedule.py" in modules
    problems = [line for path in modules
                for line in violations(path, imported_names((ROOT / path).read_text(), path))]
    assert not problems, "\n" + "\n".join(problems)


def test_the_listed_exceptions_exist_and_are_used():
    """A stale exception would let a later import through unnoticed."""
    for path, allowed in ENTRY_POINTS.items():
        names = imported_names((ROOT / path).read_text(), path)
        assert any(_within(n, a) for n in names for a in allowed), path
    assert "entry point" in ast.get_docstring(ast.parse(
        (ROOT / "orchestrator/evaluation/local.py").read_text()))
    for path in RAY_FILES:
        names = imported_names((ROOT / path).read_text(), path)
        assert any(_within(n, "ray") for n in names), path


# -- the checker itself, on synthetic sources -------------------------------------------------

@pytest.mark.parametrize("path, source, expected", [
    ("common/x.py", "def peak():\n    import torch\n", "common/x.py imports torch"),
    ("common/x.py", "from orchestrator.driver import run\n", "imports orchestrator.driver"),
    ("common/x.py", "import importlib\ntorch = importlib.import_module('torch')\n",
     "imports torch"),
    ("orchestrator/optimizers/x.py", "from torch import nn\n", "imports torch"),
    ("orchestrator/schedule.py", "from orchestrator.validation import methods\n",
     "imports orchestrator.validation"),
    ("orchestrator/schedule.py", "from .evaluation import local\n",
     "imports orchestrator.evaluation.local"),
    ("orchestrator/schedule.py", "from .checkpoint import Entry\n",
     "imports orchestrator.checkpoint"),
    ("orchestrator/schedule.py", "from orchestrator.evaluation.interface import Evaluator\n",
     "imports orchestrator.evaluation.interface"),
    ("orchestrator/commands.py", "def zero_shot():\n    from workers import models\n",
     "imports workers"),
    ("orchestrator/evaluation/ray_eval.py", "from workers.worker import EvalWorker\n",
     "imports workers.worker"),
    ("orchestrator/evaluation/pool.py", "from ...workers import worker\n", "imports workers"),
    ("workers/x.py", "from orchestrator.evaluation import interface\n",
     "imports orchestrator.evaluation"),
    ("orchestrator/cli.py", "if True:\n    import ray.util\n", "imports ray.util"),
    ("orchestrator/evaluation/dispatch.py", "def f():\n    import ray\n", "imports ray"),
])
def test_the_checker_finds_a_violation(path, source, expected):
    problems = violations(path, imported_names(source, path))
    assert any(expected in line for line in problems), problems


@pytest.mark.parametrize("path, source", [
    ("orchestrator/schedule.py", "from common.messages import EvalResult\n"),
    ("orchestrator/schedule.py", "from .optimizers import make_optimizer\n"),
    ("orchestrator/evaluation/local.py", "def f():\n    from workers.worker import EvalWorker\n"),
    ("orchestrator/evaluation/ray_eval.py", "from workers.actor import EvalActor\n"),
    ("orchestrator/evaluation/pool.py", "from .interface import EvalResult\nimport ray\n"),
    ("workers/actor.py", "import ray\nfrom common.config import RunConfig\n"),
    ("common/x.py", "import numpy\nfrom .errors import ConfigError\n"),
])
def test_the_checker_lets_allowed_imports_through(path, source):
    assert violations(path, imported_names(source, path)) == []


def test_relative_imports_resolve_against_the_module():
    assert imported_names("from .pool import ActorPool\n", "orchestrator/evaluation/dispatch.py") \
        >= {"orchestrator.evaluation.pool", "orchestrator.evaluation.pool.ActorPool"}
    assert "orchestrator.evaluation.interface" in imported_names(
        "from .interface import Evaluator\n", "orchestrator/evaluation/__init__.py")
    assert "orchestrator.optimizers" in imported_names(
        "from ..optimizers import make_optimizer\n", "orchestrator/evaluation/local.py")
