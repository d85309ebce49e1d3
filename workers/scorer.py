"""Scoring a model as it stands on a split: one place for every method's prompts, batches and head.

`Scorer` holds what makes two methods' scores comparable: the task's prompts and label words
(`Prompter`), the padded batches of each split at the configured sizes, and the label-word head on
the model's own output path (workers/head.py). `EvalWorker` (the derivative-free search),
`LoraRun` (the gradient baseline) and `dfolora zero-shot` (through an `EvalWorker`) all score
through it, so a split's loss and accuracy mean the same thing for each (docs/design.md §3).
"""

from __future__ import annotations

import numpy as np
import torch

from common import loaders
from common.config import RunConfig
from common.data import Splits
from common.errors import DfoloraError
from common.tasks import resolve_template, task_spec
from workers import fastpath, models
from workers.batches import Batch, Prompter
from workers.head import LabelHead
from workers.scoring import classification_metrics, label_offsets


def load_splits(cfg: RunConfig) -> Splits:
    """The run's few-shot train/dev and its test split (common/loaders.py: files, hub, offline)."""
    return loaders.load_splits(cfg.task, cfg.seed)


def model_max_length(model, wanted: int) -> int:
    """`wanted`, capped by the model's position table (RoBERTa reserves two positions)."""
    cfg = model.config
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if limit and cfg.model_type in ("roberta", "xlm-roberta"):
        limit -= 2
    return min(wanted, limit) if limit else wanted


def combine_scores(parts: list[tuple[np.ndarray, np.ndarray]], cfg: RunConfig,
                   train: list[tuple[np.ndarray, np.ndarray]] | None = None) -> dict:
    """Metrics of a split from the (logits, labels) of its shards, in any order; given the
    training split's shards `train` (a calibrated run, `eval.calibrate`), of the logits less
    their label offsets (workers/scoring.py), which the metrics then list as `label_offsets`."""
    logits = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    if train is None:
        return classification_metrics(logits, labels, cfg.eval.loss, cfg.eval.hinge_margin)
    offsets = label_offsets(torch.from_numpy(np.concatenate([p[0] for p in train])),
                            torch.from_numpy(np.concatenate([p[1] for p in train])),
                            cfg.eval.offsets)
    metrics = classification_metrics(logits - offsets, labels, cfg.eval.loss,
                                     cfg.eval.hinge_margin)
    return {**metrics, "label_offsets": offsets[0].tolist()}  # what was subtracted (exported)


class Scorer:
    """Label logits and metrics of `loaded.model` with whatever weights or adapter it carries.

    Training batches hold `eval.train_batch_size` examples, dev and test batches
    `eval.batch_size`; every batch is on the model's device.
    """

    def __init__(self, cfg: RunConfig, loaded: models.LoadedModel, splits: Splits):
        self.cfg = cfg
        self.model, self.kind, self.device = loaded.model, loaded.kind, loaded.device
        spec = task_spec(cfg.task)
        self.metric = spec.metric  # the selection metric (orchestrator/schedule.py's rule)
        template = resolve_template(spec, self.kind, cfg.task.template, cfg.task.label_words)
        self.prompter = Prompter(loaded.tokenizer, self.kind, spec, template, cfg.task,
                                 model_max_length(self.model, cfg.model.max_length))
        self.examples = {"train": splits.train, "dev": splits.dev, "test": splits.test}
        sizes = {"train": cfg.eval.train_batch_size, "dev": cfg.eval.batch_size,
                 "test": cfg.eval.batch_size}
        self.batches = {
            name: [b.to(self.device) for b in self.prompter.batches(examples, sizes[name])]
            for name, examples in self.examples.items()
        }
        self.head = LabelHead(self.model, self.prompter.label_ids)
        self.calibrate = cfg.eval.calibrate == "train"  # `auto`: see choose_calibration

    def logits(self, batch: Batch) -> torch.Tensor:
        """Label logits for one batch: a plain full forward of the model as it stands (with
        autograd where the model has trainable parameters, as gradient LoRA needs)."""
        hidden = self.model.base_model(**fastpath.model_inputs(batch, self.kind)).last_hidden_state
        return self.head(fastpath.gather_positions(hidden, batch.positions))

    @torch.no_grad()
    def predict(self, split: str, shard: tuple[int, int] = (0, 1)) -> tuple[np.ndarray, np.ndarray]:
        """Label logits and gold labels of shard i of n of a split's batches.

        Shards let several workers score one large test split (70k DBPedia examples) between
        them; `combine_scores` turns the concatenated shards into the split's metrics.
        """
        if split not in self.batches:
            raise DfoloraError(f"unknown split '{split}'; expected train, dev or test")
        index, count = shard
        if not 0 <= index < count:
            raise DfoloraError(f"shard {shard} must be (i, n) with 0 <= i < n")
        batches = self.batches[split][index::count]
        if not batches:
            return np.zeros((0, len(self.prompter.label_ids)), np.float32), np.zeros(0, np.int64)
        logits = torch.cat(self.split_logits(split, batches, shard)).float().cpu().numpy()
        return logits, torch.cat([b.labels for b in batches]).cpu().numpy()

    def split_logits(self, split: str, batches: list[Batch],
                     shard: tuple[int, int]) -> list[torch.Tensor]:
        """The label logits of `batches` (shard `shard` of `split`), one tensor per batch;
        `EvalWorker` starts them from its stored hidden states instead."""
        return [self.logits(b) for b in batches]

    def score(self, split: str) -> dict:
        """Loss, accuracy and F1 of the model as it stands on 'train', 'dev' or 'test'
        (centred by the training split's label offsets when the run calibrates)."""
        parts = [self.predict(split)]
        train = None
        if self.calibrate:
            train = parts if split == "train" else [self.predict("train")]
        return combine_scores(parts, self.cfg, train)

    def choose_calibration(self) -> bool:
        """`eval.calibrate=auto`, called with the model unadapted: calibrate if that lowers the
        dev loss (dev is what settings are chosen on; its loss is finer than its accuracy on a
        few dozen examples). A function of the model and the data only, so a resumed run and
        every Ray actor choose alike. Returns the choice."""
        if self.cfg.eval.calibrate == "auto":
            dev, train = [self.predict("dev")], [self.predict("train")]
            raw = combine_scores(dev, self.cfg)["loss"]
            self.calibrate = combine_scores(dev, self.cfg, train)["loss"] < raw
        return self.calibrate
