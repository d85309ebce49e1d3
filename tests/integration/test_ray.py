"""The Ray evaluator on a real local Ray cluster with two actors (tiny random-weight GPT-2)."""

import threading
import time

import numpy as np
import pytest
import tiny
import torch
from harness import run

from common.config import RunConfig
from orchestrator.evaluation.local import LocalEvaluator

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.integration

CFG = RunConfig.from_dict({
    "budget": 48, "optimizer": {"popsize": 8},
    "task": {"template": "{text} it was", "label_words": ["bad", "great"], "k": 4},
    "eval": {"train_batch_size": 4},
    "schedule": {"layers": [2, 1], "optimizers": ["cma", "fwa"]},
})


@pytest.fixture(scope="module")
def cluster():
    from orchestrator.evaluation.ray_eval import init_ray

    init_ray(None, 2)
    yield
    ray.shutdown()


def make_ray(chunk_size=None, num_actors=2, **kw):
    from orchestrator.evaluation.ray_eval import RayEvaluator

    return RayEvaluator(CFG, num_actors=num_actors, chunk_size=chunk_size,
                        actor_args={"loaded": tiny.model("gpt2"), "splits": tiny.splits()}, **kw)


@pytest.fixture
def one_thread():
    """The in-process side on one torch thread, as every actor here: a matmul's low bits depend
    on how many threads split it, and the shard tests compare bits (docs/design.md §9)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_local(stats=None):
    return LocalEvaluator(CFG, stats=stats, loaded=tiny.model("gpt2"), splits=tiny.splits())


def test_distributed_losses_equal_in_process(cluster):
    remote = make_ray(chunk_size=3)
    local = make_local(remote.stats)
    try:
        z = np.random.default_rng(0).standard_normal((10, remote.info.dim))
        for ev in (remote, local):  # a searched layer (the worker refuses others)
            ev.commit(2, z[0])
        for layer in (1, 2):
            a = remote.evaluate(layer, z).losses
            b = local.evaluate(layer, z).losses
            np.testing.assert_allclose(a, b, rtol=1e-6)
        assert remote.score("test")["accuracy"] == local.score("test")["accuracy"]
    finally:
        remote.close()


def test_small_run_gives_the_same_final_vectors(cluster, tmp_path):
    remote = make_ray()
    try:
        distributed = run(CFG, tmp_path / "ray", evaluator=remote)
    finally:
        remote.close()
    local = run(CFG, tmp_path / "local", evaluator=make_local(remote.stats))
    assert distributed.evaluations == local.evaluations
    for layer, z in local.vectors.items():
        np.testing.assert_array_equal(distributed.vectors[layer], z)


@pytest.mark.usefixtures("one_thread")
def test_example_shards_give_the_in_process_bits(cluster):
    """One chunk of the whole population split over both actors' batches: per-batch terms
    combined on the driver equal the in-process losses bit for bit (common/shards.py)."""
    remote = make_ray(chunk_size=10, example_shards=2)
    local = make_local(remote.stats)
    try:
        assert remote.train_batches == 2 and remote.shards(10) == 2
        z = np.random.default_rng(2).standard_normal((10, remote.info.dim))
        for ev in (remote, local):
            ev.commit(2, z[0])
        for layer in (1, 2):
            a = remote.evaluate(layer, z)
            b = local.evaluate(layer, z)
            np.testing.assert_array_equal(a.losses, b.losses)
            np.testing.assert_array_equal(a.accuracies, b.accuracies)
    finally:
        remote.close()


@pytest.mark.usefixtures("one_thread")
def test_calibrated_scores_equal_in_process(cluster):
    """eval.calibrate=train: no example shards even when "auto" would cut them, and the split
    scores (test centred by train's label offsets, each actor scoring a shard) are in-process's."""
    from orchestrator.evaluation.ray_eval import RayEvaluator

    cfg = CFG.replace(**{"eval.calibrate": "train", "eval.train_batch_size": 2})  # 4 batches
    remote = RayEvaluator(cfg, num_actors=2, chunk_size=3, example_shards="auto",
                          actor_args={"loaded": tiny.model("gpt2"), "splits": tiny.splits()})
    local = LocalEvaluator(cfg, stats=remote.stats, loaded=tiny.model("gpt2"),
                           splits=tiny.splits())
    try:
        assert remote.shards(10) == 1
        z = np.random.default_rng(3).standard_normal((10, remote.info.dim))
        for ev in (remote, local):
            ev.commit(2, z[0])
        a, b = remote.evaluate(1, z), local.evaluate(1, z)
        np.testing.assert_allclose(a.losses, b.losses, rtol=1e-6)
        np.testing.assert_array_equal(a.accuracies, b.accuracies)
        for split in ("train", "test"):
            a, b = remote.score(split), local.score(split)
            for key in ("loss", "label_offsets"):
                assert a.pop(key) == pytest.approx(b.pop(key), rel=1e-6)
            assert a == b
    finally:
        remote.close()


@pytest.mark.usefixtures("one_thread")
def test_small_run_with_example_shards_gives_the_in_process_run(cluster, tmp_path):
    """Chunks of the whole population (the in-process stacking: docs/design.md §9), each on
    two example shards: every generation's losses are the in-process run's, bit for bit."""
    cfg = CFG.replace(**{"cluster.example_shards": 2, "cluster.chunk_size": 8})
    remote = make_ray(chunk_size=8, example_shards=2)
    try:
        assert remote.shards(8) == 2
        distributed = run(cfg, tmp_path / "ray", evaluator=remote)
    finally:
        remote.close()
    local = run(CFG, tmp_path / "local", evaluator=make_local(remote.stats))
    assert distributed.evaluations == local.evaluations

    def losses(result):
        return [(r["best_loss"], r["loss_star"]) for r in result.metrics if "best_loss" in r]

    assert losses(distributed) == losses(local)
    for layer, z in local.vectors.items():
        np.testing.assert_array_equal(distributed.vectors[layer], z)


@pytest.mark.parametrize("how", ["ray.kill", "os.kill"])
def test_actor_killed_mid_generation_loses_nothing(cluster, how):
    import os
    import signal

    remote = make_ray(chunk_size=1, deadline_s=60)
    try:
        n = 200  # long enough that the kill lands mid-generation
        z = np.random.default_rng(1).standard_normal((n, remote.info.dim))
        remote.commit(2, z[5])
        undisturbed = remote.evaluate(1, z).losses
        victim = remote.actors[1]
        pid = ray.get(victim.pid.remote())

        killed = []

        def kill():
            time.sleep(0.3)
            killed.append(time.monotonic())
            if how == "ray.kill":
                ray.kill(victim, no_restart=True)
            else:
                os.kill(pid, signal.SIGKILL)

        killer = threading.Thread(target=kill)
        killer.start()
        disturbed = remote.evaluate(1, z).losses
        finished = time.monotonic()
        killer.join()
        assert killed[0] < finished, "the kill came after the generation: make it longer"
        np.testing.assert_array_equal(disturbed, undisturbed)
        assert remote.replacements >= 1 and len(remote.actors) == 2
        # the replacement holds the committed state: it scores like the others
        again = remote.evaluate(1, z).losses
        np.testing.assert_array_equal(again, undisturbed)
    finally:
        remote.close()


def test_cluster_config_is_validated():
    assert CFG.replace(**{"cluster.num_actors": 1}).cluster.num_actors == 1
    for key, bad in (("cluster.num_actors", -2), ("cluster.cpus_per_actor", 0),
                     ("cluster.chunk_size", 0)):
        with pytest.raises(Exception, match=key):
            CFG.replace(**{key: bad})


def test_auto_actor_count_on_the_local_cluster(cluster):
    """num_actors -1 on this 2-CPU, GPU-less cluster: one actor holding the CPU pair."""
    ev = make_ray(num_actors=-1)
    try:
        assert len(ev.actors) == ev.num_actors == 1 and ev.pool.resources["num_cpus"] == 2.0
        z = np.zeros((3, ev.info.dim))
        assert np.isfinite(ev.evaluate(1, z).losses).all()
    finally:
        ev.close()
