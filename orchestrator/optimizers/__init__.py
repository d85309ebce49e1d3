"""Derivative-free optimisers with a batch ask/tell interface over plain numpy arrays.

    opt = make_optimizer("cma", dim, x0=x, sigma0=1.0, popsize=20, seed=s)
    X = opt.ask()                 # (popsize, dim) float64
    opt.tell(X, losses)           # losses of exactly those rows
    opt.best, opt.stop(), opt.state_dict(), opt.load_state_dict(d), opt.recenter(x)

No torch, no Ray: the schedule feeds these with losses from whatever evaluator it uses.
"""

from .base import Best, Optimizer, OptimizerError, OptimizerSettings
from .registry import (
    OPTIMIZERS,
    available_optimizers,
    extra_options,
    make_optimizer,
    restore_optimizer,
    validate_optimizer_name,
    validate_settings,
)

__all__ = [
    "OPTIMIZERS",
    "Best",
    "Optimizer",
    "OptimizerError",
    "OptimizerSettings",
    "available_optimizers",
    "extra_options",
    "make_optimizer",
    "restore_optimizer",
    "validate_optimizer_name",
    "validate_settings",
]
