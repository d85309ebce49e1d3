"""The in-process evaluator: an `EvalWorker` driven directly, for tests and single-machine runs.

This module is the driver side's entry point into workers/ (tests/unit/test_layering.py: no
other orchestrator module imports workers/, apart from the Ray evaluator's spawn of the actor
class). Besides `LocalEvaluator` it holds what the other commands run in this process:
`run_zero_shot`, `train_gradient_lora` and `merge_adapter`. Workers (and with them torch) are
imported when one of these is called or an evaluator is built, not when this module is
imported, so the driver stays torch-free until a model is actually needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from common.config import RunConfig

from .interface import Diagnostics, EvalResult, Evaluator, EvaluatorInfo


class LocalEvaluator(Evaluator):
    """One `EvalWorker` in this process. `stats` are calibration statistics measured before
    (a resumed run passes the stored ones); `loaded` and `splits` let tests use tiny models."""

    def __init__(self, cfg: RunConfig, *, stats: dict | None = None, loaded: Any = None,
                 splits: Any = None) -> None:
        from workers.worker import EvalWorker

        self.worker = w = EvalWorker(cfg, stats=stats, loaded=loaded, splits=splits)
        self._info = EvaluatorInfo(w.n_layers, w.dim, w.rescore, w.calibration_stats())

    @property
    def info(self) -> EvaluatorInfo:
        return self._info

    def evaluate(self, layer: int, Z: np.ndarray) -> EvalResult:
        return self.worker.evaluate(layer, Z)

    def commit(self, layer: int, z: np.ndarray) -> None:
        self.worker.commit(layer, z)

    def score(self, split: str) -> dict:
        return self.worker.score(split)

    def committed_loss(self, layer: int) -> float:
        return float(self.worker.committed_loss(layer).losses[0])

    def diagnostics(self, delta_norms: bool = False) -> Diagnostics:
        w = self.worker
        return Diagnostics(peak_memory_mb=w.peak_memory_mb(), stack_cap=w.stack_cap,
                           delta_norms=w.delta_norms() if delta_norms else [])

    def limit_stack(self, cap: int) -> None:
        self.worker.limit_stack(cap)

    def adapter(self) -> tuple[dict, dict]:
        return self.worker.peft_adapter()


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
