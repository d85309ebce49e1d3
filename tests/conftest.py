import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Test modules import Ray before any local cluster starts, and Ray reads this once, on import:
# without it init_ray refuses to start a local cluster (orchestrator/evaluation/pool.py).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
