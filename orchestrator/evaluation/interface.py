"""The evaluator interface the driver depends on (docs/design.md §6).

An evaluator owns the frozen model, the data and the committed vector of every layer. The driver
hands it a population for one layer and gets back one training loss per row, in row order
(`EvalResult`, common/messages.py); it commits accepted vectors and scores the committed state on
a split. What it reports about its scoring processes comes in one `Diagnostics`. `LocalEvaluator`
(local.py) drives an `EvalWorker` in this process; `RayEvaluator` (ray_eval.py) cuts the
population into index ranges over actors and writes each range's losses back in place.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np

from common.messages import Diagnostics, EvalResult

__all__ = ["Diagnostics", "EvalResult", "Evaluator", "EvaluatorInfo"]


@dataclass(frozen=True)
class EvaluatorInfo:
    """What the driver needs to know about an evaluator once it is built."""

    n_layers: int  # the model's layer count
    dim: int  # d: the length of one layer's vector
    # whether loss* is the committed state's own score (`committed_loss`) rather than the
    # accepted candidate's (eval.rescore_commits, docs/design.md §9)
    rescores_commits: bool = False
    # calibration statistics the maps were built from: stored in the checkpoint (setup), so a
    # resumed run rebuilds its evaluator with identical maps; None if there are none
    calibration: dict | None = None


class Evaluator(abc.ABC):
    """Scores candidates for one layer with every other layer at its committed vector."""

    @property
    @abc.abstractmethod
    def info(self) -> EvaluatorInfo: ...

    @abc.abstractmethod
    def evaluate(self, layer: int, Z: np.ndarray) -> EvalResult:
        """Training loss (and accuracy) of each row of Z (n, dim) as layer's vector."""

    @abc.abstractmethod
    def commit(self, layer: int, z: np.ndarray) -> None:
        """Install z (dim,) as layer's committed vector."""

    @abc.abstractmethod
    def score(self, split: str) -> dict:
        """Metrics of the committed state on 'train', 'dev' or 'test': at least loss, accuracy,
        f1 and n."""

    def committed_loss(self, layer: int) -> float:
        """Training loss of the committed state, every layer merged; `layer`: the layer last
        committed (where cached states may need advancing). Needed when
        `info.rescores_commits`."""
        raise NotImplementedError(f"{type(self).__name__} cannot score the committed state")

    def diagnostics(self, delta_norms: bool = False) -> Diagnostics:
        """The scoring processes as they stand (common/messages.py); with `delta_norms`, the
        committed deltas' sizes too (they cost a pass over the committed layers)."""
        return Diagnostics()

    def limit_stack(self, cap: int) -> None:
        """Score with at most `cap` candidates per pass, in every scoring process: a stack cap
        that `diagnostics()` reported, re-applied everywhere and on resume (docs/design.md §8)."""
        return None

    def adapter(self) -> tuple[dict, dict] | None:
        """The committed state in PEFT's LoRA format: (numpy tensors, adapter_config), if the
        evaluator can build it (workers/export.py)."""
        return None

    def close(self) -> None:
        """Release resources (actors, memory); the default holds none."""
        return None
