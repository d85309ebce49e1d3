"""Run settings checked before anything heavy happens, and the settings of each optimiser.

`validate_run(cfg)` is the first thing the driver does: an unknown optimiser or Nevergrad name,
popsize < 2, sigma0 <= 0, a budget smaller than one generation or an option an optimiser does not
take fails here, with the offending value in the message, before a model is loaded. It imports
no torch (the optimiser registry is plain numpy; Nevergrad is imported only for its names).
"""

from __future__ import annotations

import math
from typing import Any

from common.config import RunConfig
from common.errors import ConfigError
from orchestrator.optimizers import make_optimizer, validate_settings
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
    if method == "fwa-dyn" and opt.fireworks is not None:
        options["n_fireworks"] = opt.fireworks
    if method.startswith(NEVERGRAD_PREFIX):
        share = math.ceil(cfg.budget / max(1, n_optimizers))
        options["budget"] = opt.nevergrad_budget or share
    return options


def validate_run(cfg: RunConfig) -> None:
    """Raise ConfigError or OptimizerError (both DfoloraError) for settings that cannot run."""
    cfg.validate()
    names = methods(cfg)
    for name in names:
        validate_settings(name, cfg.optimizer.popsize, cfg.optimizer.sigma0)
    if cfg.optimizer.fireworks is not None and "fwa-dyn" not in names:
        raise ConfigError(f"optimizer.fireworks applies to fwa-dyn only; the run uses "
                          f"{', '.join(names)}")
    if cfg.optimizer.nevergrad_budget is not None and not any(
            n.startswith(NEVERGRAD_PREFIX) for n in names):
        raise ConfigError(f"optimizer.nevergrad_budget applies to nevergrad:<Name> only; the "
                          f"run uses {', '.join(names)}")
    # Building each optimiser once catches what only its constructor knows (for example more
    # fireworks than sparks); it costs milliseconds and no model.
    for name in names:
        make_optimizer(name, cfg.adapter.dim, seed=0, **optimizer_options(cfg, name, 1))
