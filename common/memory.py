"""Peak memory of this process, the one figure every method's results.json reports.

On CUDA: `torch.cuda.max_memory_allocated` (tensors only, what the method itself needs). On CPU:
the process's peak resident set size (`getrusage`), which includes the interpreter and libraries,
so compare methods run in fresh processes (the CLI runs one method per process).
"""

from __future__ import annotations

import resource
import sys


def peak_memory_mb(device: object = None) -> float:
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
