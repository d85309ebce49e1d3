"""Peak memory of a worker process on its device, as results.json reports it (common/memory.py).

On CUDA the allocator's peak (`torch.cuda.max_memory_allocated`: tensors only, what the method
itself needs); elsewhere the process's peak resident set size. Also the C heap's settings that
keep that peak what a run uses (eval.lean_heap, docs/design.md §7).
"""

from __future__ import annotations

import ctypes
import gc

import torch

from common.memory import peak_rss_mb


def peak_memory_mb(device: torch.device | str | None = None) -> float:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def release_free_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the system (glibc's
    malloc_trim; elsewhere a no-op): memory freed while building a worker would otherwise stay in
    the process's resident set."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


LEAN_HEAP_BYTES = 8 << 20  # buffers this large or larger are mapped and unmapped on their own


def lean_heap(threshold: int = LEAN_HEAP_BYTES) -> bool:
    """Fix glibc's mmap and trim thresholds (mallopt M_MMAP_THRESHOLD, M_TRIM_THRESHOLD) at
    `threshold`: a population's activation buffers (tens of MB on CPU) are then given back to the
    system when freed. By default glibc raises the mmap threshold after each large free, the
    buffers come from the heap afterwards, and fragmentation keeps their pages resident: ~110 MB
    of the demo run's peak (docs/benchmarks.md). Process-wide; False where there is no glibc."""
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(-3, threshold)) and bool(libc.mallopt(-1, threshold))
    except (OSError, AttributeError):
        return False
