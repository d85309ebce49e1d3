"""Example shards: a population's training batches split among actors, losses combined exactly.

Shared by the worker (which scores a shard) and the Ray evaluator (which combines shards), so
both sides use one rule for the batches of a shard and one order for the sum (docs/design.md
§6, "Example shards"). The batches themselves are fixed by the data and
`eval.train_batch_size`, never by the shard count.

The canonical reduction: each batch contributes, per candidate, the float32 sum of its
examples' losses (and its count of correct answers), widened to float64; these batch terms are
added in batch order, starting from zero, and divided by the number of examples. Unsharded
scoring is the same reduction over all batches, so a sharded population gets the same bits.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class BatchTerms(NamedTuple):
    """What scoring candidates on a run of consecutive training batches gives."""

    first: int  # index of the first batch
    loss_sums: np.ndarray  # (batches, candidates) float64: each batch's summed example losses
    hits: np.ndarray  # (batches, candidates) float64: each batch's correct answers
    counts: np.ndarray  # (batches,) int64: examples per batch


def shard_range(n_batches: int, index: int, count: int) -> tuple[int, int]:
    """Batches [start, stop) of shard `index` of `count`: near-equal consecutive runs, larger
    first (np.array_split's rule)."""
    base, extra = divmod(n_batches, count)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


def combine_batches(terms: BatchTerms) -> tuple[np.ndarray, np.ndarray]:
    """(mean loss, accuracy) per candidate from the terms of every batch, in the canonical
    order: batch terms added one batch at a time, in batch order, then divided by the total."""
    loss = np.zeros(terms.loss_sums.shape[1], dtype=np.float64)
    hits = np.zeros_like(loss)
    for batch_loss, batch_hits in zip(terms.loss_sums, terms.hits, strict=True):
        loss += batch_loss
        hits += batch_hits
    total = int(np.sum(terms.counts))
    return loss / total, hits / total
