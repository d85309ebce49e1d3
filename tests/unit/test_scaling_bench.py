"""The scaling benchmark's bookkeeping (bench/scaling.py) on hand-made run folders."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "scaling.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("scaling_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def run_folder(path: Path, losses: list[list[float]], seconds: float, vector: float) -> Path:
    (path / "checkpoints").mkdir(parents=True)
    records = [{"event": "start", "loss_star": 1.0}] + [
        {"event": "generation", "losses": ls, "seconds": seconds} for ls in losses]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "checkpoints" / "LATEST").write_text("7")
    np.savez(path / "checkpoints" / "ckpt-000007.npz", vector_3=np.full(4, vector),
             snapshot_3=np.zeros(4))
    return path


def test_search_time_and_throughput_come_from_the_generations(bench, tmp_path):
    m = bench.measure(run_folder(tmp_path / "a", [[0.5, 0.4]] * 3, 2.0, 1.0))
    assert m["search_seconds"] == 6.0 and m["evaluations"] == 6
    assert m["candidates_per_s"] == 1.0


def test_fingerprint_sees_one_changed_loss_bit_and_the_final_vectors(bench, tmp_path):
    a = bench.measure(run_folder(tmp_path / "a", [[0.5, 0.4]], 1.0, 1.0))
    slower = bench.measure(run_folder(tmp_path / "b", [[0.5, 0.4]], 9.0, 1.0))
    nudged = bench.measure(run_folder(tmp_path / "c", [[0.5, np.nextafter(0.4, 1)]], 1.0, 1.0))
    moved = bench.measure(run_folder(tmp_path / "d", [[0.5, 0.4]], 1.0, 2.0))
    assert a["fingerprint"] == slower["fingerprint"]  # time is not part of the trajectory
    assert a["fingerprint"] != nudged["fingerprint"]
    assert a["fingerprint"] != moved["fingerprint"]


def test_table_and_json_line(bench, tmp_path, monkeypatch, capsys):
    for n, seconds in ((0, 4.0), (2, 2.5)):
        out = tmp_path / f"actors-{n}"
        run_folder(out, [[0.5, 0.4]] * 2, seconds, 1.0)
        (out / "results.json").write_text("{}")  # finished: the bench measures, runs nothing
    monkeypatch.setattr(sys, "argv", ["scaling.py", "--actors", "0", "2", "--out",
                                      str(tmp_path)])
    bench.main()
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["scaling"]
    assert [r["actors"] for r in rows] == [0, 2]
    assert rows[1]["speedup"] == 1.6 and rows[1]["efficiency"] == 0.8
    assert all(r["identical"] for r in rows) and rows[0]["mode"] == "cpu"
