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
from common.shards import BatchTerms
from workers.worker import EvalWorker, combine_scores


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
                "rescore": w.rescore, "train_batches": w.train_batches}

    def commit(self, layer: int, z: np.ndarray) -> None:
        self.worker.commit(layer, z)

    def evaluate(self, layer: int, start: int, Z: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
        result = self.worker.evaluate(layer, Z)
        return start, result.losses, result.accuracies

    def committed_loss(self, layer: int) -> float:
        return float(self.worker.committed_loss(layer).losses[0])

    def stack_cap(self) -> int | None:
        return self.worker.stack_cap

    def limit_stack(self, cap: int) -> None:
        self.worker.limit_stack(cap)

    def evaluate_shard(self, layer: int, start: int, Z: np.ndarray,
                       shard: tuple[int, int]) -> tuple[int, BatchTerms]:
        """Per-batch loss terms of the chunk on example shard i of n (common/shards.py)."""
        return start, self.worker.batch_terms(layer, Z, shard)

    def predict(self, split: str, shard: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        return self.worker.predict(split, shard)

    def combine(self, *parts: tuple[np.ndarray, np.ndarray]) -> dict:
        return combine_scores(list(parts), self.worker.cfg)

    def delta_norms(self) -> list[dict]:
        return self.worker.delta_norms()

    def adapter(self) -> tuple[dict, dict]:
        return self.worker.peft_adapter()

    def peak_memory_mb(self) -> float:
        return self.worker.peak_memory_mb()

    def pid(self) -> int:
        import os

        return os.getpid()


EvalActor = ray.remote(ActorShell)
