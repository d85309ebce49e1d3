"""Faults injected into Ray actors on a real local cluster: runs end identical or stop clearly.

`FaultyShell` is the real actor (workers/actor.py) misbehaving on command: every `evaluate`
call takes the next number of a counter shared by all actors of a test (a locked file), and
`faults` maps call numbers to a fault, `every` applies one to all calls. With 2 actors and a
population of 8 (4 chunks of 2) a run is 1 + 6 x 4 calls plus one per re-dispatch, so a call
number says which generation it falls in. The reference is the same run on undisturbed actors:
losses are compared bit for bit, which holds for the same chunks (an in-process run stacks the
whole population in one pass and differs in the last bits). Dev/test losses are sums over
shards, one per live actor, so they are compared to rounding; accuracies exactly.
"""

import fcntl
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import tiny
from harness import run

from common.config import RunConfig
from common.errors import DfoloraError
from common.messages import EvalResult

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.integration

from workers.actor import ActorShell  # noqa: E402  (imports ray)

CFG = RunConfig.from_dict({
    "budget": 48, "optimizer": {"popsize": 8},
    "task": {"template": "{text} it was", "label_words": ["bad", "great"], "k": 4},
    "eval": {"train_batch_size": 4},
    "schedule": {"layers": [2, 1], "optimizers": ["cma", "fwa"]},
})
TIMING = ("seconds", "candidates_per_s", "candidates_per_s_per_actor", "actors", "wall_seconds")


def next_call(folder: Path, note: str) -> int:
    """The run-wide number of this evaluate call; logs `number note pid` under the lock."""
    with open(folder / "calls", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        number = int(f.read() or 0) + 1
        f.seek(0)
        f.truncate()
        f.write(str(number))
        with open(folder / "log", "a") as log:
            log.write(f"{number} {note} {os.getpid()}\n")
    return number


class FaultyShell(ActorShell):
    """faults: {call number: "sigkill" | "hang" | "raise"}; every: a fault for every call. A
    file `refuse-start` in `folder` makes the constructor raise (a replacement that cannot
    start)."""

    def __init__(self, cfg, stats=None, threads=None, loaded=None, splits=None, *,
                 folder: str, faults: dict | None = None, every: str | None = None) -> None:
        if (Path(folder) / "refuse-start").exists():
            raise RuntimeError("injected: this actor refuses to start")
        super().__init__(cfg, stats, threads, loaded, splits)
        self.folder, self.faults, self.every = Path(folder), faults or {}, every

    def evaluate(self, layer, Z):
        result = super().evaluate(layer, Z)  # the worker's own checks come first
        rows = zlib.crc32(np.ascontiguousarray(Z).tobytes())  # which chunk: its rows
        call = next_call(self.folder, f"rows={rows:08x}")
        fault = self.faults.get(call, self.every)
        if fault == "sigkill":  # the scoring is done, and lost with the process
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault == "hang":
            time.sleep(3600)
        elif fault == "raise":
            raise RuntimeError(f"injected fault in call {call}")
        return result


class LightShell:
    """EvalActor's remote methods without a model (loss: each row's squared norm)."""

    def __init__(self, cfg, stats=None, threads=None) -> None:
        self.stats = stats or {"light": True}

    def info(self) -> dict:
        return {"n_layers": 3, "dim": 4, "stats": self.stats}

    def commit(self, layer, z) -> None:
        pass

    def evaluate(self, layer, Z):
        return EvalResult(np.einsum("ij,ij->i", Z, Z), np.zeros(len(Z)))

    def pid(self) -> int:
        return os.getpid()


FaultyActor, LightActor = ray.remote(FaultyShell), ray.remote(LightShell)
# Ray workers cannot import this test file: ship its classes by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@ray.remote(num_cpus=1)
class Blocker:
    """Holds one CPU of the cluster, so that no replacement actor can be scheduled."""

    def ready(self) -> bool:
        return True


@pytest.fixture(scope="module")
def cluster():
    from orchestrator.evaluation.ray_eval import init_ray

    init_ray(None, 2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory):
    """The undisturbed run on the same actors, and its calibration statistics."""
    folder = tmp_path_factory.mktemp("reference")
    remote = make_faulty(folder, None)
    try:
        return run(CFG, folder / "run", evaluator=remote), remote.stats
    finally:
        remote.close()


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "faults"
    path.mkdir()
    return path


def make_faulty(folder, stats, **kw):
    from orchestrator.evaluation.ray_eval import RayEvaluator

    fault_args = {k: kw.pop(k) for k in ("faults", "every") if k in kw}
    # call numbers count chunks: backup copies would add calls (test_backup_chunks.py)
    kw.setdefault("backup_chunks", False)
    return RayEvaluator(CFG, stats=stats, num_actors=2, actor_cls=FaultyActor,
                        actor_args={"loaded": tiny.model("gpt2"), "splits": tiny.splits(),
                                    "folder": str(folder), **fault_args}, **kw)


def log(folder) -> list[tuple[int, str, int]]:
    lines = (folder / "log").read_text().split() if (folder / "log").exists() else []
    return [(int(n), note, int(pid)) for n, note, pid in zip(*[iter(lines)] * 3, strict=True)]


def assert_same_run(result, expected):
    assert result.finished and result.evaluations == expected.evaluations
    assert result.generations == expected.generations
    trim = [[{k: v for k, v in m.items() if k not in TIMING} for m in r.metrics]
            for r in (result, expected)]
    assert trim[0] == trim[1]  # every loss of every generation
    for layer, z in expected.vectors.items():
        np.testing.assert_array_equal(result.vectors[layer], z)
    for layer, z in expected.best_vectors.items():
        np.testing.assert_array_equal(result.best_vectors[layer], z)
    for split in ("train", "dev", "test"):
        assert same_scores(result.final[split], expected.final[split])


def same_scores(a: dict, b: dict) -> bool:
    return a["accuracy"] == b["accuracy"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)


# -- (a) SIGKILL mid-generation, three times in one run ---------------------------------------

def test_three_sigkills_in_one_run_change_nothing(cluster, reference, folder, tmp_path):
    expected, stats = reference
    # call 1 scores the zero adapter; generation g is calls 4g-2 .. 4g+1, +1 per lost chunk
    remote = make_faulty(folder, stats, faults={3: "sigkill", 8: "sigkill", 13: "sigkill"})
    try:
        result = run(CFG, tmp_path / "run", evaluator=remote)
        assert remote.replacements == 3 and len(remote.actors) == 2
    finally:
        remote.close()
    assert_same_run(result, expected)
    assert len({pid for _, _, pid in log(folder)}) >= 3  # replacements scored chunks too


# -- (b) an actor that hangs: the deadline re-dispatches its chunk ----------------------------

def test_hung_actor_passes_the_deadline(cluster, reference, folder, tmp_path):
    expected, stats = reference
    remote = make_faulty(folder, stats, faults={6: "hang"}, deadline_s=8)
    try:
        began = time.monotonic()
        result = run(CFG, tmp_path / "run", evaluator=remote)
        assert time.monotonic() - began < 300
        assert remote.replacements == 1 and len(remote.actors) == 2
    finally:
        remote.close()
    assert_same_run(result, expected)


# -- (c) a Python exception while scoring: one retry elsewhere, then a clear error ------------

def test_one_exception_is_retried_on_another_actor(cluster, reference, folder, tmp_path):
    expected, stats = reference
    remote = make_faulty(folder, stats, faults={4: "raise"})
    try:
        result = run(CFG, tmp_path / "run", evaluator=remote)
        assert remote.replacements == 0 and len(remote.actors) == 2  # nobody was replaced
        entries = log(folder)
        (chunk, pid), = [(note, pid) for n, note, pid in entries if n == 4]
        retry = [p for n, note, p in entries if n > 4 and note == chunk][0]
        assert retry != pid
        # actors lost between calls (one combines the others' shards, whose loss reaches it as
        # RayTaskError(ActorDiedError)): scoring a split replaces them and goes on
        for actor in remote.actors:
            ray.kill(actor, no_restart=True)
        assert same_scores(remote.score("test"), expected.final["test"])
        assert remote.replacements == 2 and len(remote.actors) == 2
    finally:
        remote.close()
    assert_same_run(result, expected)


def test_an_exception_on_every_actor_stops_with_one_clear_error(cluster, reference, folder):
    _, stats = reference
    remote = make_faulty(folder, stats, every="raise")
    try:
        dim = remote.info.dim
        with pytest.raises(DfoloraError) as err:  # the worker's own check: at once, no retry
            remote.evaluate(1, np.zeros((2, dim + 4)))
        assert f"{dim + 4})" in str(err.value) and "\n" not in str(err.value)
        assert not (folder / "log").exists()  # raised before any fault, and not retried
        z = np.random.default_rng(0).standard_normal((8, dim))
        with pytest.raises(DfoloraError) as err:
            remote.evaluate(1, z)
        message = str(err.value)
        assert "raised twice" in message and "RuntimeError: injected fault" in message
        assert "\n" not in message
        assert remote.replacements == 0 and len(remote.actors) == 2
        failed = {}
        for _, note, pid in log(folder):
            failed.setdefault(note, []).append(pid)
        assert any(len(set(pids)) == 2 for pids in failed.values())  # retried elsewhere
    finally:
        remote.close()


# -- (d) replacements that cannot start -------------------------------------------------------

def test_replacements_that_fail_then_resume(cluster, reference, folder, tmp_path):
    expected, stats = reference
    remote = make_faulty(folder, stats, faults={3: "sigkill", 8: "sigkill"})
    (folder / "refuse-start").touch()
    try:
        with pytest.raises(DfoloraError, match="no Ray actor is left") as err:
            run(CFG, tmp_path / "run", evaluator=remote)
        assert "\n" not in str(err.value)
        assert remote.replacements == 0 and remote.actors == []
        assert len(remote.start_failures) == 2
        assert "refuses to start" in remote.start_failures[0]
        # generation 1 (calls 2-6) finished on the last actor and was checkpointed; that
        # actor's death in call 8 left none
        assert max(n for n, _, _ in log(folder)) == 8
        with pytest.raises(DfoloraError) as err:  # nothing starts: a clear error at once
            make_faulty(folder, stats)
        message = str(err.value)
        assert "first Ray actor could not start" in message and "refuses to start" in message
        assert "\n" not in message
    finally:
        remote.close()
    healthy = make_faulty(tmp_path, stats)
    try:
        resumed = run(None, tmp_path / "run", resume=True, evaluator=healthy)
    finally:
        healthy.close()
    assert_same_run(resumed, expected)


def test_replacement_without_resources(cluster):
    from orchestrator.evaluation.ray_eval import RayEvaluator

    ev = RayEvaluator(CFG, num_actors=2, cpus_per_actor=1, chunk_size=1, actor_cls=LightActor,
                      start_timeout_s=120)
    blockers = []
    try:
        ev.start_timeout = 3
        z = np.random.default_rng(0).standard_normal((6, ev.info.dim))
        expected = np.einsum("ij,ij->i", z, z)
        for survivors in (1, 0):
            ray.kill(ev.actors[-1], no_restart=True)
            blockers.append(Blocker.remote())  # takes the dead actor's CPU
            ray.get(blockers[-1].ready.remote(), timeout=120)
            if survivors:
                np.testing.assert_array_equal(ev.evaluate(0, z).losses, expected)
            else:
                with pytest.raises(DfoloraError, match="no Ray actor is left"):
                    ev.evaluate(0, z)
            assert len(ev.actors) == survivors and ev.replacements == 0
            assert "did not start within 3 s" in ev.start_failures[-1]
    finally:
        ev.close()
        for blocker in blockers:
            ray.kill(blocker)


def test_first_actor_that_cannot_be_scheduled(cluster):
    from orchestrator.evaluation.ray_eval import RayEvaluator

    began = time.monotonic()
    with pytest.raises(DfoloraError, match="did not start within 2 s") as err:
        RayEvaluator(CFG, num_actors=1, gpus_per_actor=1, actor_cls=LightActor,
                     start_timeout_s=2)
    assert "num_gpus" in str(err.value) and time.monotonic() - began < 60


# -- a local cluster listens on the loopback interface only -----------------------------------

def test_local_cluster_listens_on_loopback_only(cluster):
    psutil = pytest.importorskip("psutil")
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    actor = LightActor.remote(None)
    ray.get(actor.pid.remote())  # a worker process too
    try:
        me = psutil.Process()
        listening = {}
        for proc in [me, *me.children(recursive=True)]:  # this session's Ray processes
            try:
                sockets = proc.net_connections(kind="inet")
            except psutil.NoSuchProcess:
                continue
            for s in sockets:
                if s.status == psutil.CONN_LISTEN:
                    listening[(proc.name(), s.laddr.port)] = s.laddr.ip
        assert len(listening) >= 5  # GCS, raylet, driver, agents, worker
        loopback = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
        assert {k: ip for k, ip in listening.items() if ip not in loopback} == {}
    finally:
        ray.kill(actor)


def fresh_python(code: str) -> subprocess.CompletedProcess:
    """`python -c code` in the repository without the variable conftest.py sets."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    return subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2], env=env,
                          capture_output=True, text=True, timeout=300)


def test_init_ray_itself_keeps_a_local_cluster_on_loopback():
    """With nothing set beforehand, init_ray sets the variable before Ray's first import (a
    node on the external address otherwise); Ray imported earlier is refused before a cluster
    starts, where a public API cannot undo what Ray read on import."""
    proc = fresh_python("from orchestrator.evaluation.pool import init_ray; init_ray(None, 1); "
                        "import ray; print(ray.util.get_node_ip_address()); ray.shutdown()")
    assert proc.returncode == 0 and proc.stdout.split()[-1] == "127.0.0.1", proc.stderr[-2000:]
    proc = fresh_python("import ray; from orchestrator.evaluation.pool import init_ray; "
                        "init_ray(None, 1)")
    assert proc.returncode == 1 and "Ray was imported before" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr
