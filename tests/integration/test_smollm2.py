"""The evaluation core on the real offline SmolLM2-135M and Rotten Tomatoes."""

import json

import numpy as np
import pytest

from common.config import RunConfig
from orchestrator import cli
from workers import models
from workers.reference import reference_losses
from workers.scorer import load_splits
from workers.worker import EvalWorker

pytestmark = pytest.mark.integration
CFG = RunConfig.from_dict({"task": {"max_test": 16}})


@pytest.fixture(scope="module")
def loaded():
    return models.load(CFG.model)


@pytest.fixture(scope="module")
def worker(loaded):
    return EvalWorker(CFG, loaded=loaded)


def test_first_generation_deltas_are_a_fraction_of_the_weights(worker):
    rng = np.random.default_rng(0)
    sigma0 = worker.cfg.optimizer.sigma0
    for layer in range(worker.n_layers):
        for z in rng.standard_normal((3, worker.dim)) * sigma0:
            q, k = worker.delta_ratio(layer, z)
            assert 0.05 <= q <= 2 and 0.05 <= k <= 2, (layer, q, k)


def test_residual_stream_scale_gives_enormous_deltas(worker, loaded):
    """docs/design.md §2: the paper's rule on a pre-norm model makes deltas far larger than W."""
    paper = EvalWorker(CFG.replace(**{"adapter.init": "paper"}), loaded=loaded,
                       stats=worker.calibration_stats())
    z = np.random.default_rng(1).standard_normal(worker.dim)
    assert min(paper.delta_ratio(20, z)) > 100
    assert max(worker.delta_ratio(20, z)) < 2


@pytest.mark.parametrize("layer", [0, 29])
def test_fast_path_matches_reference_loop(worker, layer):
    z = np.random.default_rng(layer).standard_normal((2, worker.dim))
    np.testing.assert_allclose(worker.evaluate(layer, z).losses,
                               reference_losses(worker, layer, z), rtol=1e-5)


def test_commit_and_score_report_delta_norms(worker):
    z = np.random.default_rng(5).standard_normal(worker.dim)
    worker.commit(29, z)
    try:
        (row,) = worker.delta_norms()
        assert (row["q_ratio"], row["k_ratio"]) == pytest.approx(worker.delta_ratio(29, z))
        train = worker.score("train")
        assert train["loss"] == pytest.approx(worker.evaluate(29, z[None]).losses[0], rel=1e-5)
    finally:
        worker.commit(29, np.zeros(worker.dim))


def test_splits_are_true_few_shot():
    splits = load_splits(CFG)
    assert len(splits.train) == len(splits.dev) == 32
    assert len(splits.test) == 16


def test_zero_shot_command_scores_each_template(tmp_path):
    """`dfolora zero-shot` (the one zero-shot path) on both named templates."""
    scored = {}
    for name in ("default", "instruct"):
        out = tmp_path / name
        code = cli.main(["zero-shot", "--set", "task.max_test=16", "--set",
                         f"task.template={name}", "--out", str(out), "--progress", "quiet"])
        assert code == 0
        scored[name] = json.loads((out / "results.json").read_text())["final"]["test"]
    for test in scored.values():
        hits = test["accuracy"] * 16  # a count of the 16 test examples
        assert test["n"] == sum(test["predicted_counts"]) == 16 and hits == round(hits)
    assert scored["default"]["loss"] != scored["instruct"]["loss"]
