import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Plots take about a second per run; the CLI test checks them (orchestrator/plots.py).
import orchestrator.plots  # noqa: E402

orchestrator.plots.ENABLED = False
