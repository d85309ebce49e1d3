"""Losses and metrics over label-word logits (docs/design.md §3)."""

from __future__ import annotations

import numpy as np
import torch


def example_losses(logits: torch.Tensor, labels: torch.Tensor, loss: str,
                   margin: float = 2.0) -> torch.Tensor:
    """Per-example loss; logits (..., B, n_labels), labels (B,) -> (..., B), in float32.

    `ce`: cross-entropy over the label words. `hinge`: multi-class hinge with `margin`,
    sum over wrong classes of max(0, margin - s_y + s_j) divided by the number of classes
    (the normalisation of torch's MultiMarginLoss).
    """
    logits = logits.float()
    target = labels.expand(logits.shape[:-1])
    true = logits.gather(-1, target.unsqueeze(-1))
    if loss == "ce":
        return torch.logsumexp(logits, -1) - true.squeeze(-1)
    hinge = (margin - true + logits).clamp_min(0)
    hinge = hinge.scatter(-1, target.unsqueeze(-1), 0.0)
    return hinge.sum(-1) / logits.shape[-1]


def label_offsets(train_logits: torch.Tensor) -> torch.Tensor:
    """`eval.calibrate=train`: each label's mean logit over the training examples,
    (..., B, K) -> (..., 1, K) in float32.

    Subtracted from every logit, it makes a loss or a prediction blind to a constant added to
    one label's logits: the label bias that a frozen prompt carries (contextual calibration,
    Zhao et al. 2021; batch calibration, Zhou et al. 2024, with the training set as the batch).
    The training split is class-balanced (k per class), so a centred label is predicted about
    as often as the others (docs/design.md §3). Summed in float64, where adding a few thousand
    float32 logits of like size is exact, so the offsets do not depend on the order the
    training split's shards arrive in (Ray actors score it in pieces).
    """
    return train_logits.double().mean(-2, keepdim=True).float()


def f1_score(pred: np.ndarray, gold: np.ndarray, n_classes: int) -> float:
    """Binary F1 of class 1 for two classes, macro-F1 otherwise."""
    classes = [1] if n_classes == 2 else range(n_classes)
    scores = []
    for c in classes:
        tp = np.sum((pred == c) & (gold == c))
        denom = np.sum(pred == c) + np.sum(gold == c)
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores))


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, loss: str,
                           margin: float) -> dict:
    pred = logits.argmax(-1).cpu().numpy()
    gold = labels.cpu().numpy()
    return {
        "loss": float(example_losses(logits, labels, loss, margin).mean()),
        "accuracy": float(np.mean(pred == gold)),
        "f1": f1_score(pred, gold, logits.shape[-1]),
        "n": int(len(gold)),
        "predicted_counts": np.bincount(pred, minlength=logits.shape[-1]).tolist(),
    }
