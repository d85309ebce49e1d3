"""The naive scorer: how the authors' code evaluates a candidate, kept as our yardstick.

Adapters stay unmerged on every layer (plain forward hooks adding `x A B`), each candidate runs a
full forward with full-vocabulary logits at every position, one candidate at a time. Tests check
the fast path against it; bench/eval_throughput.py times it.
"""

from __future__ import annotations

import numpy as np
import torch

from workers import fastpath
from workers.adapters import delta_hook
from workers.batches import Batch
from workers.head import label_rows
from workers.scoring import example_losses, label_offsets
from workers.worker import EvalWorker


@torch.no_grad()
def reference_losses(worker: EvalWorker, layer: int, population,
                     batches: list[Batch] | None = None) -> np.ndarray:
    """Mean training loss per candidate, scored the slow, plain way.

    `batches` defaults to the worker's training batches; the benchmark passes the whole training
    set as one padded batch, as the authors' code scores it.
    """
    batches = batches if batches is not None else [s.batch for s in worker.states]
    z_all = np.atleast_2d(np.asarray(population, dtype=np.float64))
    vectors = dict(worker.committed)
    for layer_i in range(worker.n_layers):  # pristine weights: every delta goes through hooks
        worker.merge(layer_i, committed=False)
    label_ids = worker.prompter.label_ids
    out = []
    try:
        for z in z_all:
            vectors[layer] = z
            handles = []
            for i, v in vectors.items():
                factors = worker.projector.factors(i, torch.from_numpy(v[None]))
                dtype = worker.pristine[i][0].dtype
                a_q, b_q, a_k, b_k = (f[0].to(dtype) for f in factors)
                q, k = worker.arch.sites[i]
                handles.append(q.module.register_forward_hook(delta_hook(q.cols, a_q, b_q)))
                handles.append(k.module.register_forward_hook(delta_hook(k.cols, a_k, b_k)))
            try:
                scored = []
                for batch in batches:
                    inputs = fastpath.model_inputs(batch, worker.kind)
                    logits = worker.model(**inputs).logits  # full vocabulary, every position
                    scored.append(label_rows(
                        fastpath.gather_positions(logits, batch.positions).T, label_ids).T)
                scored = torch.cat(scored).float()
                labels = torch.cat([b.labels for b in batches])
                if worker.calibrate:  # the batches are the training set
                    scored = scored - label_offsets(scored, labels, worker.cfg.eval.offsets)
                per = example_losses(scored, labels, worker.cfg.eval.loss,
                                     worker.cfg.eval.hinge_margin)
                out.append(float(per.double().sum()) / labels.shape[0])
            finally:
                for handle in handles:
                    handle.remove()
    finally:
        for layer_i in range(worker.n_layers):
            worker.merge(layer_i)
    return np.array(out)
