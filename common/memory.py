"""Peak memory of this process, the one figure every method's results.json reports.

On CPU: the process's peak resident set size (`peak_rss_mb`, `getrusage`), which includes the
interpreter and libraries, so compare methods run in fresh processes (the CLI runs one method
per process). On CUDA: `torch.cuda.max_memory_allocated` (tensors only, what the method itself
needs), which belongs to the workers: workers/memory.py. common/ imports no torch.

`peak_memory_mb(device)` stays here, with the same figures, for the workers module that still
imports it from common (workers/worker.py): its CUDA branch reads the torch module its caller
has loaded (a CUDA device exists only once torch is imported) rather than importing it. Once it
imports workers.memory this can go.
"""

from __future__ import annotations

import resource
import sys


def peak_rss_mb() -> float:
    """The process's peak resident set size in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def peak_memory_mb(device: object = None) -> float:
    if str(device).startswith("cuda"):
        return sys.modules["torch"].cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()
