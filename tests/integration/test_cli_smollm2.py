"""`dfolora run --preset smoke` on the real offline SmolLM2 and Rotten Tomatoes, then its exports.

One real run (about a minute on 2 cores) shared by the tests of this module.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from peft_check import label_logits

from common.config import RunConfig
from common.messages import LABEL_OFFSETS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", "--preset", "smoke",
                           "--out", str(out), "--progress", "lines"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def counted(metrics: dict, n: int) -> bool:
    """Metrics of n examples: the predicted classes add up to n, accuracy is a count over n."""
    hits = metrics["accuracy"] * n
    return (metrics["n"] == n and sum(metrics["predicted_counts"]) == n
            and abs(hits - round(hits)) < 1e-9)


def test_smoke_run_writes_every_output(smoke):
    out, proc = smoke
    assert "test accuracy" in proc.stdout and "zero-shot" in proc.stdout
    for name in ("config.yaml", "metrics.jsonl", "results.json", "best_vectors.npz",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "checkpoints/LATEST", "plots/loss.png", "plots/dev.png", "plots/throughput.png"):
        assert (out / name).is_file(), name
    cfg = RunConfig.from_dict(yaml.safe_load((out / "config.yaml").read_text()))
    assert cfg.budget == 40 and cfg.schedule.layers == (29, 28)
    results = json.loads((out / "results.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    sizes = {"train": 16, "dev": 16, "test": 40}  # smoke: k=8 per class, max_test 40
    for split in ("dev", "test"):
        assert counted(results["zero_shot"][split], sizes[split]), split
    for split in sizes:
        assert counted(results["final"][split], sizes[split]), split
    assert results["zero_shot"]["dev"] == records[0]["dev"]  # the start record's
    assert {s: results["final"][s] for s in sizes} == {s: records[-1][s] for s in sizes}
    assert results["evaluations"] == 40 and results["peak_memory_mb"] > 100
    assert results["wall_seconds"] > 0
    assert sum(r["event"] == "generation" for r in records) == 4
    adapter = json.loads((out / "adapter/adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "smollm2-135m"  # no local absolute paths
    assert len(adapter["target_modules"]) == 4  # q and k of layers 29 and 28


def test_peft_and_merged_exports_reproduce_the_runs_predictions(smoke, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from orchestrator.checkpoint import CheckpointStore
    from workers import models
    from workers.worker import EvalWorker

    out, _ = smoke
    cfg = RunConfig.from_dict(yaml.safe_load((out / "config.yaml").read_text()))
    entry = CheckpointStore(out / "checkpoints").load()
    worker = EvalWorker(cfg, stats=entry.payload["setup"]["calibration"])
    with np.load(out / "best_vectors.npz") as npz:
        for key in npz.files:
            worker.commit(int(key.removeprefix("layer_")), npz[key])
    ours, labels = worker.predict("test")
    results = json.loads((out / "results.json").read_text())
    # the smoke preset calibrates (eval.calibrate=auto: the default template's label bias makes
    # the unadapted dev loss lower when centred); the exported offsets give the run's accuracy
    offsets = json.loads((out / "adapter" / LABEL_OFFSETS).read_text())["offsets"]
    assert results["final"]["test"]["label_offsets"] == offsets
    assert ((ours - np.asarray(offsets, np.float32)).argmax(-1) == labels).mean() == pytest.approx(
        results["final"]["test"]["accuracy"])

    for fmt in ("peft", "merged"):
        proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "export", str(out),
                               "--format", fmt, "--out", str(tmp_path / fmt)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads((tmp_path / fmt / LABEL_OFFSETS).read_text())["offsets"] == offsets
    base = models.load(cfg.model).model
    peft = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    via_peft = label_logits(peft, worker)
    np.testing.assert_allclose(via_peft, ours, rtol=1e-3, atol=1e-4)
    assert (via_peft.argmax(-1) == ours.argmax(-1)).all()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    via_merged = label_logits(merged, worker)
    np.testing.assert_allclose(via_merged, ours, rtol=1e-3, atol=1e-4)
    assert (via_merged.argmax(-1) == ours.argmax(-1)).all()
