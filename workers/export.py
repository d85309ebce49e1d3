"""The final adapter in PEFT's LoRA format, built from a worker's committed vectors.

Our delta on a projection is `x A B` with A (in, r), B (r, out) and no scaling (adapters.py);
PEFT's LoRA adds `(x lora_A^T) lora_B^T * lora_alpha / r` (Hu et al. 2021; PEFT `LoraLayer`).
So `lora_A = A^T`, `lora_B = B^T` and `lora_alpha = r`, exactly. A fused projection (GPT-2's
`c_attn`, Phi-3's `qkv_proj`, GPT-NeoX's and Falcon's `query_key_value`) holds q, k and v in one
module, and PEFT's LoRA covers the whole of it: its adapter has rank 2r, lora_A stacking A_q^T
over A_k^T and lora_B holding B_q^T on q's output features, B_k^T on k's and zeros on v's (and
on the other block's), which is the same delta, exactly, in a form PEFT loads.

Only numpy leaves this module: the driver writes the files (safetensors + JSON, never pickle,
orchestrator/runfolder.py) without importing torch, whichever process scored the candidates.
"""

from __future__ import annotations

import numpy as np
import torch

from workers.adapters import Projection


def peft_adapter(worker) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors, adapter_config) of the worker's committed vectors, one entry per q/k module."""
    names = {id(module): name for name, module in worker.model.named_modules()}
    tensors: dict[str, np.ndarray] = {}
    targets: list[str] = []
    r = worker.cfg.adapter.rank
    fused = transposed = False
    for layer in sorted(worker.committed):
        z = torch.from_numpy(worker.committed[layer][None])
        a_q, b_q, a_k, b_k = (f[0].double().cpu() for f in worker.projector.factors(layer, z))
        q, k = worker.arch.sites[layer]
        if q.attr == k.attr:  # fused q/k/v
            fused, transposed = True, q.transposed
            parts = {_name(names, q): _fused_factors(q, k, (a_q, b_q), (a_k, b_k))}
        else:
            parts = {_name(names, q): (a_q.T, b_q.T), _name(names, k): (a_k.T, b_k.T)}
        for name, (lora_a, lora_b) in parts.items():
            targets.append(name)
            tensors[f"base_model.model.{name}.lora_A.weight"] = lora_a.float().numpy()
            tensors[f"base_model.model.{name}.lora_B.weight"] = lora_b.float().numpy()
    rank = 2 * r if fused else r
    config = {
        "peft_type": "LORA", "task_type": None, "r": rank, "lora_alpha": rank,
        "target_modules": targets, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": transposed, "init_lora_weights": True, "inference_mode": True,
        "base_model_name_or_path": worker.cfg.model.name, "modules_to_save": None,
        "revision": None, "use_rslora": False, "use_dora": False,
    }
    return {key: np.ascontiguousarray(v) for key, v in tensors.items()}, config


def _name(names: dict[int, str], proj: Projection) -> str:
    return names[id(proj.module)]


def _fused_factors(q: Projection, k: Projection, fq, fk) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-2r factors for a fused q/k/v module: zero B rows everywhere but q's and k's."""
    (a_q, b_q), (a_k, b_k) = fq, fk
    r = a_q.shape[1]
    width = q.module.weight.shape[1 if q.transposed else 0]
    lora_a = torch.cat([a_q.T, a_k.T])  # (2r, in)
    lora_b = torch.zeros(width, 2 * r, dtype=lora_a.dtype)
    lora_b[_cpu(q.cols), :r] = b_q.T
    lora_b[_cpu(k.cols), r:] = b_k.T
    return lora_a, lora_b



def _cpu(cols):
    return cols.cpu() if isinstance(cols, torch.Tensor) else cols
