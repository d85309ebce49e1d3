"""CMA-ES through pycma (N. Hansen's `cma` package, https://github.com/CMA-ES/pycma).

One `ask()` is one whole pycma population, so `ask(n)` requires n == popsize.

Randomness.  By default pycma draws its Gaussian samples from numpy's *global* RNG
(`randn=np.random.randn`) and its `seed` option reseeds that global RNG in the constructor.
With one optimiser per layer that would make every trajectory depend on how the layers'
calls interleave.  We therefore
  * pass our own `randn`, a picklable callable around a numpy Generator seeded from `seed`,
    and set pycma's `seed` option to NaN ("do nothing"), so pycma never reseeds the global RNG;
  * run every call into pycma inside an `IsolatedGlobalRNG`, for the few code paths (e.g. TPA
    step-size adaptation) that still call `np.random.*` directly.
A bound `np.random.randn` would in any case not survive pickling: it unpickles bound to a
*copy* of the global RandomState, so a restored optimiser would sample from a different stream.

State.  `state_dict()["algo"]["pickle"]` holds `pickle.dumps` of the pycma object with both
RNGs.  Unpickling can run arbitrary code: load such a state only from checkpoint folders you
trust (your own runs), never from downloaded files.
"""

from __future__ import annotations

import pickle
import warnings
from typing import Any

import numpy as np

from .base import IsolatedGlobalRNG, Optimizer, OptimizerError, seed_sequence

with warnings.catch_warnings():
    # pycma warns at import when matplotlib is missing; we never plot.
    warnings.filterwarnings("ignore", message=".*matplotlib.*", category=UserWarning)
    import cma

# Options this wrapper sets itself; a user's `cma_options` may not override them.
_RESERVED = frozenset({"popsize", "seed", "randn", "bounds", "verbose", "verb_disp", "verb_log"})


class _PrivateRandn:
    """pycma's `randn(number, dimension)` option, drawing from a private numpy Generator."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.Generator(np.random.PCG64(seed_sequence(seed, 0)))

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


def check_cma_options(options: dict[str, Any]) -> dict[str, Any]:
    """Validate extra pycma options: known keys, none reserved, no strings (pycma `eval`s string
    option values, and the project never evaluates configuration text)."""
    known = set(cma.CMAOptions().keys())
    for key, value in options.items():
        if key in _RESERVED:
            raise OptimizerError(f"cma_options may not set {key!r}; use the optimiser setting")
        if key not in known:
            raise OptimizerError(f"unknown pycma option {key!r} in cma_options")
        if isinstance(value, str):
            raise OptimizerError(f"cma_options[{key!r}] = {value!r}: give a number, not a string")
    return dict(options)


class CMAES(Optimizer):
    """CMA-ES (Hansen & Ostermeier 2001; Hansen 2016, "The CMA Evolution Strategy: A Tutorial")."""

    name = "cma"
    fixed_batch = True

    def __init__(self, dim: int, *, x0: np.ndarray | None = None, sigma0: float = 1.0,
                 popsize: int = 20, seed: int = 0, bounds: tuple[float, float] | None = None,
                 cma_options: dict[str, Any] | None = None) -> None:
        super().__init__(dim, x0=x0, sigma0=sigma0, popsize=popsize, seed=seed, bounds=bounds)
        self._cma_options = check_cma_options(dict(cma_options or {}))
        self._randn = _PrivateRandn(self.seed)
        self._global = IsolatedGlobalRNG(self.seed, 1)
        opts: dict[str, Any] = {**self._cma_options, "popsize": self.popsize, "seed": np.nan,
                                "randn": self._randn, "verbose": -9, "verb_disp": 0,
                                "verb_log": 0}
        if self.bounds is not None:
            opts["bounds"] = list(self.bounds)
        with self._global:
            self._es = cma.CMAEvolutionStrategy(self.x0.copy(), self.sigma0, opts)
        # pycma identifies told solutions by the arrays it handed out, so we tell those.
        self._asked: list[np.ndarray] | None = None

    def extra_settings(self) -> dict[str, Any]:
        return {"cma_options": dict(self._cma_options)}

    def _ask(self, n: int) -> np.ndarray:
        with self._global:
            self._asked = self._es.ask()
        return np.array(self._asked, dtype=np.float64)

    def _tell(self, X: np.ndarray, f: np.ndarray) -> None:
        # The base has checked that X equals the pending batch, i.e. self._asked.
        with self._global:
            self._es.tell(self._asked, f.tolist())
        self._asked = None

    def _recenter(self, x: np.ndarray) -> None:
        # Replace the mean only: sigma, covariance and paths are kept, the way pycma expects
        # outside changes to `es.mean` between iterations.  With bounds, pycma's mean lives in
        # the untransformed (genotype) space, hence the same mapping its constructor applies.
        es = self._es
        with self._global:
            es.mean = es.gp.geno(x.copy(), from_bounds=es.boundary_handler.inverse, copy=False)

    def _centre(self) -> np.ndarray:
        es = self._es  # the mean lives in genotype space (see _recenter)
        return es.gp.pheno(es.mean, into_bounds=es.boundary_handler.repair)

    def _step_size(self) -> float:
        return float(self._es.sigma)

    def _stop(self) -> dict[str, Any]:
        with self._global:
            return dict(self._es.stop())

    def _state(self) -> dict[str, Any]:
        # One pickle keeps the identity of the shared `randn` object inside pycma's options and
        # sampler; see the module docstring for the trusted-folders caveat.
        blob = pickle.dumps((self._es, self._randn, self._global, self._asked),
                            protocol=pickle.HIGHEST_PROTOCOL)
        return {"pickle": blob, "cma_version": cma.__version__}

    def _load_state(self, state: dict[str, Any]) -> None:
        es, randn, global_rng, asked = pickle.loads(state["pickle"])
        if not isinstance(es, cma.CMAEvolutionStrategy):
            raise OptimizerError(f"cma state holds a {type(es).__name__}, not a pycma object")
        self._es, self._randn, self._global, self._asked = es, randn, global_rng, asked
