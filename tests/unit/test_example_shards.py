"""Example shards (common/shards.py, dispatch.example_shards): a chunk's training batches split
over actors, the per-batch loss terms combined in batch order: the same bits as unsharded."""

import numpy as np
import pytest
import tiny
import torch

from common.config import RunConfig
from common.errors import ConfigError, DfoloraError
from common.shards import BatchTerms, combine_batches, shard_range
from orchestrator.evaluation.dispatch import example_shards, pieces
from workers.worker import EvalWorker

CFG = RunConfig.from_dict({
    "task": {"template": "{text} it was", "label_words": ["bad", "great"], "k": 4},
    "eval": {"train_batch_size": 2, "max_stack_tokens": 100},  # 4 batches; stacks of a few
    "schedule": {"layers": [2, 1]},
})


@pytest.fixture(scope="module")
def worker():
    w = EvalWorker(CFG, loaded=tiny.model("gpt2"), splits=tiny.splits())
    w.commit(2, np.random.default_rng(1).standard_normal(w.dim))
    return w


def test_shards_are_consecutive_runs_covering_every_batch_once():
    for n_batches in range(1, 10):
        for count in range(1, n_batches + 3):
            ranges = [shard_range(n_batches, i, count) for i in range(count)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n_batches
            assert all(a[1] == b[0] for a, b in zip(ranges[:-1], ranges[1:], strict=True))
            sizes = [stop - start for start, stop in ranges]
            assert sizes == sorted(sizes, reverse=True) and max(sizes) - min(sizes) <= 1


def test_batch_terms_are_added_one_batch_at_a_time_in_batch_order():
    # 1e16 + 1 rounds back to 1e16 in float64: in batch order the 1 is lost, in any other
    # order (pairwise, or the small terms first) it is not
    sums = np.array([[1e16], [1.0], [-1e16], [1.0]])
    terms = BatchTerms(0, sums, np.array([[1.0], [0.0], [1.0], [1.0]]), np.array([1, 1, 1, 1]))
    loss, acc = combine_batches(terms)
    assert loss[0] == ((((0.0 + 1e16) + 1.0) - 1e16) + 1.0) / 4 == 0.25
    assert acc[0] == 0.75


def test_sharded_losses_are_bit_equal_to_unsharded_in_fp32(worker):
    assert worker.model.dtype == torch.float32
    Z = np.random.default_rng(0).standard_normal((7, worker.dim))
    n_batches = worker.train_batches
    assert n_batches == 4
    for layer in (1, 2):
        whole = worker.evaluate(layer, Z)
        for count in range(1, n_batches + 2):  # one more shard than batches: an empty one
            parts = [worker.batch_terms(layer, Z, (i, count)) for i in range(count)]
            assert [p.first for p in parts] == [shard_range(n_batches, i, count)[0]
                                                for i in range(count)]
            joined = BatchTerms(0, *(np.concatenate([getattr(p, f) for p in parts])
                                     for f in ("loss_sums", "hits", "counts")))
            loss, acc = combine_batches(joined)
            np.testing.assert_array_equal(loss, whole.losses)
            np.testing.assert_array_equal(acc, whole.accuracies)


def test_a_bad_shard_is_refused(worker):
    Z = np.zeros((2, worker.dim))
    for shard in ((1, 1), (-1, 2), (0, 0)):
        with pytest.raises(DfoloraError, match="shard"):
            worker.batch_terms(1, Z, shard)


def test_auto_shards_only_when_actors_outnumber_chunks():
    # population 20 (chunks: min(20, 2 x actors)), 8 training batches
    assert example_shards("auto", 8, 16, 8) == 1
    assert example_shards("auto", 16, 20, 8) == 2
    assert example_shards("auto", 32, 20, 8) == 4
    assert example_shards("auto", 64, 20, 8) == 8  # 7 wanted: equal shards of one batch
    assert example_shards("auto", 64, 20, 3) == 3  # at most one shard per batch
    assert example_shards(5, 1, 20, 8) == 5 and example_shards(12, 1, 20, 8) == 8
    assert example_shards(1, 64, 20, 8) == 1
    assert pieces([(0, 2), (2, 3)], 2) == [(0, 2, 0), (0, 2, 1), (2, 3, 0), (2, 3, 1)]


def test_example_shards_config():
    assert RunConfig.from_dict({}).cluster.example_shards == 1
    assert CFG.replace(**{"cluster.example_shards": "auto"}).cluster.example_shards == "auto"
    assert CFG.replace(**{"cluster.example_shards": 4}).cluster.example_shards == 4
    for bad in (0, -2, "many", 2.5, True, None):
        with pytest.raises(ConfigError, match="cluster.example_shards"):
            CFG.replace(**{"cluster.example_shards": bad})
