"""The in-process evaluator: an `EvalWorker` driven directly, for tests and single-machine runs.

This module is the driver side's entry point into workers/ (tests/unit/test_layering.py: no
other orchestrator module imports workers/, apart from the Ray evaluator's spawn of the actor
class). Besides `LocalEvaluator` it holds what the other commands run in this process:
`run_zero_shot`, `train_gradient_lora` and `merge_adapter`. Workers (and with them torch) are
imported when one of these is called or an evaluator is built, not when this module is
imported, so the driver stays torch-free until a model is actually needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
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

    @property
    def rescores_commits(self) -> bool:
        return self.worker.rescore

    def committed_loss(self, layer: int) -> float:
        return float(self.worker.committed_loss(layer).losses[0])

    def stack_cap(self) -> int | None:
        return self.worker.stack_cap

    def limit_stack(self, cap: int) -> None:
        self.worker.limit_stack(cap)

    def adapter(self) -> tuple[dict, dict]:
        return self.worker.peft_adapter()

    def peak_memory_mb(self) -> float:
        return self.worker.peak_memory_mb()

    def setup(self) -> dict:
        return {"calibration": self.worker.calibration_stats()}


# -- the other commands' work, in this process (orchestrator/commands.py) ----------------------

def run_zero_shot(cfg: RunConfig) -> tuple[dict, float]:
    """The unadapted model's scores on train, dev and test, and the peak memory of the process
    (common/memory.py) after scoring them."""
    from workers.worker import EvalWorker

    worker = EvalWorker(cfg)
    scores = {split: worker.score(split) for split in ("train", "dev", "test")}
    return scores, worker.peak_memory_mb()


def train_gradient_lora(cfg: RunConfig, **options: Any) -> dict:
    """The gradient LoRA baseline: `workers.gradient_lora.train_lora(cfg, **options)`."""
    from workers.gradient_lora import train_lora

    return train_lora(cfg, **options)


def merge_adapter(cfg: RunConfig, adapter: Path, out: Path) -> None:
    """The base model with the adapter merged in (PEFT's merge_and_unload), save_pretrained."""
    from peft import PeftModel

    from workers import models

    loaded = models.load(cfg.model)
    merged = PeftModel.from_pretrained(loaded.model, str(adapter)).merge_and_unload()
    merged.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
