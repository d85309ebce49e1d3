"""The evaluator interface the driver and the schedule depend on (docs/design.md §6).

An evaluator owns the frozen model, the data and the committed vector of every layer. The driver
hands it a population for one layer, with one id per candidate, and gets back one training loss
per candidate in the same order; it commits accepted vectors and scores the assembled state on a
split. `LocalEvaluator` (local.py) drives an `EvalWorker` in this process; a Ray evaluator splits
the population by index over actors and reassembles the losses by id (docs/design.md §6).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from common.errors import DfoloraError


class CandidateId(NamedTuple):
    """Where a candidate comes from; unique within a run."""

    round: int
    layer: int
    generation: int  # the run's generation counter; -1 for the reference evaluation of loss*
    index: int  # row of the population


@dataclass(frozen=True)
class Evaluation:
    losses: np.ndarray  # (n,) float64 training loss per candidate; NaN/inf allowed
    accuracies: np.ndarray | None = None  # (n,) training accuracy per candidate, if known


class Evaluator(abc.ABC):
    """Scores candidates for one layer with every other layer at its committed vector."""

    @property
    @abc.abstractmethod
    def n_layers(self) -> int: ...

    @property
    @abc.abstractmethod
    def dim(self) -> int: ...

    @abc.abstractmethod
    def evaluate(self, layer: int, Z: np.ndarray, ids: Sequence[CandidateId]) -> Evaluation:
        """Training loss (and accuracy) of each row of Z (n, dim) as layer's vector."""

    @abc.abstractmethod
    def commit(self, layer: int, z: np.ndarray) -> None:
        """Install z (dim,) as layer's committed vector."""

    @abc.abstractmethod
    def score(self, split: str) -> dict:
        """Metrics of the committed state on 'train', 'dev' or 'test': at least loss, accuracy,
        f1 and n."""

    @property
    def parallelism(self) -> int:
        """How many processes score candidates at once (Ray actors), for per-actor rates."""
        return 1

    def delta_norms(self) -> list[dict]:
        """Relative size of each committed delta per layer (docs/design.md §2), if known."""
        return []

    def adapter(self) -> tuple[dict, dict] | None:
        """The committed state in PEFT's LoRA format: (numpy tensors, adapter_config), if the
        evaluator can build it (workers/export.py)."""
        return None

    @property
    def rescores_commits(self) -> bool:
        """Whether loss* is the committed state's own score (`committed_loss`) rather than the
        accepted candidate's (eval.rescore_commits, docs/design.md §9)."""
        return False

    def committed_loss(self, layer: int) -> float:
        """Training loss of the committed state, every layer merged; `layer`: the layer last
        committed (where cached states may need advancing). Needed when `rescores_commits`."""
        raise NotImplementedError(f"{type(self).__name__} cannot score the committed state")

    def stack_cap(self) -> int | None:
        """Candidates per stacked pass after out-of-memory halvings (None: never halved); the
        driver stores it in the checkpoint (docs/design.md §8)."""
        return None

    def limit_stack(self, cap: int) -> None:
        """Score with at most `cap` candidates per pass, in every scoring process."""
        return None

    def peak_memory_mb(self) -> float | None:
        """Peak memory of the scoring processes (common/memory.py), if known."""
        return None

    def setup(self) -> dict:
        """JSON-safe facts a resumed run needs to rebuild this evaluator identically (for
        example calibration statistics); stored in the checkpoint."""
        return {}

    def close(self) -> None:
        """Release resources (actors, memory); the default holds none."""
        return None


def check_evaluation(result: Evaluation, n: int) -> Evaluation:
    """The evaluator's result as float64 arrays of shape (n,), or a clear error."""
    losses = np.asarray(result.losses, dtype=np.float64)
    if losses.shape != (n,):
        raise DfoloraError(f"evaluator returned losses of shape {losses.shape} for {n} "
                           f"candidates; expected ({n},)")
    acc = result.accuracies
    if acc is not None:
        acc = np.asarray(acc, dtype=np.float64)
        if acc.shape != (n,):
            raise DfoloraError(f"evaluator returned accuracies of shape {acc.shape} for {n} "
                               f"candidates; expected ({n},)")
    return Evaluation(losses, acc)
