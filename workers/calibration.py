"""Calibration statistics of a worker's searched layers (docs/design.md §2): the spreads the
projection maps are scaled by and, with a data basis, the principal directions of the q/k inputs.
"""

from __future__ import annotations

import torch

from workers import fastpath, models
from workers.projection import CalibrationStats, principal_directions, robust_std


@torch.no_grad()
def calibrate(worker, files: models.WeightFiles | None) -> CalibrationStats:
    """Robust spreads of q/k inputs and layer inputs on the training data, zero adapter.

    Searched layers only (None for the others), one layer at a time: the values are those
    a full forward gives, taken in the same order, so the statistics are bit-identical to
    collecting every layer in one pass.
    """
    qk: list[float | None] = [None] * worker.n_layers
    hidden: list[float | None] = [None] * worker.n_layers
    basis = worker.cfg.adapter.basis
    bases: list[list | None] | None = None if basis == "random" else [None] * worker.n_layers
    masks = [state.batch.attention_mask.bool() for state in worker.states]
    for layer in sorted(worker.searched):
        worker.advance_states(layer)
        pairs = list(zip(worker.states, masks, strict=True))
        hidden[layer] = robust_std(torch.cat([s.hidden[layer][m].float() for s, m in pairs]))
        module = worker.arch.sites[layer][0].module
        inputs = torch.cat([
            fastpath.module_input(worker.arch, s, layer, module)[m].float() for s, m in pairs])
        qk[layer] = robust_std(inputs)
        if bases is not None:  # adapter.basis: A's row space (docs/design.md §2)
            p = min(worker.cfg.adapter.basis_rank, inputs.shape[1])
            bases[layer] = principal_directions(inputs, p, centred=basis == "input-pca")
    table = worker.model.get_input_embeddings()
    step = max(1, table.weight.shape[0] // 4096)  # a fixed row sample: 128k-word vocabularies
    emb = files.sample_rows(table, step) if files is not None else table.weight[::step]
    return CalibrationStats(qk_input=tuple(qk), hidden=tuple(hidden),
                            embedding=robust_std(emb),
                            bases=tuple(bases) if bases is not None else None)
