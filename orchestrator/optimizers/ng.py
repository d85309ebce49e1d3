"""Any optimiser of Nevergrad's registry (https://github.com/facebookresearch/nevergrad) behind
the batch ask/tell interface, named "nevergrad:<Name>" (a key of `ng.optimizers.registry`).

Nevergrad asks and tells one candidate at a time; that stays in here: `ask(n)` calls
`opt.ask()` n times and keeps the candidates, `tell` calls `opt.tell(candidate, loss)` for each
in order.  The parametrization is `ng.p.Array(init=x0)`, with `set_bounds(lo, hi)` when bounds
are given and `set_mutation(sigma=sigma0)`; `num_workers=popsize` tells Nevergrad how many
candidates are in flight at once.  The budget is None (open-ended) unless the `budget` extra
option is given; NGOpt and the other meta-optimisers pick their algorithm from the budget and
need one.  Nevergrad's exceptions surface as OptimizerError naming the original; one to expect:
Nevergrad 1.0.12's MetaModel (which NGOpt picks for some dimensions and budgets) calls `float()`
on a one-element array, an error since NumPy 2.4, once it has enough points to fit its model.

Seeding: `parametrization.random_state` is a RandomState from `seed`, and every call into
Nevergrad runs inside an `IsolatedGlobalRNG`, since some of its algorithms (and pycma, which
some of them wrap) also draw from numpy's global RNG.

`recenter(x)` builds a fresh Nevergrad optimiser at x with the same settings (Nevergrad has no
way to move one), seeded by (seed, number of re-centres).  The step size is unknown (NaN).

State: `state_dict()["algo"]["pickle"]` holds `pickle.dumps` of the Nevergrad optimiser and its
pending candidates.  Unpickling can run arbitrary code: load such a state only from checkpoint
folders you trust (your own runs).  These pickles grow with the evaluations told (Nevergrad
keeps an archive), about 1.5 MB per 1000 evaluations in 50 dimensions.
"""

from __future__ import annotations

import difflib
import pickle
import warnings
from typing import Any

import numpy as np

from .base import IsolatedGlobalRNG, Optimizer, OptimizerError, legacy_random_state
from .registry import NEVERGRAD_PREFIX

with warnings.catch_warnings():
    # pycma (imported by Nevergrad) warns at import when matplotlib is missing; we never plot.
    warnings.filterwarnings("ignore", message=".*matplotlib.*", category=UserWarning)
    import nevergrad as ng


def check_nevergrad_name(name: str) -> str:
    """The registry name in "nevergrad:<Name>", or OptimizerError naming a few close ones."""
    ng_name = name[len(NEVERGRAD_PREFIX):] if name.startswith(NEVERGRAD_PREFIX) else name
    registry = ng.optimizers.registry
    if ng_name not in registry:
        by_lower = {key.lower(): key for key in registry}
        close = difflib.get_close_matches(ng_name, list(registry), n=5, cutoff=0.6)
        if ng_name.lower() in by_lower and by_lower[ng_name.lower()] not in close:
            close.insert(0, by_lower[ng_name.lower()])
        hint = ", ".join(NEVERGRAD_PREFIX + c for c in close) if close else "none close"
        raise OptimizerError(f"unknown Nevergrad optimiser {ng_name!r} in {name!r}; close "
                             f"names: {hint} ({len(registry)} in ng.optimizers.registry)")
    return ng_name


class NevergradOptimizer(Optimizer):
    """A Nevergrad optimiser driven in batches (see the module docstring)."""

    def __init__(self, dim: int, *, name: str, x0: np.ndarray | None = None,
                 sigma0: float = 1.0, popsize: int = 20, seed: int = 0,
                 bounds: tuple[float, float] | None = None, budget: int | None = None) -> None:
        self.ng_name = check_nevergrad_name(name)
        self.name = NEVERGRAD_PREFIX + self.ng_name
        super().__init__(dim, x0=x0, sigma0=sigma0, popsize=popsize, seed=seed, bounds=bounds)
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)
                                   or budget < 1):
            raise OptimizerError(f"{self.name}: budget must be a positive integer or None, "
                                 f"got {budget!r}")
        self.budget = budget
        self._global = IsolatedGlobalRNG(self.seed, 1)
        self._recentred = 0
        self._opt = self._build(self.x0)
        self._cands: list[Any] = []  # Nevergrad's candidates between ask and tell

    def extra_settings(self) -> dict[str, Any]:
        return {"budget": self.budget}

    def _build(self, x: np.ndarray) -> Any:
        param = ng.p.Array(init=x.copy())
        if self.bounds is not None:
            param = param.set_bounds(*self.bounds)
        param = param.set_mutation(sigma=self.sigma0)
        # Stream 0 of the seed, one sub-stream per re-centre: a fresh optimiser after a
        # re-centre must not replay the first one's random numbers.
        param.random_state = legacy_random_state(self.seed, 0, self._recentred)
        with self._global:
            return ng.optimizers.registry[self.ng_name](parametrization=param,
                                                        budget=self.budget,
                                                        num_workers=self.popsize)

    def _ask(self, n: int) -> np.ndarray:
        try:
            with self._global:
                self._cands = [self._opt.ask() for _ in range(n)]
        except Exception as err:  # Nevergrad reports a missing budget as a bare AssertionError
            hint = " (this optimiser may need a budget: pass budget=...)" if not self.budget else ""
            raise OptimizerError(f"{self.name}: Nevergrad's ask() failed: {err!r}{hint}") from err
        return np.array([np.asarray(c.value, dtype=np.float64) for c in self._cands])

    def _tell(self, X: np.ndarray, f: np.ndarray) -> None:
        with self._global:
            for cand, loss in zip(self._cands, f.tolist(), strict=True):
                self._opt.tell(cand, loss)
        self._cands = []

    def _recenter(self, x: np.ndarray) -> None:
        self._recentred += 1
        self._opt = self._build(x)

    def _state(self) -> dict[str, Any]:
        # One pickle keeps the pending candidates tied to the optimiser that asked them.
        blob = pickle.dumps((self._opt, self._cands, self._global),
                            protocol=pickle.HIGHEST_PROTOCOL)
        return {"pickle": blob, "recentred": self._recentred,
                "nevergrad_version": ng.__version__}

    def _load_state(self, state: dict[str, Any]) -> None:
        opt, cands, global_rng = pickle.loads(state["pickle"])
        if not isinstance(opt, ng.optimizers.base.Optimizer):
            raise OptimizerError(f"{self.name} state holds a {type(opt).__name__}, "
                                 f"not a Nevergrad optimiser")
        self._opt, self._cands, self._global = opt, cands, global_rng
        self._recentred = int(state["recentred"])
