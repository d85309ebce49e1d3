"""Label logits of any Hugging Face model (a PeftModel, a merged export) on a worker's batches.

A plain full forward with full-vocabulary logits: independent of the worker's fast path, so the
comparison checks the exported weights, not a shared shortcut.
"""

from __future__ import annotations

import numpy as np
import torch

from workers import fastpath
from workers.head import label_rows


@torch.no_grad()
def label_logits(model, worker, split: str = "test") -> np.ndarray:
    ids = worker.prompter.label_ids
    out = []
    for batch in worker.batches[split]:
        logits = model(**fastpath.model_inputs(batch, worker.kind)).logits
        gathered = fastpath.gather_positions(logits, batch.positions)
        out.append(label_rows(gathered.T, ids).T.float())
    return torch.cat(out).numpy()
