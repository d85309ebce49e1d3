"""Peak memory of a worker process on its device, as results.json reports it (common/memory.py).

On CUDA the allocator's peak (`torch.cuda.max_memory_allocated`: tensors only, what the method
itself needs); elsewhere the process's peak resident set size.
"""

from __future__ import annotations

import torch

from common.memory import peak_rss_mb


def peak_memory_mb(device: torch.device | str | None = None) -> float:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()
