"""bench/gpu_eval.py on tiny CPU models: it runs end to end and reports every figure, sanely.

A subprocess, so its thread setting and allocations stay out of the test process.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KEYS = ("evals_per_s_stacked", "evals_per_s_single", "stacking_speedup",
        "inference_examples_per_s", "fraction_of_inference", "peak_mb_dfo", "peak_mb_lora_step",
        "memory_ratio")


def test_tiny_run_reports_every_figure(tmp_path):
    out_file = tmp_path / "gpu_eval.json"
    proc = subprocess.run([sys.executable, "bench/gpu_eval.py", "--tiny", "--popsize", "8",
                           "--out", str(out_file)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(out_file.read_text()) == last
    assert "stacking speed-up" in proc.stdout  # the readable table precedes the JSON
    assert last["tiny"] and last["device"] == "cpu" and last["popsize"] == 8
    assert set(last["models"]) == {"roberta-large", "gpt2-large"}
    for name, figures in last["models"].items():
        assert "errors" not in figures, (name, figures.get("errors"))
        for key in KEYS:
            assert isinstance(figures[key], float) and figures[key] > 0, (name, key, figures[key])
        # stacking as behaviour, not seconds (on a loaded CPU either can come out faster): the
        # stacked worker fits the whole population of 8 in one pass (the single one takes one
        # candidate per pass), and the speed-up is the ratio of the two measured rates
        assert figures["stack_size"] >= 8, figures["stack_size"]
        assert figures["stacking_speedup"] == pytest.approx(
            figures["evals_per_s_stacked"] / figures["evals_per_s_single"], rel=1e-3)
        assert figures["stacked_vs_single_max_abs_loss_diff"] < 1e-4  # same losses either way
        assert figures["train_examples"] == 32 and figures["lora_impl"] == "peft"
