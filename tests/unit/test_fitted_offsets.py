"""`eval.offsets=fit` (workers/scoring.py fitted_offsets): the label offsets that minimise the
training cross-entropy, order-free, in the search's loss and in every score."""

import numpy as np
import pytest
import tiny
import torch

from common.config import RunConfig
from common.errors import ConfigError
from workers.scorer import combine_scores
from workers.scoring import classification_metrics, example_losses, label_offsets
from workers.worker import EvalWorker

SETTINGS = {
    "task": {"template": "{text} it was", "label_words": ["bad", "great"], "k": 4},
    "eval": {"train_batch_size": 2, "max_stack_tokens": 100, "calibrate": "train",
             "offsets": "fit"},
    "schedule": {"layers": [2, 1]},
}
CFG = RunConfig.from_dict(SETTINGS)


def skewed(n_candidates: int, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose classes' margins differ in spread, so mean-centring is not the CE optimum."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % k
    signal = torch.nn.functional.one_hot(labels, k).float() * torch.linspace(0.5, 3.0, k)
    noise = torch.randn(n_candidates, n, k, generator=gen) * torch.linspace(0.5, 2.0, k)
    return signal + noise + torch.linspace(0.0, 4.0, k), labels


def mean_loss(logits: torch.Tensor, labels: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return example_losses(logits.double() - offsets.double(), labels, "ce").mean(-1)


@pytest.mark.parametrize("k", [2, 4])
def test_fitted_offsets_minimise_the_training_cross_entropy(k):
    logits, labels = skewed(3, 32, k)
    fitted = label_offsets(logits, labels, "fit")
    assert fitted.shape == (3, 1, k) and fitted.dtype == torch.float32
    best = mean_loss(logits, labels, fitted)
    assert torch.all(best < mean_loss(logits, labels, label_offsets(logits)))
    # a stationary point: no small move of any one label's offset lowers the loss
    for label in range(k):
        for step in (-1e-2, 1e-2):
            moved = fitted.clone()
            moved[..., label] += step
            assert torch.all(mean_loss(logits, labels, moved) >= best - 1e-7)


def test_two_labels_match_a_brute_force_threshold():
    logits, labels = skewed(1, 32, 2, seed=3)
    fitted = label_offsets(logits, labels, "fit")[0, 0]
    grid = torch.linspace(-10, 10, 20001, dtype=torch.float64)  # offset of label 1 - label 0
    margins = (logits[0, :, 1] - logits[0, :, 0]).double()
    signed = torch.where(labels == 1, 1.0, -1.0).double()
    losses = torch.nn.functional.softplus(-signed * (margins - grid[:, None])).mean(-1)
    assert float(fitted[1] - fitted[0]) == pytest.approx(float(grid[losses.argmin()]), abs=2e-3)


def test_fitted_offsets_are_order_free_and_per_candidate():
    logits, labels = skewed(4, 24, 3, seed=5)
    fitted = label_offsets(logits, labels, "fit")
    order = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    assert torch.equal(label_offsets(logits[:, order], labels[order], "fit"), fitted)
    for i in range(4):
        assert torch.equal(label_offsets(logits[i], labels, "fit"), fitted[i])


def test_a_constant_added_to_one_label_changes_no_fitted_loss():
    logits, labels = skewed(2, 16, 2, seed=2)
    shifted = logits + torch.tensor([0.0, 5.0])
    plain = example_losses(logits - label_offsets(logits, labels, "fit"), labels, "ce")
    biased = example_losses(shifted - label_offsets(shifted, labels, "fit"), labels, "ce")
    torch.testing.assert_close(plain, biased, rtol=1e-4, atol=1e-4)


def test_fit_needs_labels_and_a_known_rule():
    with pytest.raises(ValueError, match="labels"):
        label_offsets(torch.zeros(4, 2), rule="fit")
    with pytest.raises(ConfigError, match="eval.offsets"):
        RunConfig.from_dict({"eval": {"offsets": "median"}})


@pytest.fixture(scope="module")
def worker():
    w = EvalWorker(CFG, loaded=tiny.model("gpt2"), splits=tiny.splits())
    w.commit(2, np.random.default_rng(1).standard_normal(w.dim))
    return w


def test_population_losses_and_scores_use_the_fitted_offsets(worker):
    train_logits, labels = worker.predict("train")
    offsets = label_offsets(torch.from_numpy(train_logits), torch.from_numpy(labels), "fit")
    expected = classification_metrics(torch.from_numpy(train_logits) - offsets,
                                      torch.from_numpy(labels), "ce", 2.0)
    score = worker.score("train")
    assert score["label_offsets"] == pytest.approx(offsets[0].tolist(), rel=1e-6)
    assert score["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert float(worker.committed_loss(1).losses[0]) == pytest.approx(expected["loss"], rel=1e-5)
    z = worker.committed[2]
    assert worker.evaluate(2, z[None]).losses[0] == pytest.approx(expected["loss"], rel=1e-5)
    mean = combine_scores([(train_logits, labels)], CFG.replace(**{"eval.offsets": "mean"}),
                          [(train_logits, labels)])
    assert score["loss"] <= mean["loss"] + 1e-7  # the fit is the CE optimum over offsets


def test_shards_in_any_order_give_the_same_offsets(worker):
    """Ray actors return the training split in interleaved shards (Scorer.predict)."""
    train = [worker.predict("train", (i, 3)) for i in range(3)]
    dev = [worker.predict("dev")]
    forward = combine_scores(dev, CFG, train)
    backward = combine_scores(dev, CFG, train[::-1])
    assert forward["label_offsets"] == backward["label_offsets"]
    assert forward == backward
    assert forward["label_offsets"] == worker.score("dev")["label_offsets"]

