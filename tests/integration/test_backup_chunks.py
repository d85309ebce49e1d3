"""Backup chunks on a real local Ray cluster (orchestrator/evaluation/dispatch.py).

Light actors without a model: a candidate's loss is its squared norm plus the squared norms of
the committed vectors of the other layers (so a stale state would show), scoring sleeps `cost`
per candidate times the actor's slowdown, and the accuracy field carries the scoring actor's
pid (who scored what). The first actor started takes the first chunk, so slowing it makes the
straggler hold chunk 0.
"""

import os
import signal
import sys
import time

import numpy as np
import pytest

from common.config import RunConfig
from common.messages import EvalResult

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.integration

COST = 0.01  # seconds per candidate
SLOW = 100.0  # the straggler's slowdown: 1 s per candidate, 2 s per chunk


class SlowShell:
    def __init__(self, cfg, stats=None, threads=None) -> None:
        self.stats = stats or {"light": True}
        self.factor, self.fatal, self.committed = 1.0, None, {}

    def info(self) -> dict:
        return {"n_layers": 3, "dim": 4, "stats": self.stats}

    def slow(self, factor: float) -> None:
        self.factor = factor

    def arm(self, first_row) -> None:
        """Die (SIGKILL) when asked to score the chunk whose first row is `first_row`."""
        self.fatal = np.asarray(first_row)

    def commit(self, layer, z) -> None:
        self.committed[layer] = np.array(z)

    def evaluate(self, layer, Z):
        if self.fatal is not None and np.array_equal(Z[0], self.fatal):
            os.kill(os.getpid(), signal.SIGKILL)
        base = sum(float(z @ z) for k, z in self.committed.items() if k != layer)
        time.sleep(COST * self.factor * len(Z))
        return EvalResult(np.einsum("ij,ij->i", Z, Z) + base, np.full(len(Z), float(os.getpid())))

    def pid(self) -> int:
        return os.getpid()


SlowActor = ray.remote(SlowShell)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests


@pytest.fixture(scope="module")
def cluster():
    from orchestrator.evaluation.ray_eval import init_ray

    init_ray(None, 2)
    yield
    ray.shutdown()


@pytest.fixture
def ev(cluster):
    from orchestrator.evaluation.ray_eval import RayEvaluator

    evaluator = RayEvaluator(RunConfig.from_dict({}), num_actors=3, cpus_per_actor=0,
                             chunk_size=2, actor_cls=SlowActor)
    yield evaluator
    evaluator.close()


def population(seed, n=8):
    return np.random.default_rng(seed).standard_normal((n, 4))


def expected(Z, committed=()):
    return np.einsum("ij,ij->i", Z, Z) + sum(float(z @ z) for z in committed)


def evaluate(ev, Z, layer=0):
    began = time.monotonic()
    result = ev.evaluate(layer, Z)
    return result, time.monotonic() - began


def straggle(ev) -> int:
    """Slow the first actor (it takes chunk 0); its pid."""
    ray.get(ev.actors[0].slow.remote(SLOW))
    return ray.get(ev.actors[0].pid.remote())


def test_a_straggler_is_overtaken_and_results_are_identical(ev):
    Z = population(0)
    slow_pid = straggle(ev)
    ev.backup_chunks = False
    plain, plain_s = evaluate(ev, Z)  # waits for the straggler's chunk 0
    assert ev.backups == 0 and ev.pool.draining == {}
    known, known_s = evaluate(ev, Z)  # now known slow: it takes no chunk it cannot finish
    assert slow_pid not in known.accuracies and known_s < SLOW * COST
    ev.pool.rates.pop(ev.actors[0])  # forgotten, like a straggler that has just turned slow
    ev.backup_chunks = True
    raced, raced_s = evaluate(ev, Z)  # it takes chunk 0 again; a copy overtakes it
    assert ev.backups >= 1 and slow_pid not in raced.accuracies
    assert ev.actors[0] in ev.pool.draining  # still at work on its losing copy
    busy, _ = evaluate(ev, Z)  # the draining straggler gets nothing
    assert slow_pid not in busy.accuracies
    np.testing.assert_array_equal(plain.losses, expected(Z))
    for result in (known, raced, busy):
        np.testing.assert_array_equal(result.losses, plain.losses)
    assert plain_s >= 2 * SLOW * COST > SLOW * COST > raced_s


def test_a_losing_copy_never_corrupts_state(ev):
    """A commit lands behind the straggler's losing copy; the copy's answer arrives during the
    next generation and is ignored; the straggler then scores with the new commit."""
    slow_pid = straggle(ev)
    first = population(1)
    result, _ = evaluate(ev, first)
    np.testing.assert_array_equal(result.losses, expected(first))
    straggler = ev.actors[0]
    assert straggler in ev.pool.draining
    z = np.array([1.0, 2.0, 0.0, -1.0])
    began = time.monotonic()
    ev.commit(1, z)  # not waited for on the straggler
    assert time.monotonic() - began < SLOW * COST
    straggler.slow.remote(1.0)  # in order: fast again once its copy is done
    for actor in ev.actors[1:]:  # the next generation outlasts the copy (0.8 s a chunk)
        ray.get(actor.slow.remote(40.0))
    second = population(2, n=16)
    result, _ = evaluate(ev, second)
    np.testing.assert_array_equal(result.losses, expected(second, [z]))
    assert slow_pid in result.accuracies


def test_an_actor_lost_during_a_backup_recovers(ev):
    """Every actor that copies chunk 0 dies: the original answers (or a replacement's copy).
    Then a straggler dies while draining: the next generation replaces it, losing nothing."""
    straggle(ev)
    Z = population(3)
    for actor in ev.actors[1:]:
        ray.get(actor.arm.remote(Z[0]))  # chunk 0
    result, _ = evaluate(ev, Z)
    np.testing.assert_array_equal(result.losses, expected(Z))
    assert ev.replacements == 2 and len(ev.actors) == 3
    ev.pool.settle()
    Z = population(4)
    evaluate(ev, Z)  # chunk 0 on the straggler again, overtaken
    straggler = ev.actors[0]
    assert straggler in ev.pool.draining
    ray.kill(straggler, no_restart=True)
    Z = population(5)
    result, _ = evaluate(ev, Z)
    np.testing.assert_array_equal(result.losses, expected(Z))
    assert ev.replacements == 3 and len(ev.actors) == 3 and straggler not in ev.actors
