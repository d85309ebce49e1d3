"""The evaluation worker on tiny random-weight models of every supported family."""

import numpy as np
import pytest
import tiny
import torch

from common.config import RunConfig
from workers import fastpath
from workers.reference import reference_losses
from workers.worker import EvalWorker


def config(family, **overrides):
    cfg = {"task": {"template": "{text} it was {mask} ." if family in tiny.MASKED
                    else "{text} it was", "label_words": ["bad", "great"], "k": 4},
           "eval": {"batch_size": 3, "train_batch_size": 3, "max_stack_tokens": 100}}
    for key, value in overrides.items():
        section, leaf = key.split(".")
        cfg.setdefault(section, {})[leaf] = value
    return RunConfig.from_dict(cfg)


def make_worker(family, **overrides):
    return EvalWorker(config(family, **overrides), loaded=tiny.model(family), splits=tiny.splits())


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def worker(family):
    return make_worker(family)


def population(n, dim=500, seed=0, scale=1.0):
    return np.random.default_rng(seed).standard_normal((n, dim)) * scale


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_fast_path_matches_naive(worker, where):
    layer = {"first": 0, "middle": worker.n_layers // 2, "last": worker.n_layers - 1}[where]
    z = population(5, seed=layer)
    fast = worker.evaluate(layer, z).losses
    naive = reference_losses(worker, layer, z)
    np.testing.assert_allclose(fast, naive, rtol=1e-5)
    assert np.ptp(fast) > 0  # the candidates really differ


def test_fast_path_matches_naive_with_committed_layers(worker):
    worker.commit(0, population(1, seed=7)[0])
    worker.commit(worker.n_layers - 1, population(1, seed=8)[0])
    try:
        for layer in range(worker.n_layers):
            z = population(3, seed=10 + layer)
            np.testing.assert_allclose(worker.evaluate(layer, z).losses,
                                       reference_losses(worker, layer, z), rtol=1e-5)
        # the committed state scored on train equals evaluating its own vector
        last = worker.n_layers - 1
        own = worker.evaluate(last, worker.committed[last][None]).losses[0]
        assert own == pytest.approx(worker.score("train")["loss"], rel=1e-5)
    finally:
        for layer in list(worker.committed):
            worker.commit(layer, np.zeros(worker.dim))


def test_zero_vector_reproduces_unmodified_model_exactly(worker):
    batch = worker.batches["dev"][0]
    before = worker.logits(batch)
    for layer in range(worker.n_layers):
        worker.commit(layer, np.zeros(worker.dim))
    assert torch.equal(worker.logits(batch), before)
    state = worker.states[0]
    plain = fastpath.suffix_logits(worker.arch, worker.head, state, 1, 1)
    one = worker._stacked(1, state, torch.zeros(1, worker.dim, dtype=torch.float64))
    assert torch.equal(one[0], plain)  # the wrapper adds an exact zero
    two = worker._stacked(1, state, torch.zeros(2, worker.dim, dtype=torch.float64))
    torch.testing.assert_close(two, torch.stack([plain, plain]))  # batch shape may move bits


def test_stacking_does_not_change_losses(worker):
    z = population(6, seed=3)
    stacked = worker.evaluate(1, z).losses
    one_by_one = np.array([worker.evaluate(1, z[i : i + 1]).losses[0] for i in range(6)])
    np.testing.assert_allclose(stacked, one_by_one, rtol=1e-5)


def test_same_seed_and_stats_give_bit_identical_maps(worker, family):
    other = EvalWorker(worker.cfg, stats=worker.calibration_stats(), loaded=tiny.model(family),
                       splits=tiny.splits())
    for layer in range(worker.n_layers):
        for a, b in zip(worker.projector.maps(layer), other.projector.maps(layer), strict=True):
            assert torch.equal(a, b)
    z = population(3)
    assert np.array_equal(worker.evaluate(2, z).losses, other.evaluate(2, z).losses)


def test_calibration_excludes_padding():
    a = make_worker("llama")
    b = make_worker("llama", **{"eval.train_batch_size": 8})  # one batch: much more padding
    np.testing.assert_allclose(a.stats.qk_input, b.stats.qk_input, rtol=1e-5)
    np.testing.assert_allclose(a.stats.hidden, b.stats.hidden, rtol=1e-5)


@pytest.mark.parametrize("init", ["qk-input", "paper", "paper-a-only", "random"])
def test_every_init_builds_maps_and_scores(init):
    w = make_worker("gpt2", **{"adapter.init": init})
    losses = w.evaluate(0, population(2)).losses
    assert np.all(np.isfinite(losses))
    kind, size = w.projector.scale(1, 1)
    if init == "random":
        assert (kind, size) == ("normal", pytest.approx(1 / np.sqrt(500)))
    if init == "paper-a-only":
        assert kind == "uniform"


def test_delta_norms_report_committed_layers(worker):
    worker.commit(1, population(1, seed=4)[0])
    try:
        rows = {r["layer"]: r for r in worker.delta_norms()}
        assert rows[1]["q_ratio"] > 0 and rows[1]["k_ratio"] > 0
        assert all(r["q_ratio"] == 0 for layer, r in rows.items() if layer != 1)
    finally:
        worker.commit(1, np.zeros(worker.dim))


def test_test_split_divided_among_workers_scores_the_same(worker):
    from workers.scorer import combine_scores

    whole = worker.score("test")
    parts = [worker.predict("test", (i, 3)) for i in (2, 0, 1)]  # any order
    assert sum(len(p[1]) for p in parts) == whole["n"]
    sharded = combine_scores(parts, worker.cfg)
    assert sharded["accuracy"] == whole["accuracy"] and sharded["f1"] == whole["f1"]
    assert sharded["loss"] == pytest.approx(whole["loss"], rel=1e-6)


# -- searched layers only, and the frozen prefix (docs/design.md §7) -----------------------------

@pytest.fixture(scope="module", params=tiny.FAMILIES)
def saved(request, tmp_path_factory):
    """A tiny model saved as a folder (safetensors), so that a worker loads it itself."""
    folder = tmp_path_factory.mktemp(request.param)
    loaded = tiny.model(request.param, layers=4)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return request.param, folder


def test_frozen_prefix_scores_equal_the_full_forward(saved, monkeypatch):
    import workers.worker
    from common.config import ModelConfig
    from workers import models

    monkeypatch.setattr(workers.worker, "TEST_GROUP", 3)  # test's prefix made in several groups

    family, folder = saved
    cfg = config(family, **{"model.name": str(folder), "schedule.layers": [3, 2]})
    prefixed = EvalWorker(cfg, splits=tiny.splits())  # loads the folder itself
    full = EvalWorker(cfg, loaded=models.load(ModelConfig(name=str(folder))),
                      splits=tiny.splits())
    assert set(prefixed.prefix) == {"train", "dev"} and full.prefix is None
    assert prefixed._files.fallbacks == []  # every frozen tensor came from the file
    assert prefixed.stats == full.stats  # bit-identical statistics
    assert prefixed.stats.qk_input[:2] == (None, None) and None not in prefixed.stats.qk_input[2:]
    z = population(4, seed=1)
    np.testing.assert_array_equal(prefixed.evaluate(2, z).losses, full.evaluate(2, z).losses)
    for worker in (prefixed, full):
        worker.commit(3, population(1, seed=2)[0])
    for split in ("train", "dev", "test"):
        a, b = prefixed.predict(split), full.predict(split)
        np.testing.assert_array_equal(a[0], b[0])  # the same operations: exactly
        np.testing.assert_array_equal(a[1], b[1])
        assert prefixed.score(split)["accuracy"] == full.score(split)["accuracy"]
    np.testing.assert_array_equal(prefixed.evaluate(2, z).losses, full.evaluate(2, z).losses)
    parts = [prefixed.predict("test", (i, 2)) for i in (1, 0)]
    assert sum(len(p[1]) for p in parts) == prefixed.score("test")["n"]


def test_unsearched_layers_are_refused_and_keep_no_copies(saved):
    from common.errors import DfoloraError

    family, folder = saved
    worker = EvalWorker(config(family, **{"model.name": str(folder), "schedule.layers": [3, 2]}),
                        splits=tiny.splits())
    assert worker.searched == {2, 3} and worker.first == 2
    assert all(w.numel() == 0 for pair in worker.pristine[:2] for w in pair)
    assert all(s.hidden[1] is None for s in worker.states)
    for call in (lambda: worker.evaluate(1, population(2)),
                 lambda: worker.commit(0, population(1)[0])):
        with pytest.raises(DfoloraError, match="not searched"):
            call()
