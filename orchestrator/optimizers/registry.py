"""Optimiser names -> classes, and validation that runs before any model is loaded.

Names: `cma`, `fwa`, `fwa-dyn`, and `nevergrad:<Name>` for any key of Nevergrad's registry.
Nevergrad (slow to import) is imported only when a `nevergrad:` name is used.
"""

from __future__ import annotations

import inspect
from types import MappingProxyType
from typing import Any

import numpy as np

from .base import Optimizer, OptimizerError, check_popsize_sigma0
from .cma_es import CMAES
from .fireworks import BareBonesFireworks, DynamicFireworks

NEVERGRAD_PREFIX = "nevergrad:"

OPTIMIZERS: MappingProxyType[str, type[Optimizer]] = MappingProxyType({
    CMAES.name: CMAES,
    BareBonesFireworks.name: BareBonesFireworks,
    DynamicFireworks.name: DynamicFireworks,
})

# Constructor arguments every optimiser takes; anything else is an algorithm's extra option.
_COMMON_ARGS = frozenset({"self", "dim", "name", "x0", "sigma0", "popsize", "seed", "bounds"})


def available_optimizers() -> list[str]:
    """Names for help text (Nevergrad's hundreds of names are summarised by one pattern)."""
    return [*OPTIMIZERS, NEVERGRAD_PREFIX + "<Name>"]


def _optimizer_class(name: str) -> type[Optimizer]:
    if not isinstance(name, str):
        raise OptimizerError(f"optimiser name must be a string, got {name!r}")
    if name in OPTIMIZERS:
        return OPTIMIZERS[name]
    if name.startswith(NEVERGRAD_PREFIX):
        from .ng import NevergradOptimizer, check_nevergrad_name

        check_nevergrad_name(name)
        return NevergradOptimizer
    raise OptimizerError(f"unknown optimiser {name!r}; available: "
                         f"{', '.join(available_optimizers())}")


def validate_optimizer_name(name: str) -> str:
    """Return `name` if it names an optimiser, else raise OptimizerError (imports no model)."""
    _optimizer_class(name)
    return name


def validate_settings(name: str, popsize: int, sigma0: float) -> None:
    """Check a name, popsize (integer >= 2) and sigma0 (> 0) up front, with clear messages."""
    validate_optimizer_name(name)
    check_popsize_sigma0(popsize, sigma0)


def extra_options(name: str) -> list[str]:
    """The algorithm-specific keyword options `make_optimizer(name, ...)` accepts."""
    params = inspect.signature(_optimizer_class(name).__init__).parameters
    return [p for p in params if p not in _COMMON_ARGS]


def make_optimizer(name: str, dim: int, *, x0: np.ndarray | None = None, sigma0: float = 1.0,
                   popsize: int = 20, seed: int = 0, bounds: tuple[float, float] | None = None,
                   **extra: Any) -> Optimizer:
    """A new optimiser `name` over vectors of length `dim`; `extra` are its own options
    (e.g. `n_fireworks` for fwa-dyn, `budget` for Nevergrad, `cma_options` for cma)."""
    cls = _optimizer_class(name)
    allowed = extra_options(name)
    unknown = sorted(set(extra) - set(allowed))
    if unknown:
        raise OptimizerError(f"optimiser {name!r} has no option(s) {unknown}; "
                             f"its options: {allowed or 'none'}")
    common = {"x0": x0, "sigma0": sigma0, "popsize": popsize, "seed": seed, "bounds": bounds}
    if name.startswith(NEVERGRAD_PREFIX):
        common["name"] = name
    return cls(dim, **common, **extra)


def restore_optimizer(state: dict[str, Any]) -> Optimizer:
    """An optimiser rebuilt from `Optimizer.state_dict()` (same name, settings and options)."""
    try:
        name, settings, extra = state["name"], dict(state["settings"]), dict(state["extra"])
        state["x0"]
    except (KeyError, TypeError) as err:
        raise OptimizerError(f"not an optimiser state: missing {err}") from err
    bounds = settings.pop("bounds")
    opt = make_optimizer(name, settings.pop("dim"), x0=np.array(state["x0"], dtype=np.float64),
                         bounds=None if bounds is None else tuple(bounds), **settings, **extra)
    opt.load_state_dict(state)
    return opt
