"""The Ray actor pool: actors at one committed state, started, joined, replaced and closed.

`init_ray` connects to a cluster or starts a local one on 127.0.0.1; `ActorPool` holds the live
actors and the ones still starting. An actor starts in the background, brought to the committed
state by replaying every commit (an actor runs its calls in order, so the replay lands before
its first chunk), and joins the live ones when its `info` answers; one that does not start
within `start_timeout` (no resources) or whose constructor raises is killed and left out, with
the reason in `start_failures`. A lost actor (dead, hung, unreachable) is retired and a
replacement launched. Calls on every live actor (`broadcast`, `on_live_actors`) are repeated
after replacing the actors lost meanwhile; a Python exception raised by an actor's code becomes
one clear `DfoloraError`. An actor still scoring a backup copy nobody needs any more is
*draining* (docs/design.md §6): it takes new chunks only once that call has ended, and commits
are queued behind it rather than waited for. How a population is cut and gathered is
dispatch.py's.

Ray is imported inside the functions: the driver imports no Ray until a run asks for actors,
and a local cluster needs RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 set before Ray is first imported.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from common.errors import DfoloraError

START_TIMEOUT_S = 600.0  # loading a model (a hub download) or a new node can take minutes
MAX_LOSSES = 3  # actors lost on one chunk (or one call) before it is blamed and the run stops
LOOPBACK = "127.0.0.1"
# While this is true (Ray's default on Linux) a local node takes the external address whatever
# `_node_ip_address` says, and its GCS, raylet, workers and agents listen on every interface
# (0.0.0.0 / ::). Ray reads it once, when it is first imported; the cluster's own processes
# import Ray afresh and read it from the environment they inherit.
CLUSTER_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_ray(address: str | None, num_cpus: int | None) -> None:
    """Connect to a cluster (`address` or RAY_ADDRESS) or start a local one whose every socket
    listens on 127.0.0.1 only. The local one is refused (a `DfoloraError`, before anything
    starts) when this process imported Ray before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set:
    set that variable in the environment, or import Ray after this call."""
    imported = sys.modules.get("ray")
    if imported is not None and imported.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        import ray

        ray.init(address=address)
        return
    if imported is not None and os.environ.get(CLUSTER_VAR) != "0":
        raise DfoloraError(f"a local Ray cluster started now would listen on every network "
                           f"interface: Ray was imported before {CLUSTER_VAR}=0 was set (Ray "
                           f"reads it on import). Set {CLUSTER_VAR}=0 in the environment, or "
                           f"give cluster.address")
    os.environ[CLUSTER_VAR] = "0"
    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address=LOOPBACK,
             log_to_driver=False)
    node = ray.util.get_node_ip_address()
    if node != LOOPBACK:  # the variable was changed after Ray's import: do not run exposed
        ray.shutdown()
        raise DfoloraError(f"the local Ray node took the address {node}, not {LOOPBACK}; set "
                           f"{CLUSTER_VAR}=0 in the environment before starting")


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


class ActorPool:
    """Actors with EvalActor's remote methods (workers/actor.py), all at the committed state.

    `spawn(stats)` creates one actor (not yet started); `resources` (num_cpus, num_gpus) only
    names what an actor asks for in the message of one that cannot be scheduled.
    """

    def __init__(self, spawn: Callable[[dict | None], Any], *, resources: dict,
                 start_timeout: float = START_TIMEOUT_S) -> None:
        import ray

        self.ray, self.spawn, self.resources = ray, spawn, resources
        self.start_timeout = start_timeout
        self.actors: list = []  # live, in the order they joined
        self.starting: dict[Any, tuple[Any, list, float]] = {}  # info ref -> (actor, commits, t)
        self.committed: dict[int, np.ndarray] = {}
        self.draining: dict[Any, tuple[Any, float]] = {}  # actor -> (its last call, since)
        self.rates: dict[Any, float] = {}  # actor -> its last chunk's seconds per candidate
        self.stats: dict | None = None  # calibration statistics every replacement receives
        self.replacements = 0  # replacement actors that started
        self.start_failures: list[str] = []  # why each actor that could not start failed

    def start(self, count: int, stats: dict | None) -> dict:
        """Start `count` actors: the first alone (it calibrates, unless `stats` are given),
        then the others with its statistics. The first actor's `info()`; the others join if
        they can. The initial actors are not counted as replacements."""
        self.launch(stats)
        if not self.await_starts():
            raise DfoloraError(f"the first Ray actor could not start: {self.start_failures[-1]}")
        info = self.ray.get(self.actors[0].info.remote())
        self.stats = info["stats"]
        for _ in range(count - 1):
            self.launch(self.stats)
        self.await_starts()
        self.replacements = 0
        return info

    # -- actors starting, joining and leaving ---------------------------------------------------

    def launch(self, stats: dict | None) -> None:
        """Start an actor in the background, at the committed state."""
        actor = self.spawn(stats)
        commits = [actor.commit.remote(layer, z) for layer, z in self.committed.items()]
        self.starting[actor.info.remote()] = (actor, commits, time.monotonic())

    def join(self, ref) -> list:
        """The started actor of `ref` (a key of `starting`, ready) joins the live ones:
        [actor]; or, if it failed while starting, it is left out: []."""
        actor, commits, _ = self.starting.pop(ref)
        try:
            self.ray.get([*commits, ref])
        except self.ray.exceptions.RayError as err:
            self.drop(actor, f"it failed while starting: {last_line(err)}")
            return []
        self.actors.append(actor)
        self.replacements += 1
        return [actor]

    def expire_starts(self) -> None:
        """Leave out the actors starting for longer than `start_timeout`."""
        for ref, (actor, _, began) in list(self.starting.items()):
            if time.monotonic() - began > self.start_timeout:
                self.starting.pop(ref)
                self.drop(actor, f"it did not start within {self.start_timeout:g} s (are "
                                 f"{self.resources} free on the cluster?)")

    def drop(self, actor, why: str) -> None:
        """Kill an actor that could not start and record why."""
        self.start_failures.append(why)
        self.ray.kill(actor, no_restart=True)

    def await_starts(self) -> list:
        """Wait (start_timeout at most) for the actors being started; those that joined."""
        joined = []
        while self.starting:
            done, _ = self.ray.wait(list(self.starting), num_returns=1, timeout=1.0)
            for ref in done:
                joined += self.join(ref)
            self.expire_starts()
        return joined

    def lose(self, actor) -> None:
        """Retire a dead, hung or unreachable actor and launch its replacement."""
        if actor in self.actors:
            self.actors.remove(actor)
        self.draining.pop(actor, None)
        self.rates.pop(actor, None)
        self.ray.kill(actor, no_restart=True)
        self.launch(self.stats)

    def replace_lost(self) -> None:
        """Find the actors that no longer answer and replace them; wait for the replacements."""
        pings = {a.pid.remote(): a for a in self.actors}
        done, _ = self.ray.wait(list(pings), num_returns=len(pings), timeout=self.start_timeout)
        for ref, actor in pings.items():
            try:
                if ref not in done:
                    raise self.ray.exceptions.GetTimeoutError(ref)
                self.ray.get(ref)
            except self.ray.exceptions.RayError:
                self.lose(actor)
        self.await_starts()

    # -- draining actors: busy with a call whose answer is not needed -------------------------

    def free(self) -> list:
        """The live actors that are not draining."""
        return [a for a in self.actors if a not in self.draining]

    def drain(self, actor, ref, began: float) -> None:
        """`actor` is busy with `ref` (since `began`), whose answer nobody needs."""
        self.draining[actor] = (ref, began)

    def draining_refs(self) -> list:
        return [ref for ref, _ in self.draining.values()]

    def drained(self, ref) -> list:
        """The draining actor whose call `ref` has ended: [actor], free again. A Python
        exception there changes nothing (the actor is alive, its answer unused); an actor that
        died is replaced: []."""
        actor = next(a for a, (r, _) in self.draining.items() if r == ref)
        self.draining.pop(actor)
        try:
            self.ray.get(ref)
        except self.ray.exceptions.RayError as err:
            if not raised_by_code(err, self.ray):
                self.lose(actor)
                return []
        return [actor]

    def settle(self) -> None:
        """Wait until no actor is draining."""
        for ref in self.draining_refs():
            self.drained(ref)

    def expire_draining(self, deadline: float) -> None:
        """Replace the actors draining for longer than `deadline` seconds (hung)."""
        for actor, (_, began) in list(self.draining.items()):
            if time.monotonic() - began > deadline:
                self.lose(actor)

    # -- calls on every live actor --------------------------------------------------------------

    def commit(self, layer: int, z: np.ndarray) -> None:
        """Install z as layer's vector on every actor, the starting and draining ones too
        (after their replay or their current call: in order; only the free ones are waited
        for). A vector the actors reject is not committed (as EvalWorker.commit)."""
        z = np.array(z, dtype=np.float64)
        previous = self.committed.get(layer)
        self.committed[layer] = z
        for actor, commits, _ in self.starting.values():
            commits.append(actor.commit.remote(layer, z))
        if self.actors and not self.free():
            self.settle()  # someone must answer, so that a rejected vector is noticed
        for actor, (_, began) in list(self.draining.items()):  # queued behind its call
            self.draining[actor] = (actor.commit.remote(layer, z), began)

        def call() -> list:
            return self.ray.get([a.commit.remote(layer, z) for a in self.free()])

        try:
            self.on_live_actors(call, "commit")
        except DfoloraError:
            if previous is None:
                self.committed.pop(layer)
            else:
                self.committed[layer] = previous
            raise

    def broadcast(self, method: str, *args) -> list:
        """`method(*args)` on every live actor; their results in the actors' order."""
        def call() -> list:
            return self.ray.get([getattr(a, method).remote(*args) for a in self.actors])

        return self.on_live_actors(call, method)

    def on_live_actors(self, call: Callable[[], Any], what: str) -> Any:
        """call(), repeated after replacing the actors lost meanwhile (every call made through
        here is idempotent); a Python exception on an actor becomes one clear DfoloraError."""
        for _ in range(MAX_LOSSES):
            if not self.actors and not self.await_starts():
                break
            try:
                return call()
            except self.ray.exceptions.RayError as err:
                if raised_by_code(err, self.ray):
                    raise task_failure(err, what) from err
                self.replace_lost()
        raise DfoloraError(f"no Ray actor is left to run {what}; resume from the last "
                           f"checkpoint once actors can start again")

    def close(self) -> None:
        for actor in self.actors + [actor for actor, _, _ in self.starting.values()]:
            self.ray.kill(actor)
        self.actors, self.starting, self.draining, self.rates = [], {}, {}, {}


def raised_by_code(err: Exception, ray: Any) -> bool:
    """A Python exception raised by the actor's code, rather than a Ray failure: a dead actor's
    result passed as an argument arrives as RayTaskError(ActorDiedError), a RayTaskError too."""
    exceptions = ray.exceptions
    return (isinstance(err, exceptions.RayTaskError)
            and not isinstance(getattr(err, "cause", None), exceptions.RayError))


def task_failure(err: Exception, what: str) -> DfoloraError:
    """One line for a Python exception raised on an actor; the worker's own DfoloraError (the
    user's input) keeps its class and message."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, DfoloraError):
        return cause
    name = type(cause).__name__ if cause is not None else type(err).__name__
    return DfoloraError(f"{what} failed on a Ray actor: {name}: {last_line(cause or err)}")


def last_line(err: BaseException) -> str:
    """The most telling line of a (possibly remote, multi-line) error: the exception's own."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
