"""When a backup copy of a chunk goes out (orchestrator/evaluation/dispatch.py)."""

import time
from types import SimpleNamespace

import numpy as np
import pytest

from orchestrator.evaluation.dispatch import (
    OVERDUE,
    Generation,
    chunks,
    typical_rate,
    worth_copying,
)


def test_a_copy_goes_out_only_when_it_should_answer_first():
    # a known 3x straggler with 10 candidates (3 s), 1 s done: a copy takes 1 s of the 2 left
    assert worth_copying(10, 1.0, 0.3, 0.1, 0.1)
    assert not worth_copying(10, 2.5, 0.3, 0.1, 0.1)  # 0.5 s left, a copy takes 1 s
    # chunks of typical actors near their end: never (the copy would run into the next
    # generation for nothing)
    assert not worth_copying(10, 0.9, 0.1, 0.1, 0.1)
    assert not worth_copying(10, 1.1, 0.1, 0.1, 0.1)
    # overdue: out OVERDUE times a typical actor's time, whatever its owner's last rate said
    assert worth_copying(10, OVERDUE * 1.0, None, None, 0.1)
    assert worth_copying(10, OVERDUE * 1.0 + 0.01, 0.1, 0.1, 0.1)
    assert not worth_copying(10, 0.1, None, None, None)  # nothing measured yet: no copy


def test_typical_rate_is_the_median():
    assert typical_rate({}) is None
    assert typical_rate({"a": 0.1, "b": 0.3, "c": 0.2}) == 0.2


# -- shrinking chunks and the slow-actor rule ------------------------------------------------

def test_guided_chunks_shrink_and_cover_the_population():
    for n, actors in [(256, 8), (20, 2), (20, 8), (5, 8), (1, 1), (1000, 3)]:
        got = chunks(n, "guided", actors)
        assert got[0][0] == 0 and got[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(got, got[1:], strict=False))
        sizes = [b - a for a, b in got]
        assert sizes == sorted(sizes, reverse=True)  # larger first
        assert min(sizes) >= max(1, n // (8 * actors)) or sizes[-1] == n - got[-1][0]
    sizes = [b - a for a, b in chunks(256, "guided", 8)]
    assert sizes == [16] * 8 + [8] * 8 + [4] * 16  # half of what is left per round, floor 4
    assert chunks(256, "guided", 8) == chunks(256, "guided", 8)  # fixed by n and actors


def generation(rates: dict, actors: list, queue: list, running: dict | None = None):
    pool = SimpleNamespace(ray=None, rates=rates, actors=actors, free=lambda: list(actors))
    gen = Generation(pool, 0, np.zeros((256, 4)), queue)
    gen.running = running or {}
    return gen


def test_a_known_straggler_takes_only_what_it_can_finish_in_time():
    # 7 actors at 0.02 s a candidate and one at 0.06 s; 256 candidates left: the others would
    # finish in 256 / (7 / 0.02 + 1 / 0.06) = 0.70 s
    actors = list("abcdefgs")
    rates = {a: 0.02 for a in actors[:-1]} | {"s": 0.06}
    gen = generation(rates, actors, chunks(256, "guided", 8))
    assert not gen._in_time("s", (0, 16, 0))  # 0.96 s
    assert gen._in_time("s", (128, 136, 0))  # 0.48 s
    assert gen._in_time("a", (0, 16, 0))  # full speed: anything
    # near the end (8 candidates left) even a chunk of 4 is too much for it
    near_end = generation(rates, actors, [(248, 252, 0), (252, 256, 0)])
    assert not near_end._in_time("s", (248, 252, 0))
    # work still running on others counts: the chunk of 16 just sent to "a" is left to do
    began = time.monotonic()
    busy = generation(rates, actors, [(248, 252, 0)], {"ref": ("a", (0, 16, 0), began)})
    assert busy._remaining(0.02) == pytest.approx(20, abs=0.1)


def test_an_unmeasured_or_lone_slow_actor_is_never_held_back():
    gen = generation({"a": 0.02}, ["a", "s"], [(0, 16, 0)])
    assert gen._in_time("s", (0, 16, 0))  # not measured yet: taken as typical
    alone = generation({"s": 0.06}, ["s"], [(0, 16, 0), (16, 32, 0)])
    assert alone._in_time("s", (0, 16, 0))  # the only actor alive: it takes everything
    assert generation({}, ["a", "s"], [(0, 16, 0)])._in_time("s", (0, 16, 0))
