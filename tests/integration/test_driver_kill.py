"""SIGKILL the real `dfolora run` process at chosen points, resume it, and get the uninterrupted
run's outputs bit for bit (docs/design.md §8-9).

The model is tests/tiny.py's random-weight GPT-2 saved as a local model folder, the task the
custom CSV task of tests/fixtures: a real CLI process on a real model whose whole search takes
about a second, so each process costs mostly its start-up (imports, model load). To keep the
number of processes down the interruptions form one chain on one run folder: the first process
and every resume but the last is stopped at the next point of `CHAIN`, the last resume runs to
the end; the uninterrupted reference runs beside the chain. A stop point is the number of lines
in metrics.jsonl (1 start, 2-3 round 0, 4 its dev record, ..., 17 the final record), so the
points are fixed while the exact moment of each signal is not: any moment must do. Two stops are
followed by damage to the latest checkpoint entry, which the next resume must report and skip.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tiny
import yaml
from harness import sigint_default
from safetensors.numpy import load_file

from orchestrator.checkpoint import CheckpointStore

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
# one thread in every process: the same arithmetic each time, and no spinning on a busy machine
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
TIMING = {"seconds", "wall_seconds", "candidates_per_s", "candidates_per_s_per_actor",
          "peak_memory_mb"}
LINES = 17  # start, 10 generations, 5 dev records, final


def truncate_arrays(store: Path, step: int) -> str:
    path = store / f"ckpt-{step:06d}.npz"
    path.write_bytes(path.read_bytes()[:100])
    return path.name


def flip_entry(store: Path, step: int) -> str:
    path = store / f"ckpt-{step:06d}.json"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return path.name


# (stop point, signal, damage done to the latest entry afterwards)
CHAIN = [
    ("config", signal.SIGKILL, None),  # config.yaml written: killed loading the model
    (1, signal.SIGKILL, None),  # the zero adapter scored; its entry may not be written yet
    (3, signal.SIGKILL, None),  # round 0 (Fireworks) done
    (5, signal.SIGINT, None),  # Ctrl-C in round 1 (CMA-ES): the CLI's own exit, code 130
    (7, signal.SIGKILL, truncate_arrays),
    (11, signal.SIGKILL, flip_entry),
    (14, signal.SIGKILL, None),  # round 4
    (LINES, signal.SIGKILL, None),  # the final record written: final plots, checkpoint, files
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved tiny GPT-2 and a config file for it with the fixtures' custom task."""
    root = tmp_path_factory.mktemp("kill")
    loaded = tiny.model("gpt2")
    loaded.model.save_pretrained(root / "model")
    loaded.tokenizer.save_pretrained(root / "model")
    cfg = yaml.safe_load((FIXTURES / "custom.yaml").read_text())
    for key in ("train_file", "test_file"):  # relative to the working directory there
        cfg["task"][key] = str(FIXTURES / cfg["task"][key])
    # seed 5: the best dev score comes after round 2 of 5, so the final adapter is neither the
    # zero adapter nor the last committed state
    cfg.update(seed=5, budget=80, model={"name": str(root / "model"), "max_length": 32},
               adapter={"dim": 16}, optimizer={"popsize": 8},
               schedule={"optimizers": ["fwa", "cma"], "layers": [2, 1]})
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    return root


def launch(root: Path, name: str, *args: str) -> tuple[subprocess.Popen, Path]:
    log = root / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", *args,
                                 "--progress", "quiet"], cwd=ROOT, env=ENV, stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=sigint_default)
    return proc, log


def reached(folder: Path, point) -> bool:
    if point == "config":
        return (folder / "config.yaml").exists()
    try:
        return (folder / "metrics.jsonl").read_bytes().count(b"\n") >= point
    except FileNotFoundError:
        return False


def stop_at(proc: subprocess.Popen, folder: Path, point, sig) -> None:
    deadline = time.monotonic() + 300
    while not reached(folder, point):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (code {proc.returncode}) before stop {point}")
        if time.monotonic() > deadline:
            raise AssertionError(f"stop {point} not reached in 300 s")
        time.sleep(0.003)
    proc.send_signal(sig)
    proc.wait(timeout=120)


@pytest.fixture(scope="module")
def runs(world):
    """(reference folder, chained folder, one record per process of the chain)."""
    ref, folder = world / "reference", world / "chain"
    reference, ref_log = launch(world, "reference", "--config", str(world / "config.yaml"),
                                "--out", str(ref))
    steps = []
    try:
        args = ["--config", str(world / "config.yaml"), "--out", str(folder)]
        damaged = None
        for n, (point, sig, damage) in enumerate(CHAIN):
            proc, log = launch(world, f"chain-{n}", *args)
            stop_at(proc, folder, point, sig)
            store = folder / "checkpoints"
            pointer = store / "LATEST"  # absent when the kill landed in the first save
            latest = pointer.read_text().strip() if pointer.exists() else None
            steps.append({"point": point, "signal": sig, "code": proc.returncode,
                          "output": log.read_text(), "resumed_damaged": damaged,
                          "latest_entry": latest})
            damaged = damage(store, int(latest)) if damage and latest else None
            args = ["--resume", "--out", str(folder)]
        proc, log = launch(world, "chain-last", *args)
        proc.wait(timeout=300)
        steps.append({"point": None, "signal": None, "code": proc.returncode,
                      "output": log.read_text(), "resumed_damaged": damaged})
        reference.wait(timeout=300)
    finally:
        reference.kill()
    assert reference.returncode == 0, ref_log.read_text()[-3000:]
    return ref, folder, steps


def untimed(record: dict) -> dict:
    return {k: untimed(v) if isinstance(v, dict) else v for k, v in record.items()
            if k not in TIMING}


def test_every_process_was_stopped_where_planned(runs):
    _, _, steps = runs
    for step in steps[:-1]:
        expected = 130 if step["signal"] == signal.SIGINT else -signal.SIGKILL
        assert step["code"] == expected, step
    assert steps[0]["latest_entry"] is None  # killed before its first checkpoint
    assert "interrupted: resume with `dfolora run --resume" in steps[3]["output"]
    assert steps[-1]["code"] == 0, steps[-1]["output"][-3000:]
    for step in steps[3:]:  # a resume from a checkpoint states that it trusts the folder
        assert "checkpoints hold pickled optimiser state; resume only folders you trust" in (
            step["output"])


def test_damaged_latest_entries_were_reported_and_skipped(runs):
    _, _, steps = runs
    reports = [(s["resumed_damaged"], s["output"]) for s in steps if s["resumed_damaged"]]
    assert [name.rsplit(".", 1)[1] for name, _ in reports] == ["npz", "json"]
    for name, output in reports:
        assert "warning: checkpoint entry" in output and f"is damaged ({name}: " in output, output


def test_outputs_equal_the_uninterrupted_runs_bit_for_bit(runs):
    ref, folder, _ = runs
    with np.load(ref / "best_vectors.npz") as a, np.load(folder / "best_vectors.npz") as b:
        assert sorted(a.files) == sorted(b.files) == ["layer_1", "layer_2"]
        for key in a.files:
            assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), key
        assert all(a[key].any() for key in a.files)
    tensors = [load_file(f / "adapter" / "adapter_model.safetensors") for f in (ref, folder)]
    assert sorted(tensors[0]) == sorted(tensors[1]) and len(tensors[0]) == 4  # A, B per c_attn
    for key, value in tensors[0].items():
        assert value.tobytes() == tensors[1][key].tobytes(), key
    # the committed vectors at the end (not an output: the last checkpoint entry's)
    entries = [CheckpointStore(f / "checkpoints").load() for f in (ref, folder)]
    assert entries[0].step == entries[1].step
    assert sorted(entries[0].arrays) == sorted(entries[1].arrays)
    for key, value in entries[0].arrays.items():
        assert value.tobytes() == entries[1].arrays[key].tobytes(), key
    for name in ("adapter/adapter_config.json", "config.yaml"):
        assert (ref / name).read_bytes() == (folder / name).read_bytes(), name
    results = [untimed(json.loads((f / "results.json").read_text())) for f in (ref, folder)]
    assert results[0] == results[1] and results[0]["evaluations"] == 80
    assert results[0]["best_dev"]["round"] == 2
    metrics = [[untimed(json.loads(line)) for line in (f / "metrics.jsonl").read_text()
                .splitlines()] for f in (ref, folder)]
    assert len(metrics[0]) == LINES and metrics[0] == metrics[1]
