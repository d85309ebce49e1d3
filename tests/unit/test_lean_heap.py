"""eval.lean_heap: big freed buffers leave the resident set at once (glibc); a fresh process."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE = """
import sys, torch
from workers.worker import lean_heap
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1])
if sys.argv[1] == 'lean':
    assert lean_heap()
base = rss()
for n in range(6, 0, -1):  # shrinking buffers: the pattern that strands freed heap pages
    x = torch.ones(n * 4_000_000)  # 16-96 MB
    y = torch.ones(1000)  # a small live allocation above it on the heap
    del x
    keep = y
print((rss() - base) // 1024)
"""


def resident_growth_mb(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists() or sys.platform != "linux",
                    reason="glibc and /proc only")
def test_freed_buffers_leave_the_resident_set():
    lean, default = resident_growth_mb("lean"), resident_growth_mb("default")
    assert lean < 4 and lean < default
