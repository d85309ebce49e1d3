"""The batch ask/tell optimiser interface and all of its bookkeeping.

An optimiser proposes a batch of candidate vectors with `ask(n) -> (n, dim)` and learns their
losses with `tell(X, losses)`; it knows nothing of layers, Ray or torch (the
shape follows pycma's `cma/interfaces.py` and evosax's `algorithms/base.py`).

`Optimizer` validates every call, applies the one NaN/inf policy, keeps best-so-far and the
counters, and serialises all of that.  A subclass supplies only its maths:
`_ask(n)`, `_tell(X, f)`, `_state()`, `_load_state(d)`, and optionally `_recenter(x)`,
`_step_size()`, `_stop()`.

NaN/inf policy (the only one in the package): before a subclass sees a batch, every non-finite
loss (NaN, +inf and also -inf, which a cross-entropy can only produce through a bug) is replaced
by a penalty worse than every finite loss of that batch (`worst + 1 + |worst|`, or 1e300 when
no loss in the batch is finite).  Penalised entries never become `best`, and are counted in
`n_nonfinite` and in `last_tell_info["n_nonfinite"]`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from common.errors import DfoloraError

STATE_FORMAT = 1
ALL_NONFINITE_PENALTY = 1e300


class OptimizerError(DfoloraError, ValueError):
    """A wrong optimiser name, setting or call sequence; the message names the offending value."""


@dataclasses.dataclass(frozen=True, eq=False)
class Best:
    """Best-so-far over everything told: `f` is +inf (and `x` the start) until a finite loss."""

    x: np.ndarray
    f: float


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """Immutable settings, apart from the evolving state (as pycma's purecma keeps them)."""

    dim: int
    sigma0: float
    popsize: int
    seed: int
    bounds: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.dim, bool) or not isinstance(self.dim, int | np.integer) or self.dim < 1:
            raise OptimizerError(f"dim must be a positive integer, got {self.dim!r}")
        check_popsize_sigma0(self.popsize, self.sigma0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer):
            raise OptimizerError(f"seed must be an integer, got {self.seed!r}")
        if self.seed < 0:
            raise OptimizerError(f"seed must be >= 0, got {self.seed}")
        if self.bounds is not None:
            try:
                lo, hi = (float(b) for b in self.bounds)
            except (TypeError, ValueError) as err:
                msg = f"bounds must be a pair (lo, hi), got {self.bounds!r}"
                raise OptimizerError(msg) from err
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise OptimizerError(f"bounds must be finite with lo < hi, got {self.bounds!r}")
            object.__setattr__(self, "bounds", (lo, hi))
        # numpy scalars are accepted but stored as plain Python numbers (JSON, equality).
        for field, cast in (("dim", int), ("popsize", int), ("seed", int), ("sigma0", float)):
            object.__setattr__(self, field, cast(getattr(self, field)))

    def to_dict(self) -> dict[str, Any]:
        return {"dim": self.dim, "sigma0": self.sigma0, "popsize": self.popsize,
                "seed": self.seed, "bounds": None if self.bounds is None else list(self.bounds)}


def check_popsize_sigma0(popsize: object, sigma0: object) -> None:
    """Raise OptimizerError unless popsize is an integer >= 2 and sigma0 a finite number > 0."""
    if isinstance(popsize, bool) or not isinstance(popsize, int | np.integer) or popsize < 2:
        raise OptimizerError(f"popsize must be an integer >= 2, got {popsize!r}")
    if isinstance(sigma0, bool) or not isinstance(sigma0, int | float | np.floating):
        raise OptimizerError(f"sigma0 must be a number > 0, got {sigma0!r}")
    if not (math.isfinite(sigma0) and sigma0 > 0):
        raise OptimizerError(f"sigma0 must be a finite number > 0, got {sigma0!r}")


def penalise_nonfinite(losses: np.ndarray) -> tuple[np.ndarray, np.ndarray, float | None]:
    """Apply the NaN/inf policy: return (losses seen by the algorithm, finite mask, penalty)."""
    finite = np.isfinite(losses)
    if finite.all():
        return losses.copy(), finite, None
    if finite.any():
        worst = float(losses[finite].max())
        # Scale with |worst| so the penalty stays distinct from huge finite losses; cap at the
        # largest float, because an infinite penalty is exactly what we are removing.
        penalty = min(worst + 1.0 + abs(worst), float(np.finfo(np.float64).max))
    else:
        penalty = ALL_NONFINITE_PENALTY
    return np.where(finite, losses, penalty), finite, penalty


def seed_sequence(seed: int, *stream: int) -> np.random.SeedSequence:
    """Independent, reproducible stream `stream` of the optimiser's seed (any 63-bit seed)."""
    return np.random.SeedSequence(entropy=int(seed), spawn_key=tuple(stream))


def legacy_random_state(seed: int, *stream: int) -> np.random.RandomState:
    """A legacy RandomState (needed by pycma's global RNG use and by Nevergrad) from any seed;
    `np.random.RandomState(seed)` itself only accepts seeds below 2**32."""
    return np.random.RandomState(np.random.MT19937(seed_sequence(seed, *stream)))


class IsolatedGlobalRNG:
    """A private copy of numpy's global legacy RNG, swapped in around calls into a library
    (pycma, Nevergrad) that draws from `np.random.*` directly.  Without it, two optimisers
    interleaved (one per layer) would consume one shared stream and each trajectory would
    depend on the interleaving.  Swapping is not thread-safe: drive optimisers from one thread.
    """

    def __init__(self, seed: int, *stream: int) -> None:
        self.state = legacy_random_state(seed, *stream).get_state()

    def __enter__(self) -> IsolatedGlobalRNG:
        self._outer = np.random.get_state()
        np.random.set_state(self.state)
        return self

    def __exit__(self, *exc: object) -> None:
        self.state = np.random.get_state()
        np.random.set_state(self._outer)
        del self._outer  # the caller's state is not ours to pickle


class Optimizer:
    """Batch ask/tell optimiser over float64 vectors of length `dim` (see the module docstring).

    `fixed_batch = True` in a subclass means that `ask(n)` requires n == popsize.
    """

    name: str = "base"
    fixed_batch: bool = False

    def __init__(self, dim: int, *, x0: np.ndarray | None = None, sigma0: float = 1.0,
                 popsize: int = 20, seed: int = 0,
                 bounds: tuple[float, float] | None = None) -> None:
        self.settings = OptimizerSettings(dim, sigma0, popsize, seed, bounds)
        x0 = np.zeros(self.dim) if x0 is None else x0
        self.x0 = self._check_vector(x0, "x0")
        self.generations = 0
        self.evaluations = 0
        self.n_nonfinite = 0
        self.last_tell_info: dict[str, Any] = {}
        self._best_x = self.x0.copy()
        self._best_f = math.inf
        self._pending: np.ndarray | None = None
        self._last_call: str | None = None

    # Read-only views of the settings.
    dim = property(lambda self: self.settings.dim)
    popsize = property(lambda self: self.settings.popsize)
    sigma0 = property(lambda self: self.settings.sigma0)
    seed = property(lambda self: self.settings.seed)
    bounds = property(lambda self: self.settings.bounds)

    # -- public API ---------------------------------------------------------------------------
    def ask(self, n: int | None = None) -> np.ndarray:
        """A new batch of `n` (default popsize) candidates, shape (n, dim), float64."""
        if self._pending is not None:
            raise OptimizerError(f"{self.name}: ask() called while a batch of "
                                 f"{len(self._pending)} is pending; tell() its losses first")
        n = self.popsize if n is None else n
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise OptimizerError(f"{self.name}: ask(n) needs an integer n >= 1, got {n!r}")
        if self.fixed_batch and n != self.popsize:
            raise OptimizerError(f"{self.name} asks for whole populations only: n must equal "
                                 f"popsize={self.popsize}, got n={n}")
        X = np.array(self._ask(int(n)), dtype=np.float64)
        if X.shape != (n, self.dim) or not np.isfinite(X).all():
            raise RuntimeError(f"{self.name}._ask({n}) returned a bad batch of shape {X.shape}")
        self._pending = X
        self._last_call = "ask"
        return X.copy()

    def tell(self, X: np.ndarray, losses: np.ndarray) -> None:
        """Losses of exactly the batch returned by the last `ask()` (same rows, same order)."""
        if self._pending is None:
            what = ("this batch was already told (second tell)" if self._last_call == "tell"
                    else "ask() has not been called")
            raise OptimizerError(f"{self.name}: tell() without a pending ask(): {what}; "
                                 f"generations so far {self.generations}")
        X = np.asarray(X, dtype=np.float64)
        if X.shape != self._pending.shape:
            raise OptimizerError(f"{self.name}: tell() got X of shape {X.shape}, but the pending "
                                 f"ask() returned shape {self._pending.shape}")
        if not np.array_equal(X, self._pending):
            row = int(np.flatnonzero((X != self._pending).any(axis=1))[0])
            raise OptimizerError(f"{self.name}: tell() got an X that differs from the last "
                                 f"ask() (first differing row {row}); rows must be unchanged")
        try:
            f = np.asarray(losses, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise OptimizerError(f"{self.name}: losses must be numbers, got {losses!r}") from err
        if f.shape != (len(X),):
            raise OptimizerError(f"{self.name}: tell() got losses of shape {f.shape} for a batch "
                                 f"of {len(X)} candidates; expected shape ({len(X)},)")
        seen, finite, penalty = penalise_nonfinite(f)
        self._tell(X.copy(), seen.copy())
        self._record(X, f, finite, penalty)

    @property
    def best(self) -> Best:
        """Best-so-far (x, f) over every finite loss told; `x` is a read-only copy."""
        x = self._best_x.copy()
        x.flags.writeable = False
        return Best(x, self._best_f)

    @property
    def centre(self) -> np.ndarray:
        """The search centre (CMA-ES's mean, FWA's core firework); the best-so-far vector for an
        optimiser that has no centre of its own. A copy."""
        return np.array(self._centre(), dtype=np.float64)

    @property
    def step_size(self) -> float:
        """Current search scale (CMA sigma, FWA amplitude) for metrics; NaN when unknown."""
        return float(self._step_size())

    @property
    def pending(self) -> bool:
        """True between an ask() and its tell()."""
        return self._pending is not None

    def stop(self) -> dict[str, Any]:
        """Reasons to stop ({} means continue); the evaluation budget is the caller's concern."""
        return dict(self._stop())

    def recenter(self, x: np.ndarray) -> None:
        """Move the search centre to `x`, keeping the step size (a layer switching method)."""
        if self._pending is not None:
            raise OptimizerError(f"{self.name}: recenter() while a batch is pending; tell() first")
        self._recenter(self._check_vector(x, "recenter(x)"))

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically; see `load_state_dict`."""
        return {
            "format": STATE_FORMAT,
            "name": self.name,
            "settings": self.settings.to_dict(),
            "extra": self.extra_settings(),
            "x0": self.x0.tolist(),
            "generations": self.generations,
            "evaluations": self.evaluations,
            "n_nonfinite": self.n_nonfinite,
            "best_x": self._best_x.tolist(),
            "best_f": self._best_f,
            "pending": None if self._pending is None else self._pending.tolist(),
            "last_call": self._last_call,
            "algo": self._state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()` taken from an optimiser with the same name and settings."""
        if state.get("format") != STATE_FORMAT:
            raise OptimizerError(f"unsupported optimiser state format {state.get('format')!r}")
        for key, mine in (("name", self.name), ("settings", self.settings.to_dict()),
                          ("extra", self.extra_settings())):
            if state.get(key) != mine:
                raise OptimizerError(f"{self.name}: state {key} {state.get(key)!r} does not "
                                     f"match this optimiser's {mine!r}")
        self._load_state(state["algo"])
        self.generations = int(state["generations"])
        self.evaluations = int(state["evaluations"])
        self.n_nonfinite = int(state["n_nonfinite"])
        self._best_x = np.array(state["best_x"], dtype=np.float64)
        self._best_f = float(state["best_f"])
        pending = state["pending"]
        self._pending = None if pending is None else np.array(pending, dtype=np.float64)
        self._last_call = state["last_call"]

    def extra_settings(self) -> dict[str, Any]:
        """Algorithm-specific settings (JSON-compatible), saved with the state."""
        return {}

    # -- helpers --------------------------------------------------------------------------------
    def _check_vector(self, x: object, what: str) -> np.ndarray:
        v = np.array(x, dtype=np.float64)
        if v.shape != (self.dim,):
            raise OptimizerError(f"{self.name}: {what} must have shape ({self.dim},), "
                                 f"got {v.shape}")
        if not np.isfinite(v).all():
            raise OptimizerError(f"{self.name}: {what} has non-finite entries")
        if self.bounds is not None and ((v < self.bounds[0]) | (v > self.bounds[1])).any():
            raise OptimizerError(f"{self.name}: {what} lies outside bounds {self.bounds} "
                                 f"(min {v.min():.6g}, max {v.max():.6g})")
        return v

    def _record(self, X: np.ndarray, f: np.ndarray, finite: np.ndarray,
                penalty: float | None) -> None:
        gen_best = math.nan
        if finite.any():
            i = int(np.flatnonzero(finite)[np.argmin(f[finite])])
            gen_best = float(f[i])
            if gen_best < self._best_f:  # strict: ties keep the earlier point
                self._best_f, self._best_x = gen_best, X[i].copy()
        n_bad = int((~finite).sum())
        self.generations += 1
        self.evaluations += len(X)
        self.n_nonfinite += n_bad
        self._pending = None
        self._last_call = "tell"
        self.last_tell_info = {"n_nonfinite": n_bad, "penalty": penalty,
                               "generation_best": gen_best, "best": self._best_f,
                               "step_size": self.step_size}

    # -- the maths, supplied by subclasses --------------------------------------------------------
    def _ask(self, n: int) -> np.ndarray:
        raise NotImplementedError

    def _tell(self, X: np.ndarray, f: np.ndarray) -> None:
        raise NotImplementedError

    def _state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _recenter(self, x: np.ndarray) -> None:
        raise NotImplementedError(f"{self.name} cannot be re-centred")

    def _centre(self) -> np.ndarray:
        return self._best_x

    def _step_size(self) -> float:
        return math.nan

    def _stop(self) -> dict[str, Any]:
        return {}
