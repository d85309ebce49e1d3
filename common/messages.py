"""What the driver side and the workers exchange (docs/design.md §6): plain numpy, no torch.

`EvalResult` is what scoring a population gives, one row per candidate, from an `EvalWorker`, a
Ray actor or any `Evaluator`. `Diagnostics` is what an evaluator reports about its scoring
processes; none of it changes a loss. Both sides import these from here, so one name covers
one message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from common.errors import DfoloraError


@dataclass(frozen=True)
class EvalResult:
    """Row i scores candidate i of the population (Z[i])."""

    losses: np.ndarray  # (n,) mean training loss per candidate; NaN/inf allowed
    accuracies: np.ndarray | None = None  # (n,) training accuracy per candidate, if known

    def checked(self, n: int) -> EvalResult:
        """The result as float64 arrays of shape (n,), or a clear error naming the shape (an
        evaluator written elsewhere may get it wrong)."""
        losses = np.asarray(self.losses, dtype=np.float64)
        if losses.shape != (n,):
            raise DfoloraError(f"evaluator returned losses of shape {losses.shape} for {n} "
                               f"candidates; expected ({n},)")
        acc = self.accuracies
        if acc is not None:
            acc = np.asarray(acc, dtype=np.float64)
            if acc.shape != (n,):
                raise DfoloraError(f"evaluator returned accuracies of shape {acc.shape} for "
                                   f"{n} candidates; expected ({n},)")
        return EvalResult(losses, acc)


@dataclass(frozen=True)
class Diagnostics:
    """An evaluator's scoring processes as they stand: metrics and checkpoint facts."""

    parallelism: int = 1  # processes scoring candidates at once (Ray actors), for per-actor rates
    peak_memory_mb: float | None = None  # the largest peak among them (common/memory.py)
    # candidates per stacked pass after out-of-memory halvings (None: never halved); the driver
    # stores it in the checkpoint and hands it to every process (`limit_stack`, §8)
    stack_cap: int | None = None
    # per layer {layer, q_ratio, k_ratio}: each committed delta's size relative to its weights
    # (§2); filled only when asked for (`diagnostics(delta_norms=True)`), empty if unknown
    delta_norms: list[dict] = field(default_factory=list)


LABEL_OFFSETS = "label_offsets.json"  # beside an adapter's PEFT files, under eval.calibrate=train


def label_offsets_document(offsets: list[float]) -> str:
    """The contents of label_offsets.json: the decision rule a calibrated run's scores used
    (docs/design.md §3), which a plain PEFT load ignores."""
    note = ("eval.calibrate=train: subtract offsets[i] from the logit of label word i (the "
            "task's order) before taking the argmax")
    return json.dumps({"calibrate": "train", "offsets": offsets, "note": note}, indent=2) + "\n"
