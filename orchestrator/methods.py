"""The optimisers a run alternates and the settings of each, read from the config.

Shared by the schedule (which builds the optimisers) and validation.py (which checks them before
anything heavy happens); plain Python, so the schedule stays a pure state machine.
"""

from __future__ import annotations

import math
from typing import Any

from common.config import RunConfig
from orchestrator.optimizers.registry import NEVERGRAD_PREFIX


def methods(cfg: RunConfig) -> tuple[str, ...]:
    """The optimisers the schedule alternates: `schedule.optimizers`, else `optimizer.name`."""
    return cfg.schedule.optimizers or (cfg.optimizer.name,)


def optimizer_options(cfg: RunConfig, method: str, n_optimizers: int) -> dict[str, Any]:
    """Keyword arguments of `make_optimizer(method, ...)` besides dim, x0 and seed.

    `n_optimizers` is the number of (layer, method) optimisers of the run; a Nevergrad optimiser
    without an explicit budget plans for its share of the run budget.
    """
    opt = cfg.optimizer
    options: dict[str, Any] = {
        "sigma0": opt.sigma0,
        "popsize": opt.popsize,
        "bounds": None if opt.bounds is None else (opt.bounds[0], opt.bounds[1]),
    }
    if method == "cma" and opt.cma_diagonal:
        options["cma_options"] = {"CMA_diagonal": True}
    if method == "fwa-dyn" and opt.fireworks is not None:
        options["n_fireworks"] = opt.fireworks
    if method.startswith(NEVERGRAD_PREFIX):
        share = math.ceil(cfg.budget / max(1, n_optimizers))
        options["budget"] = opt.nevergrad_budget or share
    return options
