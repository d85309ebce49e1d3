"""Checkpoints and exact resume: stop after generation g, resume, and get the uninterrupted run.

"Identical" is bit for bit: every loss of every generation record, every loss*, dev and final
score, and the final committed and best-dev vectors. On the synthetic objective (all optimiser
kinds, both accept rules and alternation modes) and on a tiny random-weight GPT-2 through the
driver's own in-process evaluator.
"""

import json

import numpy as np
import pytest
import tiny
import yaml
from layered import LayeredQuadratic

from common.config import RunConfig
from common.errors import ConfigError
from orchestrator import checkpoint
from orchestrator.checkpoint import CheckpointStore
from orchestrator.driver import run


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch):
    monkeypatch.setattr(checkpoint, "FSYNC", False)  # durability is not under test here


CASES = {
    "cma": {"optimizers": ["cma"]},
    "cma-fwa-xbest": {"optimizers": ["cma", "fwa"], "accept": "xbest"},
    "fwadyn-nevergrad-by-layer": {"optimizers": ["fwa-dyn", "nevergrad:OnePlusOne"],
                                  "alternate": "layer", "layers": [3, 0, 2]},
}


def config(budget=90, **schedule) -> RunConfig:
    return RunConfig.from_dict({"seed": 5, "budget": budget, "adapter": {"dim": 8},
                                "optimizer": {"popsize": 6, "sigma0": 0.5},
                                "schedule": schedule})


TIMING = {"seconds", "wall_seconds", "candidates_per_s", "candidates_per_s_per_actor"}


def untimed(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING}


def metrics_lines(folder) -> list[dict]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [untimed(json.loads(line)) for line in lines]


def trajectory(result) -> dict:
    """Everything a resumed run must reproduce exactly (wall-clock seconds excepted)."""
    return {
        "metrics": [untimed(r) for r in result.metrics],
        "dev": result.dev_history, "zero_shot": result.zero_shot, "final": result.final,
        "best_dev": result.best_dev, "evaluations": result.evaluations,
        "vectors": {k: v.tobytes() for k, v in result.vectors.items()},
        "best_vectors": {k: v.tobytes() for k, v in result.best_vectors.items()},
    }


@pytest.mark.parametrize("case", CASES)
def test_resume_after_generation_g_is_bit_identical(tmp_path, case):
    cfg = config(**CASES[case])
    full = run(cfg, tmp_path / "full", evaluator=LayeredQuadratic())
    n, per_round = full.generations, len(cfg.schedule.layers or range(4))
    assert full.finished and n == 15
    for g in sorted({0, 1, per_round - 1, per_round, n // 2, n - 1, n}):
        folder = tmp_path / f"stop-{g}"
        part = run(cfg, folder, evaluator=LayeredQuadratic(), stop_after=g)
        assert not part.finished and part.generations == g and part.final is None
        resumed = run(None, folder, evaluator=LayeredQuadratic(), resume=True)
        assert resumed.finished
        assert trajectory(resumed) == trajectory(full), f"stopped after generation {g}"
        assert metrics_lines(folder) == metrics_lines(tmp_path / "full")


def test_several_interruptions_and_a_damaged_latest_entry(tmp_path):
    cfg = config(**CASES["cma-fwa-xbest"])
    full = run(cfg, tmp_path / "full", evaluator=LayeredQuadratic())
    folder = tmp_path / "run"
    run(cfg, folder, evaluator=LayeredQuadratic(), stop_after=3)
    run(cfg, folder, evaluator=LayeredQuadratic(), resume=True, stop_after=8)
    # a torn write of the newest entry: resume falls back to the one before it
    store = folder / "checkpoints"
    latest = int((store / "LATEST").read_text())
    (store / f"ckpt-{latest:06d}.json").write_text('{"format": 1, "step": ')
    (store / "leftover.tmp").write_bytes(b"partial")
    resumed = run(cfg, folder, evaluator=LayeredQuadratic(), resume=True)
    assert trajectory(resumed) == trajectory(full)
    assert not (store / "leftover.tmp").exists()


def test_folder_keeps_two_entries_and_only_the_files_they_use(tmp_path):
    cfg = config(budget=60, optimizers=["cma", "fwa"])
    run(cfg, tmp_path, evaluator=LayeredQuadratic())
    store = tmp_path / "checkpoints"
    latest = int((store / "LATEST").read_text())
    entries = sorted(p.name for p in store.glob("ckpt-*"))
    assert entries == [f"ckpt-{s:06d}{ext}" for s in (latest - 1, latest)
                       for ext in (".json", ".npz")]
    used = set()
    for s in (latest - 1, latest):
        used |= {o["file"] for o in json.loads((store / f"ckpt-{s:06d}.json").read_text())
                 ["optimizers"]}
    stems = {p.name.rsplit(".", 1)[0] for p in store.glob("opt-*")}
    assert stems == used
    # 4 layers x 2 methods; CMA-ES states carry a pickle, Fireworks states are plain JSON
    entry = CheckpointStore(store).load()
    assert len(entry.optimizers) == 8
    assert all(isinstance(s["algo"].get("pickle"), bytes) == (m == "cma")
               for (_, m), s in entry.optimizers.items())
    # exported results are pickle-free
    with np.load(tmp_path / "best_vectors.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == [f"layer_{k}" for k in range(4)]
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["finished"] and summary["evaluations"] <= 60
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == cfg.to_dict()


def test_resume_refusals_and_conveniences(tmp_path):
    cfg = config(budget=30)
    with pytest.raises(ConfigError, match="nothing to resume"):
        run(None, tmp_path / "empty", evaluator=LayeredQuadratic(), resume=True)
    fresh = run(cfg, tmp_path / "a", evaluator=LayeredQuadratic(), resume=True)  # starts fresh
    assert fresh.finished
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        run(cfg, tmp_path / "a", evaluator=LayeredQuadratic())
    run(cfg, tmp_path / "b", evaluator=LayeredQuadratic(), stop_after=2)
    with pytest.raises(ConfigError, match=r"differs from the checkpoint's at budget, seed"):
        run(cfg.replace(budget=60, seed=6), tmp_path / "b", evaluator=LayeredQuadratic(),
            resume=True)
    # a finished run resumes to its stored result without touching an evaluator
    again = run(None, tmp_path / "a", evaluator=None, resume=True)
    assert trajectory(again) == trajectory(fresh)


# -- a tiny random-weight model through the driver's own in-process evaluator ----------------

TINY = {"task": {"template": "{text} it was", "label_words": ["bad", "great"], "k": 4},
        "eval": {"batch_size": 3, "train_batch_size": 3, "max_stack_tokens": 100},
        "adapter": {"dim": 16}, "optimizer": {"popsize": 4, "sigma0": 1.0}, "budget": 40,
        "schedule": {"optimizers": ["cma", "fwa"]}}


@pytest.fixture
def tiny_world(monkeypatch):
    """The default model and data loaders replaced by tests/tiny.py's; counts calibrations.
    One torch thread: on a busy 2-core machine two threads make these tiny matmuls ~40x slower
    (they spin-wait for each other)."""
    import torch

    from workers import models, worker

    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    monkeypatch.setattr(models, "load", lambda cfg: tiny.model("gpt2"))
    monkeypatch.setattr(worker, "load_splits", lambda cfg: tiny.splits())
    calls = []
    calibrate = worker.EvalWorker._calibrate
    monkeypatch.setattr(worker.EvalWorker, "_calibrate",
                        lambda self: calls.append(1) or calibrate(self))
    yield calls
    torch.set_num_threads(threads)


def test_tiny_model_resume_is_bit_identical(tmp_path, tiny_world):
    cfg = RunConfig.from_dict(TINY)
    full = run(cfg, tmp_path / "full")
    assert full.finished and full.generations == 10
    assert full.metrics[-1]["loss_star"] < full.zero_shot["train_loss"]  # it does learn
    assert full.final["train"]["n"] == 8
    for g in (3, 7):  # 3: the end of round 0, its dev evaluation still to come
        folder = tmp_path / f"stop-{g}"
        run(cfg, folder, stop_after=g)
        calibrations = len(tiny_world)
        resumed = run(None, folder, resume=True)
        assert len(tiny_world) == calibrations  # the stored statistics were used
        assert trajectory(resumed) == trajectory(full)
