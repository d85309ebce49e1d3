"""`eval.calibrate=train` (workers/scoring.py label_offsets): label logits less their mean over the
training examples, in the search's loss, in the committed model's loss and in every score."""

import json

import numpy as np
import pytest
import tiny
import torch
from harness import run

from common.config import RunConfig
from common.errors import ConfigError, DfoloraError
from common.messages import LABEL_OFFSETS
from orchestrator import cli
from orchestrator.evaluation.local import LocalEvaluator
from orchestrator.runfolder import ADAPTER
from workers.gradient_lora import train_lora
from workers.reference import reference_losses
from workers.scorer import combine_scores
from workers.scoring import classification_metrics, example_losses, label_offsets
from workers.worker import EvalWorker

SETTINGS = {
    "task": {"template": "{text} it was", "label_words": ["bad", "great"], "k": 4},
    "eval": {"train_batch_size": 2, "max_stack_tokens": 100, "calibrate": "train"},
    "schedule": {"layers": [2, 1]},
}
CFG = RunConfig.from_dict(SETTINGS)


@pytest.fixture(scope="module")
def worker():
    w = EvalWorker(CFG, loaded=tiny.model("gpt2"), splits=tiny.splits())
    w.commit(2, np.random.default_rng(1).standard_normal(w.dim))
    return w


def centred(logits: np.ndarray, train: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(logits - train.mean(0, keepdims=True))


def same(score: dict, expected: dict) -> bool:
    score = {k: v for k, v in score.items() if k != "label_offsets"}
    loss = score.pop("loss") == pytest.approx(expected.pop("loss"), rel=1e-6)
    return loss and score == expected


def test_a_constant_added_to_one_label_changes_no_calibrated_loss():
    logits = torch.randn(3, 8, 2)
    labels = torch.tensor([0, 1] * 4)
    shifted = logits + torch.tensor([0.0, 5.0])  # a bias toward label 1
    plain = example_losses(logits - label_offsets(logits), labels, "ce")
    biased = example_losses(shifted - label_offsets(shifted), labels, "ce")
    torch.testing.assert_close(plain, biased, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(example_losses(logits, labels, "ce"),
                              example_losses(shifted, labels, "ce"))
    assert label_offsets(logits).shape == (3, 1, 2)  # one offset per candidate and label


def test_population_losses_are_the_calibrated_losses_of_each_committed_candidate(worker):
    train_logits, labels = worker.predict("train")
    expected = classification_metrics(centred(train_logits, train_logits),
                                      torch.from_numpy(labels), "ce", 2.0)
    score = worker.score("train")
    assert score["label_offsets"] == pytest.approx(train_logits.mean(0).tolist(), rel=1e-6)
    assert score["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert score["accuracy"] == expected["accuracy"]
    # the committed model's loss, and a population holding its vector, give the same figure
    assert float(worker.committed_loss(1).losses[0]) == pytest.approx(expected["loss"], rel=1e-5)
    z = worker.committed[2]
    result = worker.evaluate(2, np.stack([z, np.zeros_like(z)]))
    assert result.losses[0] == pytest.approx(expected["loss"], rel=1e-5)
    assert result.accuracies[0] == expected["accuracy"]


def test_dev_and_test_are_centred_by_the_training_split(worker):
    train_logits, _ = worker.predict("train")
    for split in ("dev", "test"):
        logits, labels = worker.predict(split)
        expected = classification_metrics(centred(logits, train_logits),
                                          torch.from_numpy(labels), "ce", 2.0)
        assert same(worker.score(split), expected)


def test_off_leaves_logits_as_they_are(worker):
    plain = CFG.replace(**{"eval.calibrate": "off"})
    logits, labels = worker.predict("dev")
    expected = classification_metrics(torch.from_numpy(logits), torch.from_numpy(labels),
                                      "ce", 2.0)
    assert same(combine_scores([(logits, labels)], plain), expected)
    off = EvalWorker(plain, loaded=tiny.model("gpt2"), splits=tiny.splits())
    assert not off.calibrate and "label_offsets" not in off.score("dev")


class Unadapted:
    """What `choose_calibration` reads of a scorer: its config and its split logits."""

    def __init__(self, train_bias: float, dev_bias: float):
        rng = np.random.default_rng(0)
        self.cfg, self.calibrate = CFG.replace(**{"eval.calibrate": "auto"}), False
        labels = np.array([0, 1] * 8)
        self.logits = {}
        for split, bias in (("train", train_bias), ("dev", dev_bias)):
            logits = np.stack([-(labels - 0.5), labels - 0.5], 1) + rng.normal(0, .3, (16, 2))
            self.logits[split] = ((logits + [0.0, bias]).astype(np.float32), labels)

    def predict(self, split):
        return self.logits[split]


def test_auto_calibrates_when_that_lowers_the_unadapted_dev_loss():
    from workers.scorer import Scorer

    assert Scorer.choose_calibration(Unadapted(train_bias=3.0, dev_bias=3.0)) is True
    # a bias on train alone: its offsets would push dev off, so dev says no
    assert Scorer.choose_calibration(Unadapted(train_bias=3.0, dev_bias=0.0)) is False
    auto = CFG.replace(**{"eval.calibrate": "auto"})
    w = EvalWorker(auto, loaded=tiny.model("gpt2"), splits=tiny.splits())
    dev, train = [w.predict("dev")], [w.predict("train")]
    better = combine_scores(dev, auto, train)["loss"] < combine_scores(dev, auto)["loss"]
    assert w.calibrate == better
    assert ("label_offsets" in w.score("test")) == better


def test_example_shards_are_refused_under_calibration(worker):
    with pytest.raises(DfoloraError, match="eval.calibrate"):
        worker.batch_terms(1, np.zeros((2, worker.dim)), (0, 2))
    with pytest.raises(ConfigError, match="example_shards"):
        RunConfig.from_dict({**SETTINGS, "cluster": {"example_shards": 2}})
    RunConfig.from_dict({**SETTINGS, "cluster": {"example_shards": "auto"}})  # resolves to 1
    with pytest.raises(ConfigError, match="eval.calibrate"):
        RunConfig.from_dict({"eval": {"calibrate": "yes"}})


def test_a_bare_off_in_yaml_means_off():
    """YAML reads `off` as false (`--set eval.calibrate=off`, a config file's `calibrate: off`)."""
    import yaml

    cfg = RunConfig.from_dict(yaml.safe_load("eval: {calibrate: off, rescore_commits: on}"))
    assert cfg.eval.calibrate == "off" and cfg.eval.rescore_commits == "on"
    with pytest.raises(ConfigError, match="eval.calibrate must be one of"):
        RunConfig.from_dict({"eval": {"calibrate": True}})  # "on" is not one of its words


def test_a_run_exports_its_offsets_and_export_carries_them(tmp_path):
    cfg = CFG.replace(budget=16, **{"optimizer.popsize": 4})
    ev = LocalEvaluator(cfg, loaded=tiny.model("gpt2"), splits=tiny.splits())
    result = run(cfg, tmp_path / "run", evaluator=ev)
    written = json.loads((tmp_path / "run" / ADAPTER / LABEL_OFFSETS).read_text())
    assert written["offsets"] == result.final["train"]["label_offsets"]
    assert result.final["test"]["label_offsets"] == written["offsets"]  # one rule, every split
    assert cli.main(["export", str(tmp_path / "run"), "--format", "peft", "--out",
                     str(tmp_path / "peft")]) == 0
    copied = json.loads((tmp_path / "peft" / LABEL_OFFSETS).read_text())
    assert copied == written
    plain = cfg.replace(**{"eval.calibrate": "off"})
    ev = LocalEvaluator(plain, loaded=tiny.model("gpt2"), splits=tiny.splits())
    run(plain, tmp_path / "plain", evaluator=ev)
    assert not (tmp_path / "plain" / ADAPTER / LABEL_OFFSETS).exists()


@pytest.mark.parametrize("offsets", ["mean", "fit"])  # eval.offsets: test_fitted_offsets.py
def test_the_fast_path_matches_the_plain_full_forward_under_calibration(offsets):
    # the reference hooks every layer
    every_layer = CFG.replace(**{"schedule.layers": None, "eval.offsets": offsets})
    worker = EvalWorker(every_layer, loaded=tiny.model("gpt2"), splits=tiny.splits())
    worker.commit(2, np.random.default_rng(1).standard_normal(worker.dim))
    z = np.random.default_rng(4).standard_normal((3, worker.dim))
    for layer in (1, 2):
        np.testing.assert_allclose(worker.evaluate(layer, z).losses,
                                   reference_losses(worker, layer, z), rtol=1e-5)


def test_an_empty_population_gives_empty_terms(worker):
    terms = worker.batch_terms(1, np.zeros((0, worker.dim)))
    assert terms.loss_sums.shape == (worker.train_batches, 0)
    assert terms.counts.sum() == len(worker.examples["train"])


def test_gradient_lora_scores_calibrated_and_exports_its_offsets(tmp_path):
    cfg = RunConfig.from_dict({**SETTINGS, "eval": {"batch_size": 3, "train_batch_size": 3,
                                                     "calibrate": "train"}})
    result = train_lora(cfg, loaded=tiny.model("llama"), splits=tiny.splits(), lr=1e-2,
                        epochs=2, out_dir=str(tmp_path))
    offsets = result["final"]["train"]["label_offsets"]
    assert result["final"]["test"]["label_offsets"] == offsets
    assert result["zero_shot"]["dev"]["label_offsets"]  # selection on calibrated dev too
    assert json.loads((tmp_path / LABEL_OFFSETS).read_text())["offsets"] == offsets
