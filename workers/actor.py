"""The Ray actor: a thin remote shell around the plain `EvalWorker` (the only Ray file here).

Each actor loads the frozen model and the tokenised data once, in its constructor. Actor 0
calibrates; the others receive its statistics, so every actor regenerates identical maps.
`ActorShell` is the plain class and `EvalActor = ray.remote(ActorShell)` the actor, so tests
can subclass the shell to inject faults (tests/integration/test_ray_faults.py).
"""

from __future__ import annotations

import numpy as np
import ray
import torch

from common.config import RunConfig
from common.messages import Diagnostics, EvalResult
from common.shards import BatchTerms
from workers.scorer import combine_scores
from workers.worker import EvalWorker


class ActorShell:
    """The remote methods the Ray evaluator calls (orchestrator/evaluation/pool.py, dispatch.py
    and ray_eval.py)."""

    def __init__(self, cfg: dict, stats: dict | None = None, threads: int | None = None,
                 loaded=None, splits=None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.worker = EvalWorker(RunConfig.from_dict(cfg), stats=stats, loaded=loaded,
                                 splits=splits)

    def info(self) -> dict:
        w = self.worker
        return {"n_layers": w.n_layers, "dim": w.dim, "stats": w.calibration_stats(),
                "rescore": w.rescore, "train_batches": w.train_batches,
                "calibrate": w.calibrate}

    def commit(self, layer: int, z: np.ndarray) -> None:
        self.worker.commit(layer, z)

    def evaluate(self, layer: int, Z: np.ndarray) -> EvalResult:
        """The chunk's losses and accuracies, row i for Z[i] (the dispatcher knows where the
        chunk goes)."""
        return self.worker.evaluate(layer, Z)

    def evaluate_shard(self, layer: int, Z: np.ndarray, shard: tuple[int, int]) -> BatchTerms:
        """Per-batch loss terms of the chunk on example shard i of n (common/shards.py)."""
        return self.worker.batch_terms(layer, Z, shard)

    def committed_loss(self, layer: int) -> float:
        return float(self.worker.committed_loss(layer).losses[0])

    def limit_stack(self, cap: int) -> None:
        self.worker.limit_stack(cap)

    def predict(self, split: str, shard: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        return self.worker.predict(split, shard)

    def combine(self, *parts: tuple[np.ndarray, np.ndarray], n_train: int = 0) -> dict:
        """A split's metrics from its shards; the last `n_train` parts are the training split's
        shards, for `eval.calibrate` (workers/scorer.py)."""
        split, train = parts[:len(parts) - n_train], parts[len(parts) - n_train:]
        return combine_scores(list(split), self.worker.cfg, list(train) or None)

    def diagnostics(self, delta_norms: bool = False) -> Diagnostics:
        """This actor's peak memory and stack cap (and delta norms, when asked); the Ray
        evaluator combines those of its actors."""
        w = self.worker
        return Diagnostics(peak_memory_mb=w.peak_memory_mb(), stack_cap=w.stack_cap,
                           delta_norms=w.delta_norms() if delta_norms else [])

    def adapter(self) -> tuple[dict, dict]:
        return self.worker.peft_adapter()

    def pid(self) -> int:
        import os

        return os.getpid()


EvalActor = ray.remote(ActorShell)
