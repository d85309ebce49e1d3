"""`dfolora sweep` for real: three runs of a tiny saved GPT-2 (tests/tiny.py) on the fixtures'
custom task, one at a time; Ctrl-C (SIGINT to the sweep's process group, as a terminal sends
it) while the second runs; the same command again skips the first, resumes the second from its
checkpoint and runs the third, then prints the compare table of all three."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny
import yaml
from harness import sigint_default

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    loaded = tiny.model("gpt2")
    loaded.model.save_pretrained(root / "model")
    loaded.tokenizer.save_pretrained(root / "model")
    cfg = yaml.safe_load((FIXTURES / "custom.yaml").read_text())
    for key in ("train_file", "test_file"):
        cfg["task"][key] = str(FIXTURES / cfg["task"][key])
    cfg.update(budget=160, model={"name": str(root / "model"), "max_length": 32},
               adapter={"dim": 16}, optimizer={"popsize": 8},
               schedule={"optimizers": ["fwa", "cma"], "layers": [2, 1]})
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def sweep(config: Path, root: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "sweep", "--config",
                             str(config), "--seeds", "5", "6", "7", "--root", str(root)],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=sigint_default)


def lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_an_interrupted_sweep_resumes(config, tmp_path):
    root = tmp_path / "grid"
    first, second, third = (root / f"tiny-seed{s}" for s in (5, 6, 7))
    proc = sweep(config, root)
    deadline = time.monotonic() + 300
    while lines(second / "metrics.jsonl") < 3:  # the second run is in round 0 or 1
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the second run did not start in 300 s"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in err
    assert (first / "results.json").exists() and not (second / "results.json").exists()
    assert (second / "checkpoints" / "LATEST").exists() and not third.exists()
    assert "tiny-seed5" in out  # the compare table of what finished
    kept = (first / "results.json").read_bytes()

    proc = sweep(config, root)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "tiny-seed5: finished before, skipped" in err
    assert "tiny-seed6: resuming" in err and "tiny-seed7: starting" in err
    assert "resuming from" in (root / "logs" / "tiny-seed6.log").read_text()
    assert (first / "results.json").read_bytes() == kept
    table = out.strip().splitlines()
    assert table[0].split()[:2] == ["run", "method"] and len(table) == 4
    for folder, seed in ((first, 5), (second, 6), (third, 7)):
        results = json.loads((folder / "results.json").read_text())
        assert results["seed"] == seed and results["evaluations"] == 160
