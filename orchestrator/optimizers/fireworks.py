"""The Fireworks Algorithm (FWA), written here: a bare-bones and a dynamic multi-firework variant.

`fwa`: bare-bones FWA (BBFWA; J. Li and Y. Tan, "The bare bones fireworks algorithm: a
minimalist global optimizer", Applied Soft Computing 62, 2018), as in docs/design.md §5.
One firework, starting at x0; each generation draws n sparks uniformly in the box of half-width
A around it; the firework moves to the best spark if that is strictly better, and then
A *= 1.2, otherwise A *= 0.9 (A0 = sigma0).  The comparison needs the firework's own loss, so
while it is unknown (at the start, after `recenter`) the firework itself is the first candidate
of the batch, as BBFWA evaluates its initial firework.

`fwa-dyn`: several fireworks with dynamic amplitudes, after dynFWA (S. Zheng, A. Janecek,
J. Li and Y. Tan, "Dynamic search in fireworks algorithm", IEEE CEC 2014):
  * k fireworks (default 3 for popsize 20): the first at x0, the others uniform within sigma0.
  * Each firework has its own amplitude under dynFWA's rule (x1.2 when one of its sparks beats
    it, x0.9 otherwise).  dynFWA uses that rule for the best ("core") firework only and the
    EFWA formula for the others; one dynamic amplitude per firework follows the loser-out
    tournament FWA (J. Li and Y. Tan, IEEE Trans. Evol. Comput. 22(5), 2018) and keeps the
    search independent of the loss scale.
  * The sparks are shared in proportion to fitness rank (k for the best firework, ..., 1 for
    the worst).  FWA allocates by loss differences (Y. Tan and Y. Zhu, ICSI 2010); ranks make
    the allocation invariant to monotone transformations of the loss.
  * Gaussian sparks (2 of 20 by default, `gaussian_sparks=0` turns them off) from EFWA (S.
    Zheng, A. Janecek and Y. Tan, "Enhanced fireworks algorithm", IEEE CEC 2013):
    x_i + (x_core - x_i) * e, e ~ N(0, 1), from a random non-core firework i; the best of them
    replaces the worst firework if it is better.
  * Selection keeps the best: a firework only ever moves to a better point, so the best point
    found is always a firework.
  Sparks perturb every coordinate, as in BBFWA, rather than a random subset as in FWA/EFWA/
  dynFWA; with k = 1 and no Gaussian sparks `fwa-dyn` is exactly `fwa`.

Bounds: spark coordinates outside [lo, hi] are mirrored back into the box.
State: plain data (lists, floats and the numpy Generator's `bit_generator.state`), JSON-safe.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from .base import Optimizer, OptimizerError, seed_sequence

SELF, EXPLOSION, GAUSSIAN = 0, 1, 2  # what each row of a batch is


@dataclasses.dataclass
class FireworksState:
    """The evolving part: positions, losses (+inf while unknown) and explosion amplitudes."""

    x: np.ndarray  # (k, dim)
    f: np.ndarray  # (k,)
    amp: np.ndarray  # (k,)


def mirror_into(X: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Reflect coordinates outside [lo, hi] back into it (in-range values stay bit-identical)."""
    width = hi - lo
    y = np.mod(X - lo, 2.0 * width)
    mirrored = lo + np.where(y > width, 2.0 * width - y, y)
    return np.where((X < lo) | (X > hi), mirrored, X)


def rank_shares(f: np.ndarray, m: int) -> np.ndarray:
    """Split m sparks over fireworks by rank (best gets k shares, worst 1; equal while any loss
    is unknown), rounding by largest remainder so the counts sum to m."""
    k = len(f)
    if np.isfinite(f).all():
        weights = k - np.argsort(np.argsort(f, kind="stable"), kind="stable")
    else:
        weights = np.ones(k)
    share = m * weights / weights.sum()
    counts = np.floor(share).astype(int)
    extra = np.argsort(-(share - counts), kind="stable")[: m - counts.sum()]
    counts[extra] += 1
    return counts


class DynamicFireworks(Optimizer):
    """Multi-firework FWA with per-firework dynamic amplitudes (see the module docstring)."""

    name = "fwa-dyn"

    def __init__(self, dim: int, *, x0: np.ndarray | None = None, sigma0: float = 1.0,
                 popsize: int = 20, seed: int = 0, bounds: tuple[float, float] | None = None,
                 n_fireworks: int | None = None, gaussian_sparks: int | None = None,
                 amplify: float = 1.2, reduce: float = 0.9) -> None:
        super().__init__(dim, x0=x0, sigma0=sigma0, popsize=popsize, seed=seed, bounds=bounds)
        # Defaults for popsize 20: 3 fireworks and 2 Gaussian sparks.  dynFWA drops Gaussian
        # sparks; we keep them because they are the only way fireworks share information, and
        # on the unit tests' 50-dim sphere and ellipsoid they cut the loss reached with 4000
        # evaluations 3-50x.
        k = min(3, max(1, self.popsize // 4)) if n_fireworks is None else n_fireworks
        if gaussian_sparks is None:
            gaussian_sparks = min(2, self.popsize // 10) if k > 1 else 0
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.popsize:
            raise OptimizerError(f"n_fireworks must be an integer in [1, popsize={self.popsize}]"
                                 f", got {n_fireworks!r}")
        if (isinstance(gaussian_sparks, bool) or not isinstance(gaussian_sparks, int)
                or not 0 <= gaussian_sparks < self.popsize):
            raise OptimizerError(f"gaussian_sparks must be an integer in [0, popsize), "
                                 f"got {gaussian_sparks!r}")
        if not (math.isfinite(amplify) and amplify >= 1.0 and 0.0 < reduce <= 1.0):
            raise OptimizerError(f"need amplify >= 1 and 0 < reduce <= 1, got amplify="
                                 f"{amplify!r}, reduce={reduce!r}")
        self.n_fireworks, self.gaussian_sparks = k, gaussian_sparks
        self.amplify, self.reduce = float(amplify), float(reduce)
        self._rng = np.random.Generator(np.random.PCG64(seed_sequence(self.seed, 0)))
        x = np.repeat(self.x0[None, :], k, axis=0)
        x[1:] += self._rng.uniform(-self.sigma0, self.sigma0, size=(k - 1, self.dim))
        self._fw = FireworksState(self._mirror(x), np.full(k, math.inf), np.full(k, self.sigma0))
        self._owner: np.ndarray | None = None  # the batch plan between ask and tell
        self._kind: np.ndarray | None = None

    def extra_settings(self) -> dict[str, Any]:
        return {"n_fireworks": self.n_fireworks, "gaussian_sparks": self.gaussian_sparks,
                "amplify": self.amplify, "reduce": self.reduce}

    def _mirror(self, X: np.ndarray) -> np.ndarray:
        return X if self.bounds is None else mirror_into(X, *self.bounds)

    def _core(self) -> int:
        """Index of the best firework (the first one while no loss is known)."""
        return int(np.argmin(self._fw.f))

    def _ask(self, n: int) -> np.ndarray:
        fw, k = self._fw, self.n_fireworks
        unknown = np.flatnonzero(~np.isfinite(fw.f))
        if n < len(unknown):
            raise OptimizerError(f"{self.name}: ask(n={n}) must include the {len(unknown)} "
                                 f"fireworks whose loss is unknown; ask for n >= {len(unknown)}")
        m = n - len(unknown)
        n_gauss = min(self.gaussian_sparks, m) if k > 1 and len(unknown) == 0 else 0
        counts = rank_shares(fw.f, m - n_gauss)
        rows, owner, kind = [fw.x[unknown]], [unknown], [np.full(len(unknown), SELF)]
        for i in range(k):
            box = self._rng.uniform(-fw.amp[i], fw.amp[i], size=(counts[i], self.dim))
            rows.append(fw.x[i] + box)
            owner.append(np.full(counts[i], i))
            kind.append(np.full(counts[i], EXPLOSION))
        if n_gauss:
            core = self._core()
            others = np.array([i for i in range(k) if i != core])
            src = others[self._rng.integers(len(others), size=n_gauss)]
            e = self._rng.standard_normal(n_gauss)[:, None]
            rows.append(fw.x[src] + (fw.x[core] - fw.x[src]) * e)
            owner.append(src)
            kind.append(np.full(n_gauss, GAUSSIAN))
        self._owner, self._kind = np.concatenate(owner), np.concatenate(kind)
        return self._mirror(np.concatenate(rows))

    def _tell(self, X: np.ndarray, f: np.ndarray) -> None:
        fw, owner, kind = self._fw, self._owner, self._kind
        for r in np.flatnonzero(kind == SELF):  # first: the comparisons below need these
            fw.f[owner[r]] = f[r]
        for i in range(self.n_fireworks):
            rows = np.flatnonzero((kind == EXPLOSION) & (owner == i))
            if len(rows) == 0:
                continue
            j = rows[np.argmin(f[rows])]
            if f[j] < fw.f[i]:
                fw.x[i], fw.f[i] = X[j], f[j]
                fw.amp[i] *= self.amplify
            else:
                fw.amp[i] *= self.reduce
        if self.bounds is not None:  # a box wider than the domain explores nothing new
            np.minimum(fw.amp, self.bounds[1] - self.bounds[0], out=fw.amp)
        rows = np.flatnonzero(kind == GAUSSIAN)
        if len(rows):
            j, worst = rows[np.argmin(f[rows])], int(np.argmax(fw.f))
            if f[j] < fw.f[worst]:
                fw.x[worst], fw.f[worst] = X[j], f[j]
        self._owner = self._kind = None

    def _recenter(self, x: np.ndarray) -> None:
        # Translate all fireworks so the core lands on x; amplitudes are kept, losses are
        # unknown in the new context and get measured by the next batch.  The core moves to
        # index 0, which `_core()` reports while losses are unknown (so the step size holds).
        fw, core = self._fw, self._core()
        order = [core] + [i for i in range(self.n_fireworks) if i != core]
        x_new = self._mirror(fw.x[order] + (x - fw.x[core]))
        x_new[0] = x
        self._fw = FireworksState(x_new, np.full(self.n_fireworks, math.inf), fw.amp[order])

    def _centre(self) -> np.ndarray:
        return self._fw.x[self._core()]

    def _step_size(self) -> float:
        return float(self._fw.amp[self._core()])

    def _stop(self) -> dict[str, Any]:
        # Every box has shrunk to rounding noise: further sparks would repeat the fireworks.
        tol = 1e-12 * self.sigma0
        return {"amplitude": float(self._fw.amp.max())} if self._fw.amp.max() < tol else {}

    def _state(self) -> dict[str, Any]:
        fw = self._fw
        plan = None if self._owner is None else [self._owner.tolist(), self._kind.tolist()]
        return {"x": fw.x.tolist(), "f": fw.f.tolist(), "amp": fw.amp.tolist(), "plan": plan,
                "rng": self._rng.bit_generator.state}

    def _load_state(self, state: dict[str, Any]) -> None:
        self._fw = FireworksState(np.array(state["x"], dtype=np.float64).reshape(-1, self.dim),
                                  np.array(state["f"], dtype=np.float64),
                                  np.array(state["amp"], dtype=np.float64))
        plan = state["plan"]
        self._owner = None if plan is None else np.array(plan[0], dtype=int)
        self._kind = None if plan is None else np.array(plan[1], dtype=int)
        self._rng.bit_generator.state = state["rng"]


class BareBonesFireworks(DynamicFireworks):
    """BBFWA: one firework, uniform sparks, amplitude x1.2 / x0.9 (see the module docstring)."""

    name = "fwa"

    def __init__(self, dim: int, *, x0: np.ndarray | None = None, sigma0: float = 1.0,
                 popsize: int = 20, seed: int = 0, bounds: tuple[float, float] | None = None,
                 amplify: float = 1.2, reduce: float = 0.9) -> None:
        super().__init__(dim, x0=x0, sigma0=sigma0, popsize=popsize, seed=seed, bounds=bounds,
                         n_fireworks=1, gaussian_sparks=0, amplify=amplify, reduce=reduce)

    def extra_settings(self) -> dict[str, Any]:
        return {"amplify": self.amplify, "reduce": self.reduce}
