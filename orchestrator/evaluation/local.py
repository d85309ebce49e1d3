"""The in-process evaluator: an `EvalWorker` driven directly, for tests and single-machine runs.

The worker (and with it torch) is imported when an evaluator is built, not when this module is
imported, so the driver stays torch-free until a model is actually needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from common.config import RunConfig
from common.errors import DfoloraError

from .interface import CandidateId, Evaluation, Evaluator


class LocalEvaluator(Evaluator):
    """One `EvalWorker` in this process. `stats` are calibration statistics measured before
    (a resumed run passes the stored ones); `loaded` and `splits` let tests use tiny models."""

    def __init__(self, cfg: RunConfig, *, stats: dict | None = None, loaded: Any = None,
                 splits: Any = None) -> None:
        from workers.worker import EvalWorker

        self.worker = EvalWorker(cfg, stats=stats, loaded=loaded, splits=splits)

    @property
    def n_layers(self) -> int:
        return self.worker.n_layers

    @property
    def dim(self) -> int:
        return self.worker.dim

    def evaluate(self, layer: int, Z: np.ndarray, ids: Sequence[CandidateId]) -> Evaluation:
        if len(ids) != len(Z):
            raise DfoloraError(f"{len(ids)} candidate ids for a population of {len(Z)}")
        result = self.worker.evaluate(layer, Z)
        return Evaluation(result.losses, result.accuracies)

    def commit(self, layer: int, z: np.ndarray) -> None:
        self.worker.commit(layer, z)

    def score(self, split: str) -> dict:
        return self.worker.score(split)

    def delta_norms(self) -> list[dict]:
        return self.worker.delta_norms()

    def adapter(self) -> tuple[dict, dict]:
        return self.worker.peft_adapter()

    def peak_memory_mb(self) -> float:
        return self.worker.peak_memory_mb()

    def setup(self) -> dict:
        return {"calibration": self.worker.calibration_stats()}
