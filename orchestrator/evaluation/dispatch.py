"""One population through a pool of Ray actors: fixed index chunks, pull-based dispatch, gather.

A population is cut into fixed chunks by index (`chunks`, never dependent on which actors are
alive), each idle actor takes the next chunk, results come back in any order and are put in
place by index (docs/design.md §6). Chunks smaller than population / actors let a fast actor
take more of them. A chunk is always scored whole by one actor, so its losses do not depend on
which actor scored it, and a fault only costs a re-dispatch:

* an actor that dies, or passes `deadline` on a chunk (it is killed), loses its chunk to the
  queue; the pool starts a replacement in the background, which joins when ready while the
  generation goes on with the live actors. The generation returns once its replacements have
  joined or failed (the pool's start timeout at most), so each one starts at full strength.
  A chunk that loses MAX_LOSSES actors stops the run (it kills whoever scores it);
* a Python exception while scoring leaves the actor alive: the chunk is retried once, on
  another actor where there is one, and a second failure stops the run with one clear
  `DfoloraError` (a deterministic bug would otherwise replace actors forever). The worker's
  own `DfoloraError` (bad input) is raised at once;
* with no actor left, live or starting, the generation fails with a clear message and the
  driver's last checkpoint stays resumable.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import numpy as np

from common.errors import DfoloraError

from .interface import Evaluation
from .pool import MAX_LOSSES, ActorPool, raised_by_code, task_failure

Chunk = tuple[int, int]


def chunks(n: int, chunk_size: int | None, num_actors: int) -> list[Chunk]:
    """(start, stop) index ranges, fixed by the population size and the configured actor
    count, never by who is alive. Default: 2 x actors near-equal chunks, larger first
    (np.array_split's rule), so 20 candidates on 8 actors are 4 x 2 + 12 x 1 rather than
    10 x 2: equal-size chunks can leave one extra round (bench/dispatch.py measured it)."""
    if chunk_size:
        return [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
    parts = min(n, 2 * num_actors)
    base, extra = divmod(n, parts)
    bounds = np.cumsum([0] + [base + (i < extra) for i in range(parts)])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


class Generation:
    """One population's chunks through the pool's actors: dispatch, gather, faults (see the
    top). `run()` once; Z's rows are scored as layer's vector."""

    def __init__(self, pool: ActorPool, layer: int, Z: np.ndarray, queue: list[Chunk],
                 deadline: float | None = None) -> None:
        self.pool, self.ray, self.layer, self.Z = pool, pool.ray, layer, Z
        self.deadline, self.queue = deadline, list(queue)
        self.losses, self.accs = np.full(len(Z), np.nan), np.full(len(Z), np.nan)
        self.running: dict[Any, tuple[Any, Chunk, float]] = {}  # ref -> (actor, chunk, t)
        self.idle = list(pool.actors)
        self.raised: dict[Chunk, Any] = {}  # chunk -> the actor it raised on, once
        self.lost: Counter[Chunk] = Counter()

    def run(self) -> Evaluation:
        pool = self.pool
        while self.queue or self.running:
            self._dispatch()
            if not self.running and not pool.starting:
                raise DfoloraError("no Ray actor is left to score candidates; the last "
                                   "checkpoint can be resumed once actors can start again")
            waiting = list(self.running) + list(pool.starting)
            done, _ = self.ray.wait(waiting, num_returns=1, timeout=1.0)
            for ref in done:
                if ref in pool.starting:
                    self.idle += pool.join(ref)
                else:
                    self._gather(ref)
            self._expire()
        pool.await_starts()
        return Evaluation(self.losses, self.accs)

    def _dispatch(self) -> None:
        for chunk in list(self.queue):
            actor = self._pick(chunk)
            if actor is None:
                continue
            self.queue.remove(chunk)
            self.idle.remove(actor)
            start, stop = chunk
            ref = actor.evaluate.remote(self.layer, start, self.Z[start:stop])
            self.running[ref] = (actor, chunk, time.monotonic())

    def _pick(self, chunk: Chunk):
        """An idle actor for the chunk: for a retry not the one it raised on, unless no other
        actor is alive or starting (then waiting would be forever)."""
        avoid = self.raised.get(chunk)
        others = [a for a in self.idle if a != avoid]
        if others:
            return others[0]
        busy_elsewhere = any(a != avoid for a, _, _ in self.running.values())
        if avoid in self.idle and not busy_elsewhere and not self.pool.starting:
            return avoid
        return None

    def _gather(self, ref) -> None:
        actor, chunk, _ = self.running.pop(ref)
        try:
            _, chunk_losses, chunk_accs = self.ray.get(ref)
        except self.ray.exceptions.RayError as err:
            if raised_by_code(err, self.ray):  # the actor is alive
                self.idle.append(actor)
                self._raised(chunk, actor, err)
            else:  # dead, or unreachable
                self._lost(actor, chunk, "died")
            return
        self.losses[chunk[0] : chunk[1]] = chunk_losses
        self.accs[chunk[0] : chunk[1]] = chunk_accs
        self.idle.append(actor)

    def _raised(self, chunk: Chunk, actor, err) -> None:
        what = f"scoring candidates {chunk[0]}..{chunk[1] - 1} of layer {self.layer}"
        cause = getattr(err, "cause", None)
        if isinstance(cause, DfoloraError) or chunk in self.raised:
            raise task_failure(err, what + (" (raised twice)" if chunk in self.raised else ""))
        self.raised[chunk] = actor
        self.queue.insert(0, chunk)

    def _lost(self, actor, chunk: Chunk, how: str) -> None:
        self.lost[chunk] += 1
        if self.lost[chunk] >= MAX_LOSSES:
            raise DfoloraError(f"candidates {chunk[0]}..{chunk[1] - 1} of layer {self.layer}: "
                               f"{self.lost[chunk]} actors died or passed the deadline on them "
                               f"(last: {how}); they may crash every actor")
        if actor in self.idle:
            self.idle.remove(actor)
        self.queue.insert(0, chunk)
        self.pool.lose(actor)

    def _expire(self) -> None:
        self.pool.expire_starts()
        if not self.deadline:
            return
        for ref, (actor, chunk, began) in list(self.running.items()):
            if time.monotonic() - began > self.deadline:
                self.running.pop(ref)
                self._lost(actor, chunk, f"no answer in {self.deadline:g} s")
