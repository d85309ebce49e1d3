"""The Ray evaluator: one population scored across many actors (the only Ray file here).

A population is cut into fixed chunks by index (`chunk_size`, never dependent on which actors
are alive), each idle actor takes the next chunk, results come back in any order and are put
in place by index (shared/style.md 7). Chunks smaller than population / actors let a fast actor
take more of them. A chunk is always scored whole by one actor, so its losses do not depend on
which actor scored it, and an actor that dies or misses the deadline only costs a re-dispatch:
its chunk goes back to the queue and a replacement actor is started, brought to the committed
state by replaying every commit. With no actor left the generation fails with a clear message
(the driver's last checkpoint stays resumable).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from common.config import RunConfig
from common.errors import DfoloraError

from .interface import CandidateId, Evaluation, Evaluator


def init_ray(address: str | None, num_cpus: int | None) -> None:
    """Connect to a cluster (`address` or RAY_ADDRESS) or start a local one bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only (env.md)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"])
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False)


class RayEvaluator(Evaluator):
    def __init__(self, cfg: RunConfig, *, stats: dict | None = None, num_actors: int = 2,
                 cpus_per_actor: float = 1, gpus_per_actor: float = 0,
                 chunk_size: int | None = None, deadline_s: float | None = None,
                 address: str | None = None, actor_args: dict | None = None,
                 actor_cls: Any = None) -> None:
        import ray

        # actor_cls: a Ray actor class with EvalActor's remote methods (default EvalActor); the
        # dispatch benchmark passes one that simulates scoring (bench/dispatch.py)
        self._actor_cls = actor_cls
        init_ray(address, None if address else max(1, math.ceil(num_actors * cpus_per_actor)))
        self._ray, self.cfg, self.deadline = ray, cfg, deadline_s
        self.chunk_size, self.num_actors = chunk_size, num_actors
        self._options = {"num_cpus": cpus_per_actor, "num_gpus": gpus_per_actor}
        self._args = {"threads": max(1, int(cpus_per_actor)), **(actor_args or {})}
        first = self._spawn(stats)
        info = ray.get(first.info.remote())
        self.stats, self._n_layers, self._dim = info["stats"], info["n_layers"], info["dim"]
        self.actors = [first] + [self._spawn(self.stats) for _ in range(num_actors - 1)]
        ray.get([a.info.remote() for a in self.actors[1:]])
        self.committed: dict[int, np.ndarray] = {}
        self.replacements = 0

    def _spawn(self, stats: dict | None):
        cls = self._actor_cls
        if cls is None:
            from workers.actor import EvalActor as cls  # torch is imported only when needed

        cfg = self.cfg.to_dict()
        return cls.options(**self._options).remote(cfg, stats, **self._args)

    @property
    def n_layers(self) -> int:
        return self._n_layers

    @property
    def dim(self) -> int:
        return self._dim

    def setup(self) -> dict:
        return {"calibration": self.stats}

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        """(start, stop) index ranges, fixed by the population size and the configured actor
        count, never by who is alive. Default: 2 x actors near-equal chunks, larger first
        (np.array_split's rule), so 20 candidates on 8 actors are 4 x 2 + 12 x 1 rather than
        10 x 2: equal-size chunks can leave one extra round (bench/dispatch.py measured it)."""
        if self.chunk_size:
            return [(s, min(s + self.chunk_size, n)) for s in range(0, n, self.chunk_size)]
        parts = min(n, 2 * self.num_actors)
        base, extra = divmod(n, parts)
        bounds = np.cumsum([0] + [base + (i < extra) for i in range(parts)])
        return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def evaluate(self, layer: int, Z: np.ndarray, ids: Sequence[CandidateId]) -> Evaluation:
        if len(ids) != len(Z):
            raise DfoloraError(f"{len(ids)} candidate ids for a population of {len(Z)}")
        n = len(Z)
        queue = self._chunks(n)
        losses, accs = np.full(n, np.nan), np.full(n, np.nan)
        running: dict[Any, tuple[Any, tuple[int, int], float]] = {}  # ref -> (actor, chunk, t)
        idle = list(self.actors)
        while queue or running:
            while queue and idle:
                actor, (start, stop) = idle.pop(0), queue.pop(0)
                ref = actor.evaluate.remote(layer, start, Z[start:stop])
                running[ref] = (actor, (start, stop), time.monotonic())
            if not running:
                raise DfoloraError("no Ray actor is left to score candidates; the last "
                                   "checkpoint can be resumed once actors can start again")
            done, _ = self._ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in done:
                actor, chunk, _ = running.pop(ref)
                try:
                    _, chunk_losses, chunk_accs = self._ray.get(ref)
                except self._ray.exceptions.RayError:
                    idle += self._replace(actor, queue, chunk)
                    continue
                losses[chunk[0] : chunk[1]] = chunk_losses
                accs[chunk[0] : chunk[1]] = chunk_accs
                idle.append(actor)
            if self.deadline:
                for ref, (actor, chunk, began) in list(running.items()):
                    if time.monotonic() - began > self.deadline:
                        running.pop(ref)
                        self._ray.kill(actor, no_restart=True)
                        idle += self._replace(actor, queue, chunk)
        return Evaluation(losses, accs)

    def _replace(self, dead, queue: list[tuple[int, int]], chunk: tuple[int, int] | None) -> list:
        """Requeue the dead actor's chunk; start a replacement at the committed state."""
        if chunk is not None:
            queue.insert(0, chunk)
        if dead in self.actors:
            self.actors.remove(dead)
        try:
            fresh = self._spawn(self.stats)
            for layer, z in self.committed.items():
                fresh.commit.remote(layer, z)  # actor calls run in order: ready before scoring
            self._ray.get(fresh.info.remote(), timeout=self.deadline)
        except self._ray.exceptions.RayError:
            return []  # no replacement: the generation goes on with the live actors
        self.actors.append(fresh)
        self.replacements += 1
        return [fresh]

    def commit(self, layer: int, z: np.ndarray) -> None:
        self.committed[layer] = np.array(z, dtype=np.float64)
        self._broadcast("commit", layer, self.committed[layer])

    def _broadcast(self, method: str, *args) -> list:
        refs = {getattr(a, method).remote(*args): a for a in self.actors}
        out = []
        for ref, actor in refs.items():
            try:
                out.append(self._ray.get(ref))
            except self._ray.exceptions.RayError:
                self._replace(actor, [], None)
        if not self.actors:
            raise DfoloraError("every Ray actor has died; resume from the last checkpoint")
        return out

    def score(self, split: str) -> dict:
        """The split divided among the actors; metrics combined on an actor (no torch here)."""
        n = len(self.actors)
        parts = [a.predict.remote(split, (i, n)) for i, a in enumerate(self.actors)]
        return self._ray.get(self.actors[0].combine.remote(*parts))

    def delta_norms(self) -> list[dict]:
        return self._ray.get(self.actors[0].delta_norms.remote())

    @property
    def parallelism(self) -> int:
        return len(self.actors)

    def adapter(self) -> tuple[dict, dict]:
        return self._ray.get(self.actors[0].adapter.remote())

    def peak_memory_mb(self) -> float | None:
        """The largest peak over the live actors (one model replica each)."""
        peaks = self._broadcast("peak_memory_mb")
        return max(peaks) if peaks else None

    def close(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors = []
