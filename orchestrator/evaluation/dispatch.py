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

Backup chunks (`backup`, `cluster.backup_chunks`): once the queue is empty, an idle actor runs a
copy of the longest-outstanding chunk that runs on one actor only, if the copy is expected to
answer first (`worth_copying`). The first answer is kept and the other discarded: both are the
same bits, since a chunk is scored whole, so the trajectory cannot change. A copy's fault
matters only while its chunk has no answer and no other copy at work. A losing copy still at
work when the generation ends leaves its actor draining in the pool (pool.py) until it is done.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from typing import Any

import numpy as np

from common.errors import DfoloraError

from .interface import Evaluation
from .pool import MAX_LOSSES, ActorPool, raised_by_code, task_failure

Chunk = tuple[int, int]
OVERDUE = 1.5  # a chunk out this many times a typical actor's time for it gets a copy


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


def typical_rate(rates: dict) -> float | None:
    """The median of the actors' last measured seconds per candidate (None: none measured)."""
    return statistics.median(rates.values()) if rates else None


def worth_copying(size: int, elapsed: float, owner_rate: float | None,
                  idle_rate: float | None, typical: float | None) -> bool:
    """Whether a copy of a chunk of `size` candidates, out for `elapsed` seconds on an actor
    that last scored `owner_rate` seconds per candidate, would answer first on an idle actor
    that last scored `idle_rate` (None: not measured yet, taken as `typical`). A copy that
    loses keeps its actor busy into the next generation, so: a copy goes out when the owner is
    known to be slower by more than what is left of the chunk, or when the chunk is overdue,
    out OVERDUE times a typical actor's time for it. Nothing measured yet: no copy."""
    if typical is None:
        return False
    owner, idle = owner_rate or typical, idle_rate or typical
    left = size * owner - elapsed
    if left > 0:
        return size * idle < left
    return elapsed >= OVERDUE * size * typical


class Generation:
    """One population's chunks through the pool's actors: dispatch, gather, faults, backups
    (see the top). `run()` once; Z's rows are scored as layer's vector."""

    def __init__(self, pool: ActorPool, layer: int, Z: np.ndarray, queue: list[Chunk],
                 deadline: float | None = None, backup: bool = False) -> None:
        self.pool, self.ray, self.layer, self.Z = pool, pool.ray, layer, Z
        self.deadline, self.backup, self.queue = deadline, backup, list(queue)
        self.todo = set(queue)  # chunks with no answer yet
        self.losses, self.accs = np.full(len(Z), np.nan), np.full(len(Z), np.nan)
        self.running: dict[Any, tuple[Any, Chunk, float]] = {}  # ref -> (actor, chunk, t)
        self.idle = pool.free()
        self.raised: dict[Chunk, Any] = {}  # chunk -> the actor it raised on, once
        self.lost: Counter[Chunk] = Counter()
        self.backups = 0  # copies started

    def run(self) -> Evaluation:
        pool = self.pool
        while self.todo:
            self._dispatch()
            if not self.running and not pool.starting and not pool.draining:
                raise DfoloraError("no Ray actor is left to score candidates; the last "
                                   "checkpoint can be resumed once actors can start again")
            waiting = [*self.running, *pool.starting, *pool.draining_refs()]
            done, _ = self.ray.wait(waiting, num_returns=1, timeout=self._wake_in())
            for ref in done:
                if ref in pool.starting:
                    self.idle += pool.join(ref)
                elif ref in self.running:
                    self._gather(ref)
                else:
                    self.idle += pool.drained(ref)
            self._expire()
        for ref, (actor, _, began) in self.running.items():  # losing copies still at work
            pool.drain(actor, ref, began)
        pool.await_starts()
        return Evaluation(self.losses, self.accs)

    def _dispatch(self) -> None:
        for chunk in list(self.queue):
            actor = self._pick(chunk)
            if actor is not None:
                self.queue.remove(chunk)
                self._send(actor, chunk)
        while self.backup and self.idle and not self.queue:
            target = self._backup_target()
            if target is None:
                return
            self._send(*target)
            self.backups += 1

    def _wake_in(self) -> float:
        """Seconds to wait for an answer before looking again: at most 1, and while a backup
        could go out, until the first chunk at work becomes overdue (worth_copying)."""
        typical = typical_rate(self.pool.rates)
        if not (self.backup and self.idle and not self.queue and typical):
            return 1.0
        now = time.monotonic()
        due = [began + OVERDUE * (c[1] - c[0]) * typical - now
               for _, c, began in self.running.values() if self._copies(c) == 1]
        return min([1.0, *(d for d in due if d > 0)])

    def _send(self, actor, chunk: Chunk) -> None:
        self.idle.remove(actor)
        start, stop = chunk
        ref = actor.evaluate.remote(self.layer, start, self.Z[start:stop])
        self.running[ref] = (actor, chunk, time.monotonic())

    def _copies(self, chunk: Chunk) -> int:
        return sum(c == chunk for _, c, _ in self.running.values())

    def _backup_target(self) -> tuple[Any, Chunk] | None:
        """(idle actor, chunk) for a backup copy: the longest-outstanding chunk running on one
        actor only whose copy is expected to answer first; None if there is none."""
        alone = [(began, chunk, owner) for owner, chunk, began in self.running.values()
                 if self._copies(chunk) == 1]
        for began, chunk, owner in sorted(alone, key=lambda item: item[:2]):
            actor = self._pick(chunk)
            if actor is not None and worth_copying(chunk[1] - chunk[0], time.monotonic() - began,
                                                   self.pool.rates.get(owner),
                                                   self.pool.rates.get(actor),
                                                   typical_rate(self.pool.rates)):
                return actor, chunk
        return None

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
        actor, chunk, began = self.running.pop(ref)
        try:
            _, chunk_losses, chunk_accs = self.ray.get(ref)
        except self.ray.exceptions.RayError as err:
            if raised_by_code(err, self.ray):  # the actor is alive
                self.idle.append(actor)
                self._raised(chunk, actor, err)
            else:  # dead, or unreachable
                self._lost(actor, chunk, "died")
            return
        self.idle.append(actor)
        self.pool.rates[actor] = (time.monotonic() - began) / (chunk[1] - chunk[0])
        if chunk in self.todo:  # the first answer wins; a later copy's is the same bits
            self.todo.remove(chunk)
            self.losses[chunk[0] : chunk[1]] = chunk_losses
            self.accs[chunk[0] : chunk[1]] = chunk_accs

    def _raised(self, chunk: Chunk, actor, err) -> None:
        if chunk not in self.todo:  # a losing copy: its answer is not needed
            return
        what = f"scoring candidates {chunk[0]}..{chunk[1] - 1} of layer {self.layer}"
        cause = getattr(err, "cause", None)
        if isinstance(cause, DfoloraError) or chunk in self.raised:
            raise task_failure(err, what + (" (raised twice)" if chunk in self.raised else ""))
        self.raised[chunk] = actor
        if not self._copies(chunk):  # else the copy at work is the retry
            self.queue.insert(0, chunk)

    def _lost(self, actor, chunk: Chunk, how: str) -> None:
        if chunk in self.todo:
            self.lost[chunk] += 1
            if self.lost[chunk] >= MAX_LOSSES:
                raise DfoloraError(f"candidates {chunk[0]}..{chunk[1] - 1} of layer "
                                   f"{self.layer}: {self.lost[chunk]} actors died or passed the "
                                   f"deadline on them (last: {how}); they may crash every actor")
            if not self._copies(chunk):
                self.queue.insert(0, chunk)
        if actor in self.idle:
            self.idle.remove(actor)
        self.pool.lose(actor)

    def _expire(self) -> None:
        self.pool.expire_starts()
        if not self.deadline:
            return
        self.pool.expire_draining(self.deadline)
        for ref, (actor, chunk, began) in list(self.running.items()):
            if time.monotonic() - began > self.deadline:
                self.running.pop(ref)
                self._lost(actor, chunk, f"no answer in {self.deadline:g} s")
