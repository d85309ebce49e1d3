"""Peak memory: common/ computes the CPU figure without torch, workers/ the CUDA one."""

import sys
from types import SimpleNamespace

import pytest

from common import memory


def fake_cuda(peak_bytes: int) -> SimpleNamespace:
    return SimpleNamespace(max_memory_allocated=lambda device: peak_bytes)


def test_cpu_figure_is_the_peak_rss():
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert peak <= memory.peak_rss_mb() <= peak + 64  # monotonic; a little may be added between
    assert memory.peak_memory_mb("cpu") >= peak and memory.peak_memory_mb(None) >= peak


def test_cuda_figure_comes_from_the_loaded_torch(monkeypatch):
    """common's transitional peak_memory_mb uses the torch its caller loaded, never imports it."""
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=fake_cuda(3 * 2**20)))
    assert memory.peak_memory_mb("cuda:0") == 3.0


def test_workers_figure_equals_commons():
    torch = pytest.importorskip("torch")
    from workers import memory as worker_memory

    cpu = torch.device("cpu")
    assert worker_memory.peak_memory_mb(cpu) == pytest.approx(memory.peak_memory_mb(cpu), abs=64)


def test_workers_cuda_figure(monkeypatch):
    torch = pytest.importorskip("torch")
    from workers import memory as worker_memory

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 5 * 2**20)
    assert worker_memory.peak_memory_mb("cuda:1") == 5.0 == memory.peak_memory_mb("cuda:1")
