"""One population through a pool of Ray actors: fixed index chunks, pull-based dispatch, gather.

A population is cut into fixed chunks by index (`chunks`, never dependent on which actors are
alive), each idle actor takes the next chunk, results come back in any order and are put in
place by index (docs/design.md §6). Chunks smaller than population / actors let a fast actor
take more of them. When the configured actors outnumber the chunks, each chunk is also split
over consecutive runs of training batches (`example_shards`, `cluster.example_shards`): the
pieces return per-batch loss terms, combined in batch order once all are in, the same bits
as a whole chunk (common/shards.py). Below, a "chunk" is such a piece when shards are on. A
chunk is always scored whole by one actor, so its losses do not depend on which actor scored
it, and a fault only costs a re-dispatch:

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
from common.messages import EvalResult
from common.shards import BatchTerms, combine_batches

from .pool import MAX_LOSSES, ActorPool, raised_by_code, task_failure

Chunk = tuple[int, int]  # candidates [start, stop)
Piece = tuple[int, int, int]  # (start, stop, shard): a chunk's candidates on one example shard
OVERDUE = 1.5  # a chunk out this many times a typical actor's time for it gets a copy
SLOW = 1.5  # an actor whose last rate is this many times the typical one's is known slow


def chunks(n: int, chunk_size: int | str | None, num_actors: int) -> list[Chunk]:
    """(start, stop) index ranges, fixed by the population size and the configured actor
    count, never by who is alive. Default: 2 x actors near-equal chunks, larger first
    (np.array_split's rule), so 20 candidates on 8 actors are 4 x 2 + 12 x 1 rather than
    10 x 2: equal-size chunks can leave one extra round (bench/dispatch.py measured it).
    An integer: chunks of that many. "guided": chunks that shrink towards the end (`guided`)."""
    if chunk_size == "guided":
        return guided(n, num_actors)
    if chunk_size:
        return [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
    parts = min(n, 2 * num_actors)
    base, extra = divmod(n, parts)
    bounds = np.cumsum([0] + [base + (i < extra) for i in range(parts)])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def guided(n: int, num_actors: int) -> list[Chunk]:
    """Shrinking chunks, in the spirit of guided self-scheduling and factoring (Polychronopoulos
    & Kuck 1987; Hummel, Schonberg & Flynn 1992): rounds of one chunk per actor, each round
    covering half of what is left, never under n / (8 x actors) candidates (nor under 1). The
    first rounds keep round trips few; the small last chunks let the actors finish together,
    and a slow actor can take one it finishes in time (`Generation._in_time`)."""
    floor = max(1, n // (8 * num_actors))
    out, start = [], 0
    while start < n:
        size = max(floor, (n - start) // (2 * num_actors))
        for _ in range(num_actors):
            if start >= n:
                break
            out.append((start, min(n, start + size)))
            start = out[-1][1]
    return out


def example_shards(setting: int | str, num_actors: int, n_chunks: int, n_batches: int) -> int:
    """Example shards per chunk (`cluster.example_shards`), fixed by the configuration and the
    data, never by who is alive: `setting` itself, or for "auto" enough to give the configured
    actors two pieces each (ceil(2 x actors / chunks), so 1 while chunks are plentiful), made
    equal where the batches allow: shards of floor(batches / wanted) batches each. At most one
    shard per training batch."""
    if setting == "auto":
        wanted = -(-2 * num_actors // max(1, n_chunks))
        per = max(1, n_batches // max(1, wanted))
        setting = -(-n_batches // per)
    return max(1, min(int(setting), n_batches))


def pieces(chunk_list: list[Chunk], shards: int) -> list[Piece]:
    """Each chunk on each example shard, chunk by chunk."""
    return [(start, stop, shard) for start, stop in chunk_list for shard in range(shards)]


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

    def __init__(self, pool: ActorPool, layer: int, Z: np.ndarray, queue: list[Piece],
                 deadline: float | None = None, backup: bool = False, shards: int = 1,
                 batches: int = 1) -> None:
        self.pool, self.ray, self.layer, self.Z = pool, pool.ray, layer, Z
        self.deadline, self.backup, self.queue = deadline, backup, list(queue)
        self.todo = set(queue)  # pieces with no answer yet
        self.losses, self.accs = np.full(len(Z), np.nan), np.full(len(Z), np.nan)
        self.shards = shards  # example shards per chunk; 1: chunks scored whole, losses back
        if shards > 1:  # every batch's terms, combined once all are in (common/shards.py)
            self.terms = BatchTerms(0, np.full((batches, len(Z)), np.nan),
                                    np.full((batches, len(Z)), np.nan),
                                    np.zeros(batches, dtype=np.int64))
        self.running: dict[Any, tuple[Any, Piece, float]] = {}  # ref -> (actor, piece, t)
        self.idle = pool.free()
        self.raised: dict[Piece, Any] = {}  # piece -> the actor it raised on, once
        self.lost: Counter[Piece] = Counter()
        self.backups = 0  # copies started

    def run(self) -> EvalResult:
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
        if self.shards > 1:
            self.losses, self.accs = combine_batches(self.terms)
        return EvalResult(self.losses, self.accs)

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
        due = [began + OVERDUE * self._work(c) * typical - now
               for _, c, began in self.running.values() if self._copies(c) == 1]
        return min([1.0, *(d for d in due if d > 0)])

    def _send(self, actor, chunk: Piece) -> None:
        self.idle.remove(actor)
        start, stop, shard = chunk
        if self.shards == 1:
            ref = actor.evaluate.remote(self.layer, self.Z[start:stop])
        else:
            ref = actor.evaluate_shard.remote(self.layer, self.Z[start:stop],
                                              (shard, self.shards))
        self.running[ref] = (actor, chunk, time.monotonic())

    def _work(self, chunk: Piece) -> float:
        """A piece's size in candidates scored on every batch (the unit of the actors' rates)."""
        return (chunk[1] - chunk[0]) / self.shards

    def _what(self, chunk: Piece) -> str:
        shard = f" on example shard {chunk[2] + 1} of {self.shards}" if self.shards > 1 else ""
        return f"candidates {chunk[0]}..{chunk[1] - 1}{shard} of layer {self.layer}"

    def _copies(self, chunk: Piece) -> int:
        return sum(c == chunk for _, c, _ in self.running.values())

    def _backup_target(self) -> tuple[Any, Piece] | None:
        """(idle actor, chunk) for a backup copy: the longest-outstanding chunk running on one
        actor only whose copy is expected to answer first; None if there is none."""
        alone = [(began, chunk, owner) for owner, chunk, began in self.running.values()
                 if self._copies(chunk) == 1]
        for began, chunk, owner in sorted(alone, key=lambda item: item[:2]):
            actor = self._pick(chunk)
            if actor is not None and worth_copying(self._work(chunk), time.monotonic() - began,
                                                   self.pool.rates.get(owner),
                                                   self.pool.rates.get(actor),
                                                   typical_rate(self.pool.rates)):
                return actor, chunk
        return None

    def _pick(self, chunk: Piece):
        """An idle actor for the chunk: one that can finish it in time (`_in_time`), and for a
        retry not the one it raised on, unless no other actor is alive or starting (then
        waiting would be forever)."""
        avoid = self.raised.get(chunk)
        others = [a for a in self.idle if a != avoid]
        fit = [a for a in others if self._in_time(a, chunk)]
        if fit:
            return fit[0]
        if others and avoid is not None:  # a retry goes to another actor, slow or not
            return others[0]
        busy_elsewhere = any(a != avoid for a, _, _ in self.running.values())
        if avoid in self.idle and not busy_elsewhere and not self.pool.starting:
            return avoid
        return None

    def _in_time(self, actor, chunk: Piece) -> bool:
        """Whether `actor` may take `chunk`. Any actor may, except one known to be slow (its
        last rate SLOW times the typical one or more): it takes a chunk only if it is expected
        to finish it by the time the live actors, at their summed speed, would finish all the
        work still to do. So a straggler takes what it can finish and never holds a
        generation's last chunk; left alone it takes everything (docs/design.md §6)."""
        rates, typical = self.pool.rates, typical_rate(self.pool.rates)
        rate = rates.get(actor)
        if typical is None or rate is None or rate < SLOW * typical:
            return True
        speed = sum(1.0 / (rates.get(a) or typical) for a in self.pool.actors)
        return self._work(chunk) * rate <= self._remaining(typical) / speed

    def _remaining(self, typical: float) -> float:
        """The work still to do, in candidates scored on every batch: the queue's, and what
        each running chunk has left by its actor's last rate (`typical` where unmeasured; a
        chunk with copies at work counted once, by its first)."""
        now, seen, rates = time.monotonic(), set(), self.pool.rates
        left = sum(self._work(c) for c in self.queue)
        for a, c, began in self.running.values():
            if c not in seen:
                seen.add(c)
                left += max(0.0, self._work(c) - (now - began) / (rates.get(a) or typical))
        return left

    def _gather(self, ref) -> None:
        actor, chunk, began = self.running.pop(ref)
        try:
            answer = self.ray.get(ref)
        except self.ray.exceptions.RayError as err:
            if raised_by_code(err, self.ray):  # the actor is alive
                self.idle.append(actor)
                self._raised(chunk, actor, err)
            else:  # dead, or unreachable
                self._lost(actor, chunk, "died")
            return
        self.idle.append(actor)
        self.pool.rates[actor] = (time.monotonic() - began) / self._work(chunk)
        if chunk not in self.todo:  # the first answer wins; a later copy's is the same bits
            return
        self.todo.remove(chunk)
        start, stop = chunk[:2]
        if self.shards == 1:  # an EvalResult of the chunk's rows (workers/actor.py)
            self.losses[start:stop] = answer.losses
            if answer.accuracies is not None:
                self.accs[start:stop] = answer.accuracies
            return
        # BatchTerms of the shard's batches (workers/actor.py)
        rows = slice(answer.first, answer.first + len(answer.counts))
        self.terms.loss_sums[rows, start:stop] = answer.loss_sums
        self.terms.hits[rows, start:stop] = answer.hits
        self.terms.counts[rows] = answer.counts

    def _raised(self, chunk: Piece, actor, err) -> None:
        if chunk not in self.todo:  # a losing copy: its answer is not needed
            return
        what = f"scoring {self._what(chunk)}"
        cause = getattr(err, "cause", None)
        if isinstance(cause, DfoloraError) or chunk in self.raised:
            raise task_failure(err, what + (" (raised twice)" if chunk in self.raised else ""))
        self.raised[chunk] = actor
        if not self._copies(chunk):  # else the copy at work is the retry
            self.queue.insert(0, chunk)

    def _lost(self, actor, chunk: Piece, how: str) -> None:
        if chunk in self.todo:
            self.lost[chunk] += 1
            if self.lost[chunk] >= MAX_LOSSES:
                raise DfoloraError(f"{self._what(chunk)}: {self.lost[chunk]} actors died or "
                                   f"passed the deadline on them (last: {how}); they may crash "
                                   f"every actor")
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
