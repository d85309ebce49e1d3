"""The start-up self-check: the fast path against the model's own forward (docs/design.md §7).

Before any search, every worker scores two random candidates for its lowest searched layer on its
first training batch twice: through the fast path (cached hidden states, the two stacked, their
deltas applied by the stacked wrappers, the label-only output path of workers/head.py), and through
the model's own full forward, one candidate at a time, its deltas added to the outputs of the real
query/key projections by plain forward hooks, with full-vocabulary logits. If the label logits
differ beyond floating-point tolerance, the worker refuses to run with one line naming the model
type and the discrepancy: a model the fast path gets wrong is never scored silently.

A worker that keeps the layers below its searched ones off memory (docs/design.md §7, "frozen
prefix") runs that forward with those layers, and every parameter outside the layers, read from
the model's files (`fastpath.layers_from`, `WeightFiles`), so the check leaves none of them
resident.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from common.errors import ModelError
from common.seeding import derive_seed
from workers import fastpath
from workers.adapters import delta_hook
from workers.batches import Batch
from workers.head import label_rows

# largest |fast - own| over the label logits, relative to the largest |own|, that is rounding
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@dataclass(frozen=True)
class SelfCheck:
    error: float  # max |fast - own| / max |own| over the label logits
    tolerance: float
    seconds: float


@torch.no_grad()
def self_check(worker) -> SelfCheck:
    """Compare the fast path with the model's own forward; ModelError if they differ."""
    start = time.perf_counter()
    layer, state = worker.first, worker.states[0]
    rng = np.random.default_rng(derive_seed(worker.cfg.seed, "self-check"))
    z = torch.from_numpy(rng.standard_normal((2, worker.dim)) * worker.cfg.optimizer.sigma0)
    worker.advance_states(layer)
    worker.merge(layer, committed=False)  # as in evaluate: candidates replace the committed
    try:
        fast = worker._stacked(layer, state, z).double()
        own = torch.stack([own_logits(worker, layer, state.batch, z[i:i + 1])
                           for i in range(z.shape[0])]).double()
    finally:
        worker.merge(layer)
    error = float((fast - own).abs().max() / own.abs().max().clamp_min(1e-12))
    tolerance = TOLERANCE.get(worker.pristine[layer][0].dtype, 5e-2)
    if not error <= tolerance:  # NaN fails too
        config = worker.model.config
        raise ModelError(
            f"model type '{config.model_type}' ({type(worker.model).__name__}) failed the "
            f"start-up self-check: the fast path's label logits differ from the model's own "
            f"forward by {error:.2e} (relative; rounding allows {tolerance:.0e}): its layers or "
            "output head are not supported, and its losses would be wrong")
    return SelfCheck(error, tolerance, time.perf_counter() - start)


def own_logits(worker, layer: int, batch: Batch, z: torch.Tensor) -> torch.Tensor:
    """Label logits of `batch` by the model's own forward with candidate `z` (1, d) at `layer`
    added by forward hooks (every other layer as the worker holds it)."""
    dtype = worker.pristine[layer][0].dtype
    a_q, b_q, a_k, b_k = (f[0].to(dtype) for f in worker.projector.factors(layer, z))
    q, k = worker.arch.sites[layer]
    handles = [q.module.register_forward_hook(delta_hook(q.cols, a_q, b_q)),
               k.module.register_forward_hook(delta_hook(k.cols, a_k, b_k))]
    inputs = fastpath.model_inputs(batch, worker.kind)
    files = worker._files
    try:
        if files is None:
            logits = worker.model(**inputs).logits
        else:
            arch = worker.arch
            outside = files.read(worker.model, skip=(arch.layers,))
            with fastpath.layers_from(arch, worker.first, lambda i: files.read(arch.layers[i])):
                logits = torch.func.functional_call(worker.model, outside, (), inputs).logits
    finally:
        for handle in handles:
            handle.remove()
    scored = fastpath.gather_positions(logits, batch.positions)
    return label_rows(scored.T, worker.prompter.label_ids).T
