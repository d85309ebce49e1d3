"""Checkpoints and exact resume: stop after generation g, resume, and get the uninterrupted run.

"Identical" is bit for bit: every loss of every generation record, every loss*, dev and final
score, and the final committed and best-dev vectors. On the synthetic objective (all optimiser
kinds, both accept rules and alternation modes) and on a tiny random-weight GPT-2 through the
driver's own in-process evaluator. Then damage: every file of the latest entry truncated,
corrupted or lost, a crash at every write of a save, and resuming under a changed config.
"""

import hashlib
import json
import shutil
import warnings

import numpy as np
import pytest
import tiny
import yaml
from harness import run
from layered import LayeredQuadratic

from common.config import RunConfig
from common.errors import ConfigError
from orchestrator import checkpoint
from orchestrator.checkpoint import CheckpointError, CheckpointStore, CheckpointWarning

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
    damaged = f"ckpt-{latest:06d}.json: 22 bytes that do not match"
    with pytest.warns(CheckpointWarning, match=damaged):
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
                       for ext in (".json", ".npz", ".sha256")]
    used = set()
    for s in (latest - 1, latest):
        used |= {o["file"] for o in json.loads((store / f"ckpt-{s:06d}.json").read_text())
                 ["optimizers"]}
    stems = {p.name.rsplit(".", 1)[0] for p in store.glob("opt-*")}
    assert stems == used
    for s in (latest - 1, latest):  # each entry lists and matches every file it uses
        listed = verify_sums(store, s)
        assert {f"ckpt-{s:06d}.json", f"ckpt-{s:06d}.npz"} < listed
        assert {n.rsplit(".", 1)[0] for n in listed if n.startswith("opt-")} == {
            o["file"] for o in json.loads((store / f"ckpt-{s:06d}.json").read_text())
            ["optimizers"]}
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
    with pytest.raises(ConfigError, match=r"differs from the checkpoint's") as err:
        run(cfg.replace(budget=60), tmp_path / "b", evaluator=LayeredQuadratic(), resume=True)
    assert "\n  budget: 30 -> 60\n" in str(err.value) and "--force" in str(err.value)
    # a finished run resumes to its stored result without touching an evaluator
    again = run(None, tmp_path / "a", evaluator=None, resume=True)
    assert trajectory(again) == trajectory(fresh)


def verify_sums(store, step) -> set[str]:
    """The names an entry's checksum file lists, after checking each against the file."""
    listed = set()
    for line in (store / f"ckpt-{step:06d}.sha256").read_text().splitlines():
        digest, name = line.split("  ")
        assert hashlib.sha256((store / name).read_bytes()).hexdigest() == digest, name
        listed.add(name)
    return listed


# -- damage: the latest entry, LATEST itself, a crash in the middle of a save -------------------

def interrupted(tmp_path, cfg, stop=2):
    """(the uninterrupted run, a folder stopped after `stop` generations, its checkpoints)."""
    full = run(cfg, tmp_path / "full", evaluator=LayeredQuadratic())
    folder = tmp_path / "run"
    run(cfg, folder, evaluator=LayeredQuadratic(), stop_after=stop)
    return full, folder, folder / "checkpoints"


def latest_files(store) -> dict[str, str]:
    """Each kind of file the latest entry wrote -> its name (stop 2 in round 0 is a CMA-ES
    generation, so a new optimiser JSON and pickle belong to it)."""
    step = int((store / "LATEST").read_text())
    (opt,) = store.glob(f"opt-*-{step:06d}.json")
    return {"entry": f"ckpt-{step:06d}.json", "arrays": f"ckpt-{step:06d}.npz",
            "sums": f"ckpt-{step:06d}.sha256", "optimizer": opt.name,
            "pickle": opt.with_suffix(".pkl").name}


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit: a valid-looking number in JSON, a float in npz
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["entry", "arrays", "sums", "optimizer", "pickle"])
@pytest.mark.parametrize("damage", [truncate, flip, lambda path: path.unlink()],
                         ids=["truncated", "corrupted", "deleted"])
def test_damaged_latest_entry_falls_back_with_a_warning(tmp_path, kind, damage):
    cfg = config(**CASES["cma-fwa-xbest"])
    full, folder, store = interrupted(tmp_path, cfg)
    name = latest_files(store)[kind]
    damage(store / name)
    with pytest.warns(CheckpointWarning, match=f"entry 2 is damaged \\(.*{name}"):
        resumed = run(None, folder, evaluator=LayeredQuadratic(), resume=True)
    assert trajectory(resumed) == trajectory(full)
    assert metrics_lines(folder) == metrics_lines(tmp_path / "full")
    latest = int((store / "LATEST").read_text())
    for s in (latest - 1, latest):
        verify_sums(store, s)  # the damaged entry was rewritten whole, then collected


def test_no_whole_entry_is_a_clear_error(tmp_path):
    _, folder, store = interrupted(tmp_path, config(**CASES["cma-fwa-xbest"]))
    flip(store / "ckpt-000002.npz")
    (store / "ckpt-000001.json").unlink()
    with pytest.raises(CheckpointError, match=r"entry 2 is damaged \(ckpt-000002.npz: \d+ "
                       r"bytes that do not match.*entry 1 is damaged \(ckpt-000001.json: "
                       r"missing\)"):
        run(None, folder, evaluator=LayeredQuadratic(), resume=True)


def test_damage_to_an_optimiser_file_both_entries_share_is_fatal(tmp_path):
    """Optimiser files are written only when they change, so the last two entries share most of
    them; the fallback protects what the latest entry wrote, not these."""
    _, folder, store = interrupted(tmp_path, config(**CASES["cma-fwa-xbest"]))
    (shared,) = store.glob("opt-L0-cma-*.pkl")  # layer 0's, written at step 1, used by 1 and 2
    truncate(shared)
    with pytest.raises(CheckpointError, match=f"entry 2 is damaged \\({shared.name}: .*"
                                              f"entry 1 is damaged \\({shared.name}: "):
        run(None, folder, evaluator=LayeredQuadratic(), resume=True)


@pytest.mark.parametrize("latest", [None, b"", b"\x00garbage"], ids=["lost", "empty", "garbage"])
def test_lost_latest_pointer_uses_the_newest_whole_entry(tmp_path, latest):
    cfg = config(**CASES["cma-fwa-xbest"])
    full, folder, store = interrupted(tmp_path, cfg, stop=5)
    if latest is None:
        (store / "LATEST").unlink()
    else:
        (store / "LATEST").write_bytes(latest)
    with pytest.warns(CheckpointWarning, match="LATEST .* is unreadable"):
        resumed = run(None, folder, evaluator=LayeredQuadratic(), resume=True)
    assert trajectory(resumed) == trajectory(full)


def test_entries_of_the_older_format_load_unverified(tmp_path):
    cfg = config(**CASES["cma-fwa-xbest"])
    full, folder, store = interrupted(tmp_path, cfg)
    for s in (1, 2):  # as an older version wrote them: format 1, no checksum file
        entry = json.loads((store / f"ckpt-{s:06d}.json").read_text())
        (store / f"ckpt-{s:06d}.json").write_text(json.dumps({**entry, "format": 1}))
        (store / f"ckpt-{s:06d}.sha256").unlink()
    with pytest.warns(CheckpointWarning, match="entry 2 .* has no checksums"):
        resumed = run(None, folder, evaluator=LayeredQuadratic(), resume=True)
    assert trajectory(resumed) == trajectory(full)


def test_a_log_without_later_keys_resumes(tmp_path):
    """An entry written before the log had peak_memory_mb (and without checksums) resumes."""
    cfg = config(**CASES["cma-fwa-xbest"])
    full, folder, store = interrupted(tmp_path, cfg)
    for s in (1, 2):
        entry = json.loads((store / f"ckpt-{s:06d}.json").read_text())
        del entry["log"]["peak_memory_mb"]
        (store / f"ckpt-{s:06d}.json").write_text(json.dumps({**entry, "format": 1}))
        (store / f"ckpt-{s:06d}.sha256").unlink()
    with pytest.warns(CheckpointWarning, match="has no checksums"):
        resumed = run(None, folder, evaluator=LayeredQuadratic(), resume=True)
    assert trajectory(resumed) == trajectory(full)
    assert CheckpointStore(store).load().payload["log"].keys() == {
        "metrics", "dev", "zero_shot", "final", "seconds", "emitted", "peak_memory_mb"}


def test_a_kill_after_the_last_checkpoint_loses_no_output(tmp_path):
    cfg = config(budget=30)
    run(cfg, tmp_path, evaluator=LayeredQuadratic())
    outputs = {name: (tmp_path / name).read_bytes() for name in ("results.json",
                                                                  "best_vectors.npz")}
    for name in outputs:  # killed after the final entry, before these were written
        (tmp_path / name).unlink()
    run(None, tmp_path, evaluator=None, resume=True)
    assert {name: (tmp_path / name).read_bytes() for name in outputs} == outputs


class Crash(Exception):
    pass


def test_a_crash_at_any_write_of_a_save_loses_at_most_a_step(tmp_path, monkeypatch):
    """The save that follows a fallback rewrites the damaged entry's step under the same names,
    so a crash part-way leaves old and new files of one step side by side: checksums (not only
    the atomic renames) keep that from loading as an entry."""
    cfg = config(**CASES["cma-fwa-xbest"])
    full, base, _ = interrupted(tmp_path, cfg)
    flip(base / "checkpoints" / "ckpt-000002.npz")
    write = checkpoint.atomic_write
    for k in range(20):
        folder = tmp_path / f"crash-{k}"
        shutil.copytree(base, folder)
        calls = []

        def crashing(path, data, fsync=True, calls=calls, k=k):
            calls.append(path.name)
            if len(calls) > k:  # dies mid-write, leaving a partial temporary file behind
                path.with_name(path.name + ".tmp").write_bytes(data[: len(data) // 2])
                raise Crash(path.name)
            write(path, data, fsync)

        monkeypatch.setattr(checkpoint, "atomic_write", crashing)
        with pytest.warns(CheckpointWarning):
            try:
                run(None, folder, evaluator=LayeredQuadratic(), resume=True, stop_after=2)
                finished_save = True
            except Crash:
                finished_save = False
        monkeypatch.setattr(checkpoint, "atomic_write", write)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CheckpointWarning)
            resumed = run(None, folder, evaluator=LayeredQuadratic(), resume=True)
        assert trajectory(resumed) == trajectory(full), f"crash at write {k}: {calls[-1]}"
        assert metrics_lines(folder) == metrics_lines(tmp_path / "full")
        if finished_save:
            break
    assert k > 4 and calls[-1] == "LATEST"  # optimiser files, npz, json, checksums, LATEST


# -- resuming under a changed config ----------------------------------------------------------

def test_forced_resume_extends_the_budget(tmp_path):
    """A cma run stopped at budget 30 and forced on to 60 is the run that had 60 from the start
    (CMA-ES does not plan for the budget); config.yaml and the next entry hold the new config."""
    small, large = config(budget=30), config(budget=60)
    full = run(large, tmp_path / "full", evaluator=LayeredQuadratic())
    folder = tmp_path / "run"
    run(small, folder, evaluator=LayeredQuadratic(), stop_after=2)
    resumed = run(large, folder, evaluator=LayeredQuadratic(), resume=True, force=True,
                  stop_after=3)
    assert yaml.safe_load((folder / "config.yaml").read_text()) == large.to_dict()
    assert CheckpointStore(folder / "checkpoints").load().payload["config"] == large.to_dict()
    resumed = run(None, folder, evaluator=LayeredQuadratic(), resume=True)  # the stored one
    assert resumed.evaluations == 60
    assert trajectory(resumed) == trajectory(full)


@pytest.mark.parametrize("change, match", [
    ({"seed": 6}, r"seed: 5 -> 6\nseed cannot change in a run \(not even with --force\)"),
    ({"adapter.dim": 4, "budget": 60}, r"adapter.dim: 8 -> 4\n  budget: 30 -> 60\n"
                                       r"adapter.dim cannot change"),
    ({"schedule.layers": [1, 0]}, r"schedule.layers: null -> \[1, 0\]\nschedule.layers cannot"),
    ({"optimizer.popsize": 4}, r"optimizer.popsize cannot change"),
    ({"eval.calibrate": "train"}, r"eval.calibrate cannot change"),  # another objective
    ({"eval.offsets": "fit"}, r"eval.offsets cannot change"),  # another calibrated objective
    ({"model.name": "other"}, r'model.name: "smollm2-135m" -> "other"'),
    ({"budget": 12}, r"budget 12: the run has spent 12 evaluations and its next generation "
                     r"needs 6 more"),
])
def test_forced_resume_refuses_changes_that_void_the_state(tmp_path, change, match):
    cfg = config(budget=30)
    run(cfg, tmp_path, evaluator=LayeredQuadratic(), stop_after=2)
    with pytest.raises(ConfigError, match=match):
        run(cfg.replace(**change), tmp_path, evaluator=LayeredQuadratic(), resume=True,
            force=True)


def test_forced_round_limit_must_be_ahead_of_the_run(tmp_path):
    cfg = config(budget=60)
    run(cfg, tmp_path, evaluator=LayeredQuadratic(), stop_after=5)  # in round 2 of 4 layers
    with pytest.raises(ConfigError, match=r"schedule.rounds 1: the run is already in round 2"):
        run(cfg.replace(**{"schedule.rounds": 1}), tmp_path, evaluator=LayeredQuadratic(),
            resume=True, force=True)
    done = run(cfg.replace(**{"schedule.rounds": 2}), tmp_path, evaluator=LayeredQuadratic(),
               resume=True, force=True)
    assert done.stop_reason == "rounds" and done.generations == 8


def test_forced_resume_cannot_reopen_a_stopped_search(tmp_path):
    cfg = config(budget=30)
    run(cfg, tmp_path, evaluator=LayeredQuadratic())
    with pytest.raises(ConfigError, match=r"already stopped \(budget\)"):
        run(cfg.replace(budget=60), tmp_path, evaluator=LayeredQuadratic(), resume=True,
            force=True)
    again = run(cfg.replace(**{"cluster.chunk_size": 3}), tmp_path, evaluator=None,
                resume=True, force=True)  # harmless keys: the stored result
    assert again.finished and again.evaluations == 30


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
    calibrate = worker.calibrate  # workers/calibration.py, as EvalWorker calls it
    monkeypatch.setattr(worker, "calibrate",
                        lambda *a, **kw: calls.append(1) or calibrate(*a, **kw))
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
        assert calibrations >= 2  # the patch sees every calibration: the full run's, this one's
        resumed = run(None, folder, resume=True)
        assert len(tiny_world) == calibrations  # the stored statistics were used
        assert trajectory(resumed) == trajectory(full)
