"""The Ray evaluator: one population scored across many actors (the only Ray file here).

A population is cut into fixed chunks by index (`chunk_size`, never dependent on which actors
are alive), each idle actor takes the next chunk, results come back in any order and are put
in place by index (docs/design.md §6). Chunks smaller than population / actors let a fast actor
take more of them. A chunk is always scored whole by one actor, so its losses do not depend on
which actor scored it, and a fault only costs a re-dispatch:

* an actor that dies, or passes `deadline_s` on a chunk (it is killed), loses its chunk to the
  queue; a replacement starts in the background, brought to the committed state by replaying
  every commit, and joins when ready, while the generation goes on with the live actors. The
  generation returns once its replacements have joined or failed (start_timeout_s at most), so
  each one starts at full strength. A chunk that loses MAX_LOSSES actors stops the
  run (it kills whoever scores it);
* a Python exception while scoring leaves the actor alive: the chunk is retried once, on
  another actor where there is one, and a second failure stops the run with one clear
  `DfoloraError` (a deterministic bug would otherwise replace actors forever). The worker's
  own `DfoloraError` (bad input) is raised at once;
* an actor that does not start within `start_timeout_s` (no resources) or whose constructor
  raises is killed and left out; with no actor left the generation fails with a clear message
  and the driver's last checkpoint stays resumable.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from common.config import RunConfig
from common.errors import DfoloraError

from .interface import CandidateId, Evaluation, Evaluator

START_TIMEOUT_S = 600.0  # loading a model (a hub download) or a new node can take minutes
MAX_LOSSES = 3  # actors lost on one chunk (or one call) before it is blamed and the run stops
Chunk = tuple[int, int]


def init_ray(address: str | None, num_cpus: int | None) -> None:
    """Connect to a cluster (`address` or RAY_ADDRESS) or start a local one bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"])
        return
    _loopback_only()
    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)


def _loopback_only() -> None:
    """Make a local cluster listen on 127.0.0.1 only. While Ray's ENABLE_RAY_CLUSTER is true the
    node address is the external interface whatever `_node_ip_address` says, and the servers of
    the GCS, raylet, workers and agents listen on every interface (0.0.0.0 / ::). Ray reads
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when it is first imported, which was before this
    call wherever `import ray` came first (every test module): so the constant is set as well.
    The variable still matters: the cluster's own processes import Ray afresh."""
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def auto_actors(resources: dict, cpus_per_actor: float,
                gpus_per_actor: float) -> tuple[int, float, float]:
    """(actors, cpus, gpus per actor) for `cluster.num_actors: -1`: one actor per GPU of the
    cluster when it has GPUs, else one per pair of CPUs (at least one)."""
    gpus = int(resources.get("GPU", 0))
    if gpus:
        per = gpus_per_actor or 1.0
        return max(1, int(gpus / per)), cpus_per_actor, per
    cpus = int(resources.get("CPU", 1))
    return max(1, cpus // 2), (2.0 if cpus >= 2 else 1.0), 0.0


class RayEvaluator(Evaluator):
    def __init__(self, cfg: RunConfig, *, stats: dict | None = None, num_actors: int = 2,
                 cpus_per_actor: float = 1, gpus_per_actor: float = 0,
                 chunk_size: int | None = None, deadline_s: float | None = None,
                 start_timeout_s: float = START_TIMEOUT_S, address: str | None = None,
                 actor_args: dict | None = None, actor_cls: Any = None) -> None:
        import ray

        # actor_cls: a Ray actor class with EvalActor's remote methods (default EvalActor); the
        # dispatch benchmark passes one that simulates scoring (bench/dispatch.py)
        self._actor_cls = actor_cls
        if num_actors < 0:  # auto: one actor per GPU, else one per pair of CPUs
            init_ray(address, None)
            num_actors, cpus_per_actor, gpus_per_actor = auto_actors(
                ray.cluster_resources(), cpus_per_actor, gpus_per_actor)
        else:
            init_ray(address, None if address else max(1, math.ceil(num_actors * cpus_per_actor)))
        self._ray, self.cfg, self.deadline = ray, cfg, deadline_s
        self.start_timeout = start_timeout_s
        self.chunk_size, self.num_actors = chunk_size, num_actors
        self._options = {"num_cpus": cpus_per_actor, "num_gpus": gpus_per_actor}
        self._args = {"threads": max(1, int(cpus_per_actor)), **(actor_args or {})}
        self.committed: dict[int, np.ndarray] = {}
        self.actors: list = []
        self._starting: dict[Any, tuple[Any, list, float]] = {}  # info ref -> (actor, commits, t)
        self.replacements = 0  # replacement actors that started
        self.start_failures: list[str] = []  # why each actor that could not start failed
        self._launch(stats)
        if not self._await_starts():
            raise DfoloraError(f"the first Ray actor could not start: {self.start_failures[-1]}")
        info = ray.get(self.actors[0].info.remote())
        self.stats, self._n_layers, self._dim = info["stats"], info["n_layers"], info["dim"]
        for _ in range(num_actors - 1):
            self._launch(self.stats)
        self._await_starts()  # the first actor alone is enough; the others join if they can
        self.replacements = 0  # the initial actors are not replacements

    def _spawn(self, stats: dict | None):
        cls = self._actor_cls
        if cls is None:
            from workers.actor import EvalActor as cls  # torch is imported only when needed

        cfg = self.cfg.to_dict()
        return cls.options(**self._options).remote(cfg, stats, **self._args)

    # -- actors starting, joining and leaving ---------------------------------------------------

    def _launch(self, stats: dict | None) -> None:
        """Start an actor in the background, at the committed state (an actor runs its calls
        in order, so the replayed commits land before its first chunk)."""
        actor = self._spawn(stats)
        commits = [actor.commit.remote(layer, z) for layer, z in self.committed.items()]
        self._starting[actor.info.remote()] = (actor, commits, time.monotonic())

    def _joined(self, ref) -> list:
        """A started actor joins the live ones ([actor]), or, if it failed, is left out ([])."""
        actor, commits, _ = self._starting.pop(ref)
        try:
            self._ray.get([*commits, ref])
        except self._ray.exceptions.RayError as err:
            self._drop(actor, f"it failed while starting: {_last_line(err)}")
            return []
        self.actors.append(actor)
        self.replacements += 1
        return [actor]

    def _expire_starts(self) -> None:
        for ref, (actor, _, began) in list(self._starting.items()):
            if time.monotonic() - began > self.start_timeout:
                self._starting.pop(ref)
                self._drop(actor, f"it did not start within {self.start_timeout:g} s (are "
                                  f"{self._options} free on the cluster?)")

    def _drop(self, actor, why: str) -> None:
        self.start_failures.append(why)
        self._ray.kill(actor, no_restart=True)

    def _await_starts(self) -> list:
        """Wait (start_timeout_s at most) for the actors being started; those that joined."""
        joined = []
        while self._starting:
            done, _ = self._ray.wait(list(self._starting), num_returns=1, timeout=1.0)
            for ref in done:
                joined += self._joined(ref)
            self._expire_starts()
        return joined

    def _lose(self, actor) -> None:
        """Retire a dead, hung or unreachable actor and start its replacement."""
        if actor in self.actors:
            self.actors.remove(actor)
        self._ray.kill(actor, no_restart=True)
        self._launch(self.stats)

    @property
    def n_layers(self) -> int:
        return self._n_layers

    @property
    def dim(self) -> int:
        return self._dim

    def setup(self) -> dict:
        return {"calibration": self.stats}

    # -- scoring a population -------------------------------------------------------------------

    def _chunks(self, n: int) -> list[Chunk]:
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
        return _Generation(self, layer, Z).run()

    # -- everything else: on the live actors ----------------------------------------------------

    def commit(self, layer: int, z: np.ndarray) -> None:
        z = np.array(z, dtype=np.float64)
        previous = self.committed.get(layer)
        self.committed[layer] = z
        for actor, commits, _ in self._starting.values():  # after the replay: in order
            commits.append(actor.commit.remote(layer, z))
        try:
            self._broadcast("commit", layer, z)
        except DfoloraError:
            if previous is None:  # a rejected vector is not committed (as EvalWorker.commit)
                self.committed.pop(layer)
            else:
                self.committed[layer] = previous
            raise

    def _broadcast(self, method: str, *args) -> list:
        def call() -> list:
            return self._ray.get([getattr(a, method).remote(*args) for a in self.actors])

        return self._on_live_actors(call, method)

    def _on_live_actors(self, call: Callable[[], Any], what: str) -> Any:
        """call(), repeated after replacing the actors lost meanwhile (every call here is
        idempotent); a Python exception on an actor becomes one clear DfoloraError."""
        for _ in range(MAX_LOSSES):
            if not self.actors and not self._await_starts():
                break
            try:
                return call()
            except self._ray.exceptions.RayError as err:
                if _raised_by_code(err, self._ray):
                    raise _task_failure(err, what) from err
                self._replace_lost()
        raise DfoloraError(f"no Ray actor is left to run {what}; resume from the last "
                           f"checkpoint once actors can start again")

    def _replace_lost(self) -> None:
        """Find the actors that no longer answer and replace them; wait for the replacements."""
        pings = {a.pid.remote(): a for a in self.actors}
        done, _ = self._ray.wait(list(pings), num_returns=len(pings), timeout=self.start_timeout)
        for ref, actor in pings.items():
            try:
                if ref not in done:
                    raise self._ray.exceptions.GetTimeoutError(ref)
                self._ray.get(ref)
            except self._ray.exceptions.RayError:
                self._lose(actor)
        self._await_starts()

    def score(self, split: str) -> dict:
        """The split divided among the actors; metrics combined on an actor (no torch here)."""
        def call() -> dict:
            n = len(self.actors)
            parts = [a.predict.remote(split, (i, n)) for i, a in enumerate(self.actors)]
            return self._ray.get(self.actors[0].combine.remote(*parts))

        return self._on_live_actors(call, f"scoring {split}")

    def delta_norms(self) -> list[dict]:
        return self._on_live_actors(
            lambda: self._ray.get(self.actors[0].delta_norms.remote()), "delta_norms")

    @property
    def parallelism(self) -> int:
        return len(self.actors)

    def adapter(self) -> tuple[dict, dict]:
        return self._on_live_actors(
            lambda: self._ray.get(self.actors[0].adapter.remote()), "adapter export")

    def peak_memory_mb(self) -> float | None:
        """The largest peak over the live actors (one model replica each)."""
        peaks = self._broadcast("peak_memory_mb")
        return max(peaks) if peaks else None

    def close(self) -> None:
        for actor in self.actors + [actor for actor, _, _ in self._starting.values()]:
            self._ray.kill(actor)
        self.actors, self._starting = [], {}


class _Generation:
    """One population's chunks through the actors: dispatch, gather, faults (see the top)."""

    def __init__(self, ev: RayEvaluator, layer: int, Z: np.ndarray) -> None:
        self.ev, self.ray, self.layer, self.Z = ev, ev._ray, layer, Z
        self.queue = ev._chunks(len(Z))
        self.losses, self.accs = np.full(len(Z), np.nan), np.full(len(Z), np.nan)
        self.running: dict[Any, tuple[Any, Chunk, float]] = {}  # ref -> (actor, chunk, t)
        self.idle = list(ev.actors)
        self.raised: dict[Chunk, Any] = {}  # chunk -> the actor it raised on, once
        self.lost: Counter[Chunk] = Counter()

    def run(self) -> Evaluation:
        while self.queue or self.running:
            self._dispatch()
            if not self.running and not self.ev._starting:
                raise DfoloraError("no Ray actor is left to score candidates; the last "
                                   "checkpoint can be resumed once actors can start again")
            waiting = list(self.running) + list(self.ev._starting)
            done, _ = self.ray.wait(waiting, num_returns=1, timeout=1.0)
            for ref in done:
                if ref in self.ev._starting:
                    self.idle += self.ev._joined(ref)
                else:
                    self._gather(ref)
            self._expire()
        self.ev._await_starts()
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
        if avoid in self.idle and not busy_elsewhere and not self.ev._starting:
            return avoid
        return None

    def _gather(self, ref) -> None:
        actor, chunk, _ = self.running.pop(ref)
        try:
            _, chunk_losses, chunk_accs = self.ray.get(ref)
        except self.ray.exceptions.RayError as err:
            if _raised_by_code(err, self.ray):  # the actor is alive
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
            raise _task_failure(err, what + (" (raised twice)" if chunk in self.raised else ""))
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
        self.ev._lose(actor)

    def _expire(self) -> None:
        self.ev._expire_starts()
        if not self.ev.deadline:
            return
        for ref, (actor, chunk, began) in list(self.running.items()):
            if time.monotonic() - began > self.ev.deadline:
                self.running.pop(ref)
                self._lost(actor, chunk, f"no answer in {self.ev.deadline:g} s")


def _raised_by_code(err: Exception, ray: Any) -> bool:
    """A Python exception raised by the actor's code, rather than a Ray failure: a dead actor's
    result passed as an argument arrives as RayTaskError(ActorDiedError), a RayTaskError too."""
    exceptions = ray.exceptions
    return (isinstance(err, exceptions.RayTaskError)
            and not isinstance(getattr(err, "cause", None), exceptions.RayError))


def _task_failure(err: Exception, what: str) -> DfoloraError:
    """One line for a Python exception raised on an actor; the worker's own DfoloraError (the
    user's input) keeps its class and message."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, DfoloraError):
        return cause
    name = type(cause).__name__ if cause is not None else type(err).__name__
    return DfoloraError(f"{what} failed on a Ray actor: {name}: {_last_line(cause or err)}")


def _last_line(err: BaseException) -> str:
    """The most telling line of a (possibly remote, multi-line) error: the exception's own."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
