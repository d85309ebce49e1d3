"""Run settings checked before anything heavy happens.

`validate_run(cfg)` is how the driver checks a run's config, once, while it plans the run
(orchestrator/driver.py): an unknown task, an unknown optimiser or Nevergrad name
(`optimizer.name` too when `schedule.optimizers` overrides it; set to anything but the default,
it then also warns that it has no effect), popsize < 2, sigma0 <= 0, a budget smaller than one
generation or an option an optimiser does not take fails here, with the offending value in the
message, before a model is loaded or the run folder is made. It imports no torch (the
optimiser registry is plain numpy; Nevergrad is imported only for its names). What the
optimisers are and their settings: orchestrator/methods.py.
"""

from __future__ import annotations

import warnings

from common.config import OptimizerConfig, RunConfig
from common.errors import ConfigError
from common.tasks import task_spec
from orchestrator.methods import methods, optimizer_options
from orchestrator.optimizers import (
    OptimizerError,
    make_optimizer,
    validate_optimizer_name,
    validate_settings,
)
from orchestrator.optimizers.registry import NEVERGRAD_PREFIX

__all__ = ["methods", "optimizer_options", "validate_run"]  # the first two: orchestrator/methods.py


def validate_run(cfg: RunConfig) -> None:
    """Raise ConfigError or OptimizerError (both DfoloraError) for settings that cannot run."""
    cfg.validate()
    task_spec(cfg.task)  # a known task, or a custom one with every key it needs
    names = methods(cfg)
    for name in names:
        validate_settings(name, cfg.optimizer.popsize, cfg.optimizer.sigma0)
    _check_overridden_name(cfg.optimizer.name, names)
    if cfg.optimizer.fireworks is not None and "fwa-dyn" not in names:
        raise ConfigError(f"optimizer.fireworks applies to fwa-dyn only; the run uses "
                          f"{', '.join(names)}")
    if cfg.optimizer.cma_diagonal and "cma" not in names:
        raise ConfigError(f"optimizer.cma_diagonal applies to cma only; the run uses "
                          f"{', '.join(names)}")
    if cfg.optimizer.nevergrad_budget is not None and not any(
            n.startswith(NEVERGRAD_PREFIX) for n in names):
        raise ConfigError(f"optimizer.nevergrad_budget applies to nevergrad:<Name> only; the "
                          f"run uses {', '.join(names)}")
    # Building each optimiser once catches what only its constructor knows (for example more
    # fireworks than sparks); it costs milliseconds and no model.
    for name in names:
        make_optimizer(name, cfg.adapter.dim, seed=0, **optimizer_options(cfg, name, 1))


def _check_overridden_name(name: str, names: tuple[str, ...]) -> None:
    """`optimizer.name` when `schedule.optimizers` leaves it out: still an optimiser that must
    exist (a typo is an error, not a silent no-op), and a warning when it was set to anything
    but the default, since it then has no effect."""
    if name in names:
        return
    try:
        validate_optimizer_name(name)
    except OptimizerError as err:
        raise OptimizerError(f"optimizer.name: {err}") from None
    if name != OptimizerConfig.name:
        # stacklevel 1: one place, so a process that validates twice (a sweep, then its runs)
        # shows it once
        warnings.warn(f"optimizer.name {name!r} has no effect: schedule.optimizers "
                      f"[{', '.join(names)}] decides the optimisers", stacklevel=1)
