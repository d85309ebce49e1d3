"""The Ray evaluator: one population scored across many actors (docs/design.md §6).

`RayEvaluator` composes an `ActorPool` (pool.py: connecting to Ray, starting, joining and
replacing actors, broadcasting commits) and a `Generation` per population (dispatch.py: fixed
index chunks, pull-based dispatch, gather in place, faults). Scoring a split, the committed
loss, the diagnostics and the adapter are calls on the pool's live actors. `init_ray` and
`auto_actors` are importable from here too.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from common.config import RunConfig

from .dispatch import Chunk, Generation, chunks, example_shards, pieces
from .interface import Diagnostics, EvalResult, Evaluator, EvaluatorInfo
from .pool import START_TIMEOUT_S, ActorPool, auto_actors, init_ray

__all__ = ["RayEvaluator", "auto_actors", "init_ray"]


class RayEvaluator(Evaluator):
    """`num_actors` actors (-1: one per GPU of the cluster, else one per CPU pair), each asking
    for `cpus_per_actor`/`gpus_per_actor`; populations cut into `chunk_size` chunks (None:
    2 x actors near-equal ones); an actor silent `deadline_s` on a chunk is replaced;
    `backup_chunks`: idle actors run copies of outstanding chunks; `example_shards` ("auto" or
    N >= 1): each chunk split over that many runs of training batches (dispatch.py).
    `actor_cls`: a Ray actor class with EvalActor's remote methods (default EvalActor,
    workers/actor.py); the dispatch benchmark passes one that simulates scoring
    (bench/dispatch.py), tests ones that misbehave. `actor_args` go to its constructor."""

    def __init__(self, cfg: RunConfig, *, stats: dict | None = None, num_actors: int = 2,
                 cpus_per_actor: float = 1, gpus_per_actor: float = 0,
                 chunk_size: int | None = None, deadline_s: float | None = None,
                 start_timeout_s: float = START_TIMEOUT_S, address: str | None = None,
                 backup_chunks: bool = True, example_shards: int | str = 1,
                 actor_args: dict | None = None, actor_cls: Any = None) -> None:
        if num_actors < 0:  # auto: one actor per GPU, else one per pair of CPUs
            init_ray(address, None)
            import ray

            num_actors, cpus_per_actor, gpus_per_actor = auto_actors(
                ray.cluster_resources(), cpus_per_actor, gpus_per_actor)
        else:
            init_ray(address, None if address else max(1, math.ceil(num_actors * cpus_per_actor)))
        self.cfg, self.deadline = cfg, deadline_s
        self.chunk_size, self.num_actors = chunk_size, num_actors
        self.backup_chunks, self.backups = backup_chunks, 0  # copies started, all generations
        self.example_shards = example_shards
        self._actor_cls = actor_cls
        self._args = {"threads": max(1, int(cpus_per_actor)), **(actor_args or {})}
        self.pool = ActorPool(self._spawn, start_timeout=start_timeout_s,
                              resources={"num_cpus": cpus_per_actor, "num_gpus": gpus_per_actor})
        self._cap: int | None = None  # stack cap every actor, replacements too, scores with
        info = self.pool.start(num_actors, stats)
        self._info = EvaluatorInfo(info["n_layers"], info["dim"],
                                   bool(info.get("rescore", False)), self.pool.stats)
        # an actor that does not say (a test's stand-in) is never sharded
        self.train_batches = info.get("train_batches", 1)
        self.calibrate = info.get("calibrate", False)  # as the actors chose (eval.calibrate)

    def _spawn(self, stats: dict | None):
        cls = self._actor_cls
        if cls is None:
            from workers.actor import EvalActor as cls  # torch is imported only when needed

        actor = cls.options(**self.pool.resources).remote(self.cfg.to_dict(), stats, **self._args)
        if self._cap is not None:  # runs after the constructor, before the replayed commits
            actor.limit_stack.remote(self._cap)
        return actor

    # -- the pool's state, as tests and benchmarks read it -------------------------------------

    @property
    def actors(self) -> list:
        return self.pool.actors

    @property
    def stats(self) -> dict | None:
        return self.pool.stats

    @property
    def committed(self) -> dict[int, np.ndarray]:
        return self.pool.committed

    @property
    def replacements(self) -> int:
        return self.pool.replacements

    @property
    def start_failures(self) -> list[str]:
        return self.pool.start_failures

    @property
    def start_timeout(self) -> float:
        return self.pool.start_timeout

    @start_timeout.setter
    def start_timeout(self, seconds: float) -> None:
        self.pool.start_timeout = seconds

    # -- the Evaluator interface ----------------------------------------------------------------

    @property
    def info(self) -> EvaluatorInfo:
        return self._info

    def _chunks(self, n: int) -> list[Chunk]:
        """This evaluator's chunks of a population of n (dispatch.chunks)."""
        return chunks(n, self.chunk_size, self.num_actors)

    def shards(self, n: int) -> int:
        """Example shards per chunk for a population of n (dispatch.example_shards); none
        under `eval.calibrate`, whose label offsets need every training example."""
        if self.cfg.eval.calibrate != "off":
            return 1
        return example_shards(self.example_shards, self.num_actors, len(self._chunks(n)),
                              self.train_batches)

    def evaluate(self, layer: int, Z: np.ndarray) -> EvalResult:
        shards = self.shards(len(Z))
        generation = Generation(self.pool, layer, Z, pieces(self._chunks(len(Z)), shards),
                                self.deadline, self.backup_chunks, shards, self.train_batches)
        try:
            return generation.run()
        finally:
            self.backups += generation.backups

    def commit(self, layer: int, z: np.ndarray) -> None:
        self.pool.commit(layer, z)

    def score(self, split: str) -> dict:
        """The split divided among the actors; metrics combined on an actor (no torch here)."""
        pool = self.pool

        def call() -> dict:
            n = len(pool.actors)
            parts = [a.predict.remote(split, (i, n)) for i, a in enumerate(pool.actors)]
            train = []  # eval.calibrate: the training split's shards too (its label offsets)
            if self.calibrate:
                train = parts if split == "train" else [
                    a.predict.remote("train", (i, n)) for i, a in enumerate(pool.actors)]
            return pool.ray.get(pool.actors[0].combine.remote(*parts, *train,
                                                              n_train=len(train)))

        return pool.on_live_actors(call, f"scoring {split}")

    def committed_loss(self, layer: int) -> float:
        """On one actor: every actor holds the same merged weights, so any gives these bits."""
        pool = self.pool
        return pool.on_live_actors(
            lambda: pool.ray.get(pool.actors[0].committed_loss.remote(layer)), "committed_loss")

    def diagnostics(self, delta_norms: bool = False) -> Diagnostics:
        """Over the live actors (one model replica each) that are not draining: the largest
        peak memory and the smallest stack cap. Asked after every step, it must not wait for a
        losing backup copy; the driver keeps the maximum peak over steps, and the final scores
        wait for every actor. Delta norms, when asked, from the first actor (every actor holds
        the same committed state)."""
        pool = self.pool

        def call() -> tuple[list[Diagnostics], list[dict]]:
            reports = pool.ray.get([a.diagnostics.remote() for a in pool.free()])
            norms = (pool.ray.get(pool.actors[0].diagnostics.remote(True)).delta_norms
                     if delta_norms else [])
            return reports, norms

        reports, norms = pool.on_live_actors(call, "diagnostics")
        peaks = [r.peak_memory_mb for r in reports if r.peak_memory_mb is not None]
        caps = [r.stack_cap for r in reports if r.stack_cap is not None]
        return Diagnostics(parallelism=len(pool.actors), peak_memory_mb=max(peaks, default=None),
                           stack_cap=min(caps, default=None), delta_norms=norms)

    def limit_stack(self, cap: int) -> None:
        """Every actor, the starting ones and future replacements too, scores with `cap`."""
        self._cap = int(cap)
        for actor, calls, _ in self.pool.starting.values():
            calls.append(actor.limit_stack.remote(self._cap))  # awaited when it joins
        self.pool.broadcast("limit_stack", self._cap)

    def adapter(self) -> tuple[dict, dict]:
        pool = self.pool
        return pool.on_live_actors(lambda: pool.ray.get(pool.actors[0].adapter.remote()),
                                   "adapter export")

    def close(self) -> None:
        self.pool.close()
