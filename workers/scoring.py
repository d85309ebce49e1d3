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


def label_offsets(train_logits: torch.Tensor, labels: torch.Tensor | None = None,
                  rule: str = "mean") -> torch.Tensor:
    """`eval.calibrate`: the offsets subtracted from every label logit, (..., B, K) -> (..., 1, K)
    in float32, from the training examples' logits (and, for rule `fit`, their labels (B,)).

    Subtracted from every logit, they make a loss or a prediction blind to a constant added to
    one label's logits: the label bias that a frozen prompt carries (contextual calibration,
    Zhao et al. 2021; batch calibration, Zhou et al. 2024, with the training set as the batch).

    `mean` (`eval.offsets`, the default): each label's mean logit. The training split is
    class-balanced (k per class), so a centred label is predicted about as often as the others
    (docs/design.md §3). Summed in float64, where adding a few thousand float32 logits of like
    size is exact, so the offsets do not depend on the order the training split's shards arrive
    in (Ray actors score it in pieces). `fit`: see `fitted_offsets`.
    """
    if rule == "fit":
        if labels is None:
            raise ValueError("label_offsets(rule='fit') needs the training labels")
        return fitted_offsets(train_logits, labels)
    return train_logits.double().mean(-2, keepdim=True).float()


FIT_STEPS = 30  # Newton steps of `fitted_offsets` (a handful converge; more cost microseconds)


def fitted_offsets(train_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`eval.offsets=fit`: the offsets c that minimise the mean cross-entropy of
    softmax(logits - c) on the labelled training examples, (..., B, K) -> (..., 1, K) float32.

    This is a multinomial logistic regression with the logits as a fixed input and only the
    intercepts free (Platt scaling without the slope, Platt 1999; the bias-only form of
    Guo et al. 2017's vector scaling). Where the two classes' margins are skewed, the mean of
    the margins is not the accuracy-optimal threshold, and this rule moves the threshold to
    where the training examples' likelihood is highest. Convex in c; unique up to a constant
    added to every label (which no loss or argmax sees), fixed by starting from the `mean`
    offsets and taking Newton steps that sum to zero (docs/design.md §3).

    Deterministic and order-free: every leading index's rows are first put in a canonical
    order (by label, then by each logit), so the float64 sums, and so the offsets' bits, do not
    depend on the order the training examples arrive in. Each step is clipped to 1 logit per
    label, which keeps Newton's method safe where the curvature is tiny.
    """
    x = canonical_rows(train_logits.double(), labels)
    k = x.shape[-1] - 1
    y = torch.nn.functional.one_hot(x[..., 0].long(), k).double().mean(-2)  # (..., K)
    x = x[..., 1:]
    c = x.mean(-2, keepdim=True)
    ones = torch.ones(k, k, dtype=torch.float64)
    for _ in range(FIT_STEPS):
        p = torch.softmax(x - c, -1)
        grad = y - p.mean(-2)  # d loss / d c
        hess = torch.diag_embed(p.mean(-2)) - p.transpose(-1, -2) @ p / p.shape[-2]
        # H 1 = 0 and grad sums to 0: H + 1 1^T is invertible and keeps the step's sum at 0
        step = torch.linalg.solve(hess + ones, grad.unsqueeze(-1)).squeeze(-1)
        c = c - step.clamp(-1.0, 1.0).unsqueeze(-2)
    return c.float()


def canonical_rows(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[label, logits...] rows, (..., B, K) -> (..., B, 1 + K), sorted along B by label, then
    by each logit in turn (stable sorts from the last key to the first, as a lexsort)."""
    rows = torch.cat([labels.to(logits.dtype).expand(logits.shape[:-1]).unsqueeze(-1), logits],
                     -1)
    for col in reversed(range(rows.shape[-1])):
        order = rows[..., col].argsort(dim=-1, stable=True)
        rows = rows.gather(-2, order.unsqueeze(-1).expand(rows.shape))
    return rows


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
