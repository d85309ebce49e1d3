"""The dispatch benchmark (bench/dispatch.py) on a tiny setting: losses in place, JSON shape."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

BENCH = Path(__file__).resolve().parents[2] / "bench" / "dispatch.py"


@pytest.fixture(scope="module")
def bench():
    # bench/ is not a package: load the file under a module name of its own
    spec = importlib.util.spec_from_file_location("dispatch_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def cluster(bench):
    bench.init_ray(None, 2)
    yield
    ray.shutdown()


def test_chunk_makespan_counts_rounds_of_chunks(bench):
    assert bench.chunk_makespan([3] * 6 + [2], 4, 1.0) == 6.0  # 7 chunks: two rounds of 3
    assert bench.chunk_makespan([5] * 4, 4, 1.0) == 5.0
    assert bench.chunk_makespan([2, 2, 2, 1], 2, 1.0) == 4.0  # the last chunk is short
    assert bench.chunk_makespan([3] * 4 + [2] * 4, 4, 1.0) == 5.0  # the default split of 20
    # actor 0 three times slower: its first chunk (3) ends at 9; the others share the rest
    assert bench.chunk_makespan([3] * 4 + [2] * 4, 4, 1.0, straggler=3.0) == 9.0
    assert bench.chunk_makespan([1] * 8, 2, 1.0, straggler=3.0) == 6.0


def test_every_candidate_gets_its_own_loss(bench, cluster):
    from common.config import RunConfig

    ev = bench.RayEvaluator(RunConfig.from_dict({}), num_actors=2, cpus_per_actor=0,
                            chunk_size=3, actor_cls=bench.SimActor, actor_args={"cost": 0.001})
    try:
        Z = np.random.default_rng(0).standard_normal((8, ev.info.dim))
        result = ev.evaluate(0, Z)
        np.testing.assert_array_equal(result.losses, bench.expected_losses(Z))
    finally:
        ev.close()


def test_bench_reports_every_setting(bench, cluster):
    result = json.loads(json.dumps(bench.run_bench([2], [8], cost=0.001, generations=1,
                                                   straggler=3.0)))
    rows = result["results"]
    assert [(r["straggler"], r["backup"]) for r in rows] == [
        (False, False), (False, True), (True, False), (True, True)]
    for row in rows:
        assert row["actors"] == 2 and row["population"] == 8 and row["chunk_size"] == 2
        assert row["ideal_s"] == pytest.approx(0.004)
        assert row["measured_s"] > 0 and row["efficiency"] == pytest.approx(
            row["ideal_s"] / row["measured_s"], rel=0.01, abs=1e-3)  # both printed rounded
    assert rows[2]["capacity_s"] == pytest.approx(0.008 / (1 + 1 / 3), abs=1e-4)
    assert rows[2]["chunk_ideal_s"] == pytest.approx(0.006)  # chunk 0 takes 3 x 2 ms
    assert list(result["efficiency"]) == ["2x8", "2x8-backup", "2x8-straggler",
                                          "2x8-straggler-backup"]
    assert len(bench.table(result).splitlines()) == 6  # title, header, four rows
    one = bench.run_bench([1], [8], cost=0.001, generations=1, backup="on")["results"]
    assert [(r["straggler"], r["backup"]) for r in one] == [(False, True)]


def test_example_shards_rows_combine_every_batch(bench, cluster):
    """4 actors, 2 candidates: unsharded (2 chunks), then auto (each chunk on 4 shards of 2 of
    the 8 simulated batches); every generation's losses are checked in place."""
    result = bench.run_bench([4], [2], cost=0.001, generations=1, straggler=1.0, backup="off",
                             example_shards=(1, "auto", 4))  # 4 is auto's count: skipped
    rows = result["results"]
    assert [(r["example_shards"], r["shards"]) for r in rows] == [(1, 1), ("auto", 4)]
    assert rows[1]["chunk_ideal_s"] == pytest.approx(0.0005)  # 8 pieces of a quarter candidate
    assert list(result["efficiency"]) == ["4x2", "4x2-shards4"]
    assert "shards" in bench.table(result).splitlines()[1]


def test_default_chunks_are_near_equal_index_ranges():
    from orchestrator.evaluation.dispatch import chunks as split

    def chunks(n, actors, size=None):
        return split(n, size, actors)

    assert [b - a for a, b in chunks(20, 8)] == [2] * 4 + [1] * 12
    assert [b - a for a, b in chunks(20, 4)] == [3] * 4 + [2] * 4
    assert chunks(3, 8) == [(0, 1), (1, 2), (2, 3)]
    assert chunks(7, 2, size=3) == [(0, 3), (3, 6), (6, 7)]
    for n, actors in [(20, 3), (256, 16), (1, 1)]:
        c = chunks(n, actors)
        assert c[0][0] == 0 and c[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(c, c[1:], strict=False))


def test_auto_actor_count_follows_the_cluster():
    from orchestrator.evaluation.ray_eval import auto_actors

    assert auto_actors({"CPU": 16.0, "GPU": 4.0}, 1.0, 0.0) == (4, 1.0, 1.0)
    assert auto_actors({"CPU": 16.0, "GPU": 4.0}, 1.0, 0.5) == (8, 1.0, 0.5)
    assert auto_actors({"CPU": 8.0}, 1.0, 0.0) == (4, 2.0, 0.0)
    assert auto_actors({"CPU": 1.0}, 1.0, 0.0) == (1, 1.0, 0.0)
