"""The local driver: config -> evaluator -> schedule -> accept/commit -> checkpoint -> metrics.

    from common.config import RunConfig
    from orchestrator.driver import run
    from orchestrator.reporting import progress_reporter
    result = run(RunConfig.from_dict({"budget": 400}), "runs/demo", reporter=progress_reporter())
    result.final["test"]["accuracy"], result.zero_shot["test"]["accuracy"]

One loop, one phase per step (schedule.py): score the zero adapter, then generations and dev
evaluations, then the best-dev snapshot on train/dev/test. A checkpoint follows every step, so
`run(None, out_dir, resume=True)` continues an interrupted run on the identical trajectory.
Library code: every record (one per generation, per dev evaluation, and the start and final
ones) goes to `reporter` and into the result; nothing is printed here. No torch is imported
unless the driver builds the in-process evaluator itself.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.config import RunConfig
from common.errors import ConfigError
from orchestrator.checkpoint import CheckpointStore, Entry, atomic_write
from orchestrator.evaluation.interface import Evaluator
from orchestrator.optimizers import restore_optimizer
from orchestrator.plots import draw_plots
from orchestrator.reporting import Reporter
from orchestrator.runfolder import CHECKPOINTS, METRICS, PLOTS, RunFolder
from orchestrator.schedule import Schedule, ScheduleState, selection_metric
from orchestrator.validation import validate_run


@dataclass
class RunResult:
    finished: bool  # False when stopped early by `stop_after`
    stop_reason: str | None  # budget, rounds, or every optimiser has stopped
    zero_shot: dict  # dev and test metrics (and train loss) of the zero adapter
    final: dict | None  # train/dev/test metrics of the best-dev snapshot, once finished
    best_dev: dict  # the snapshot's round (None: the zero adapter), evaluations, dev metrics
    metrics: list[dict]  # one record per generation
    dev_history: list[dict]  # one record per dev evaluation
    evaluations: int
    generations: int
    seconds: float  # wall seconds over every session of the run
    vectors: dict[int, np.ndarray]  # the committed vectors at the end of the search
    best_vectors: dict[int, np.ndarray]  # the best-dev snapshot's: the final adapter
    peak_memory_mb: float | None = None  # of the scoring processes (common/memory.py)

    def summary(self) -> dict:
        """JSON-safe figures without vectors and per-generation metrics."""
        return {"finished": self.finished, "stop_reason": self.stop_reason,
                "zero_shot": self.zero_shot, "final": self.final, "best_dev": self.best_dev,
                "evaluations": self.evaluations, "generations": self.generations,
                "seconds": round(self.seconds, 3)}


def run(cfg: RunConfig | None, out_dir: str | Path, *, evaluator: Evaluator | None = None,
        resume: bool = False, stop_after: int | None = None,
        reporter: Reporter | None = None, force: bool = False) -> RunResult:
    """Run a search writing into `out_dir`; with `resume`, continue the run whose checkpoint is
    there (or start one, if there is none: a preemptible job can always pass `resume=True`).

    `cfg` may be None when resuming (the checkpoint's config is used); a given one must equal
    it, unless `force`: then the run continues under the given config (`_resume_config` says
    which changes it still refuses). `evaluator`: default an in-process `LocalEvaluator` built
    from `cfg`. `stop_after`: return, unfinished, once this many generations are done and
    checkpointed (tests use it to simulate an interruption). The checkpoint holds pickles
    (orchestrator/checkpoint.py): resume only folders you trust.
    """
    folder = RunFolder(out_dir)
    store = CheckpointStore(folder / CHECKPOINTS)
    entry = None
    if store.exists():
        if not resume:
            raise ConfigError(f"'{folder.path}' already holds a checkpoint: resume it or choose "
                              f"another output folder")
        entry = store.load()
        cfg = _resume_config(cfg, entry, force)
    elif cfg is None:
        raise ConfigError(f"nothing to resume in '{folder.path}' and no config given")
    validate_run(cfg)  # before any model is loaded
    if entry is not None and entry.payload["schedule"]["phase"] == "done":
        result = _result(_state(entry), entry.payload["log"])
        # a run killed between its last checkpoint and these files gets them now
        _write_outputs(folder, RunConfig.from_dict(entry.payload["config"]), result)
        return result
    folder.prepare(resume=True)  # the caller decides whether a non-empty folder is welcome
    folder.write_config(cfg)  # on resume too: a forced one changes it (the checkpoint follows)
    own = evaluator is None
    if own:
        setup = entry.payload["setup"] if entry else {}
        evaluator = build_evaluator(cfg, setup.get("calibration"))
    try:
        return _Run(cfg, evaluator, store, entry, reporter, folder).loop(stop_after)
    finally:
        if own:
            evaluator.close()


def build_evaluator(cfg: RunConfig, stats: dict | None) -> Evaluator:
    """In-process by default; Ray actors when `cluster.num_actors` > 0."""
    c = cfg.cluster
    if c.num_actors == 0:
        from orchestrator.evaluation.local import LocalEvaluator

        return LocalEvaluator(cfg, stats=stats)
    from orchestrator.evaluation.ray_eval import RayEvaluator

    return RayEvaluator(cfg, stats=stats, num_actors=c.num_actors, cpus_per_actor=c.cpus_per_actor,
                        gpus_per_actor=c.gpus_per_actor, chunk_size=c.chunk_size,
                        deadline_s=c.deadline_s, address=c.address,
                        backup_chunks=c.backup_chunks, example_shards=c.example_shards)


# Changes that make the stored state meaningless, refused even when forced: another model,
# data or objective (every stored loss and loss* would be of something else), other projection
# maps (adapter.*, seed, and sigma0, which scales them: the vectors would mean other deltas),
# other layers, or another population size (the optimisers' states are sized by it).
FROZEN = ("model", "task", "adapter", "seed", "schedule.layers", "optimizer.popsize",
          "optimizer.sigma0", "eval.loss", "eval.hinge_margin")


def _resume_config(cfg: RunConfig | None, entry: Entry, force: bool = False) -> RunConfig:
    """The config a resumed run continues with: the stored one, or with `force` the given one
    when its changes leave the stored state meaningful (the trajectory so far stays the stored
    config's; `budget` and `schedule.rounds` extend or shorten the search, `cluster.*` and the
    eval batch sizes change only how candidates are scored, other keys act from the next
    generation)."""
    stored = RunConfig.from_dict(entry.payload["config"])
    if cfg is None or cfg == stored:
        return stored
    diffs = _differences(stored.to_dict(), cfg.to_dict(), "")
    lines = "".join(f"\n  {key}: {json.dumps(old)} -> {json.dumps(new)}"
                    for key, old, new in diffs)
    frozen = [key for key, _, _ in diffs if any(key == f or key.startswith(f"{f}.")
                                               for f in FROZEN)]
    if frozen:
        raise ConfigError(f"the config differs from the checkpoint's (stored -> given):{lines}"
                          f"\n{', '.join(frozen)} cannot change in a run (not even with "
                          f"--force): resume with the stored config or start a new run")
    if not force:
        raise ConfigError(f"the config differs from the checkpoint's (stored -> given):{lines}"
                          f"\nresume with the stored config (give no --config/--set), pass "
                          f"--force to continue under the given one, or start a new run")
    _check_limits(cfg, stored, _state(entry))
    return cfg


def _check_limits(cfg: RunConfig, stored: RunConfig, s: ScheduleState) -> None:
    """A forced budget or round limit must still be one the schedule can honour."""
    limits = (cfg.budget, cfg.schedule.rounds) != (stored.budget, stored.schedule.rounds)
    if limits and s.stop_reason is not None:
        raise ConfigError(f"the search has already stopped ({s.stop_reason}): a new budget or "
                          f"schedule.rounds cannot reopen it; start a new run")
    # mid-round, the next generation starts without a budget check (it follows each one)
    needs = cfg.optimizer.popsize + (cfg.schedule.accept == "mean")  # Schedule.per_generation
    if s.phase == "search" and s.evaluations + needs > cfg.budget:
        raise ConfigError(f"budget {cfg.budget}: the run has spent {s.evaluations} evaluations "
                          f"and its next generation needs {needs} more")
    rounds = cfg.schedule.rounds
    if rounds is not None and s.round >= rounds and s.phase in ("search", "dev"):
        raise ConfigError(f"schedule.rounds {rounds}: the run is already in round "
                          f"{s.round + 1}")


def _differences(a: Any, b: Any, prefix: str) -> list[tuple[str, Any, Any]]:
    """(dotted key, value in a, value in b) wherever two plain config trees differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [diff for k in sorted(set(a) | set(b))
                for diff in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [(prefix.rstrip("."), a, b)]


def _state(entry: Entry) -> ScheduleState:
    return ScheduleState.from_plain(entry.payload["schedule"], entry.arrays)


class _Run:
    """One session of a run: the schedule, its evaluator and checkpoints."""

    def __init__(self, cfg: RunConfig, evaluator: Evaluator, store: CheckpointStore,
                 entry: Entry | None, reporter: Reporter | None, folder: RunFolder) -> None:
        self.cfg, self.ev, self.store, self.folder = cfg, evaluator, store, folder
        self.reporter = reporter or (lambda record: None)
        self.started = time.perf_counter()
        info = evaluator.info
        if entry is None:
            self.schedule = Schedule(cfg, info.n_layers, info.dim)
            self.log: dict[str, Any] = {"metrics": [], "dev": [], "zero_shot": None,
                                        "final": None, "seconds": 0.0, "emitted": 0,
                                        "peak_memory_mb": None}
            self.setup = {} if info.calibration is None else {"calibration": info.calibration}
        else:
            optimizers = {key: restore_optimizer(state)
                          for key, state in entry.optimizers.items()}
            self.schedule = Schedule(cfg, info.n_layers, info.dim, _state(entry), optimizers)
            self.log, self.setup = entry.payload["log"], entry.payload["setup"]
        self.seconds_before = self.log["seconds"]
        _keep_lines(folder / METRICS, self.log["emitted"])  # drop a replayed step's records
        # Install the assembled state in every scheduled layer, in a fresh run too (zeros): an
        # evaluator may cache what it computed from committed layers (the worker's prefix
        # states), and the same commits at the start keep that cache, and so every loss, the
        # same in a fresh and in a resumed session.
        for layer, z in self.schedule.state.vectors.items():
            self.ev.commit(layer, z)
        if self.setup.get("stack_cap") is not None:  # an earlier session's halvings
            self.ev.limit_stack(self.setup["stack_cap"])

    def loop(self, stop_after: int | None) -> RunResult:
        steps = {"start": self._start, "search": self._search, "dev": self._dev,
                 "final": self._final}
        state = self.schedule.state
        while state.phase != "done":
            steps[state.phase]()
            self._checkpoint()
            if stop_after is not None and state.generation >= stop_after:
                break
        result = _result(self.schedule.state, self.log)
        if result.finished:
            _write_outputs(self.folder, self.cfg, result)
        return result

    def _emit(self, record: dict, kind: str | None = None) -> None:
        if kind is not None:
            self.log[kind].append(record)
        # metrics.jsonl gets the record before the checkpoint that counts it, so a resumed
        # session keeps exactly the first `emitted` lines (a replayed step's are dropped)
        self.folder.append_metrics(record)
        self.log["emitted"] += 1
        self.reporter(record)
        if record["event"] in ("dev", "final"):
            draw_plots(self.folder / PLOTS, self.log, final=record["event"] == "final")

    def _start(self) -> None:
        dev, test = self.ev.score("dev"), self.ev.score("test")
        layer = self.schedule.order[0]
        if self.ev.info.rescores_commits:  # loss* is always the committed model's own score
            loss = float(self.ev.committed_loss(layer))
        else:  # the zero adapter's: one all-zero row (not a candidate: not in the budget)
            ref = self.ev.evaluate(layer, np.zeros((1, self.ev.info.dim)))
            loss = float(ref.checked(1).losses[0])
        loss = loss if math.isfinite(loss) else math.inf  # then any finite candidate beats it
        self.log["zero_shot"] = {"train_loss": loss, "dev": dev, "test": test}
        self._emit(self.schedule.start(loss, dev))

    def _search(self) -> None:
        gen = self.schedule.ask()
        if gen is None:  # the round ended on optimisers that have stopped
            return
        began = time.perf_counter()
        result = self.ev.evaluate(gen.layer, gen.Z).checked(len(gen.Z))

        def score_centre(z: np.ndarray) -> float:  # accept: mean (docs/design.md §5)
            return float(self.ev.evaluate(gen.layer, z[None, :]).checked(1).losses[0])

        state = self.schedule.state
        before = state.evaluations
        previous = (state.vectors[gen.layer].copy(), state.loss_star)
        record, commit = self.schedule.tell(gen, result, score_centre)
        if commit is not None:
            self.ev.commit(gen.layer, commit)
            if self.ev.info.rescores_commits:  # not a candidate: not in the budget
                loss = float(self.ev.committed_loss(gen.layer))
                undo = self.schedule.confirm(gen.layer, loss, previous, record)
                if undo is not None:
                    self.ev.commit(gen.layer, undo)
        seconds = time.perf_counter() - began
        scored = self.schedule.state.evaluations - before
        actors = self.ev.diagnostics().parallelism
        record.update(seconds=seconds, candidates_per_s=scored / seconds, actors=actors,
                      candidates_per_s_per_actor=scored / seconds / actors,
                      wall_seconds=self._wall())
        self._emit(record, "metrics")

    def _dev(self) -> None:
        dev = self.ev.score("dev")
        norms = self.ev.diagnostics(delta_norms=True).delta_norms
        self._emit(self.schedule.record_dev(dev, norms), "dev")

    def _final(self) -> None:
        snapshot = self.schedule.state.best_dev
        for layer, z in snapshot.vectors.items():
            self.ev.commit(layer, z)
        final = {split: self.ev.score(split) for split in ("train", "dev", "test")}
        final["delta_norms"] = self.ev.diagnostics(delta_norms=True).delta_norms
        adapter = self.ev.adapter()
        if adapter is not None:
            self.folder.write_adapter(*adapter)
        self.log["final"] = final
        self.schedule.finish()
        self._emit({"event": "final", "best_dev_round": snapshot.round, **final})

    def _wall(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    def _checkpoint(self) -> None:
        self.log["seconds"] = self._wall()
        diag = self.ev.diagnostics()
        cap = diag.stack_cap
        if cap is not None and cap != self.setup.get("stack_cap"):
            # an out-of-memory halving: every actor and any resumed session scores with it
            self.setup["stack_cap"] = cap
            self.ev.limit_stack(cap)
        peak = diag.peak_memory_mb
        if peak is not None:  # the largest over every session of the run
            self.log["peak_memory_mb"] = max(peak, self.log.get("peak_memory_mb") or 0.0)
        plain, arrays = self.schedule.state.to_plain()
        payload = {"config": self.cfg.to_dict(), "schedule": plain, "log": self.log,
                   "setup": self.setup}
        self.store.save(payload, arrays, self.schedule.optimizers, self.schedule.dirty)
        self.schedule.dirty.clear()


def _write_outputs(folder: RunFolder, cfg: RunConfig, result: RunResult) -> None:
    folder.write_vectors(result.best_vectors)
    folder.write_results(results_summary(cfg, result))


def _result(s: ScheduleState, log: dict) -> RunResult:
    snap = s.best_dev
    return RunResult(
        finished=s.phase == "done", stop_reason=s.stop_reason, zero_shot=log["zero_shot"],
        final=log["final"], metrics=log["metrics"], dev_history=log["dev"],
        best_dev=None if snap is None else {"round": snap.round,
                                             "evaluations": snap.evaluations, "dev": snap.dev},
        evaluations=s.evaluations, generations=s.generation, seconds=log["seconds"],
        vectors={k: v.copy() for k, v in s.vectors.items()},
        best_vectors={} if snap is None else {k: v.copy() for k, v in snap.vectors.items()},
        peak_memory_mb=log.get("peak_memory_mb"))



def method_name(cfg: RunConfig) -> str:
    """'dfo-lora:cma', 'dfo-lora:cma+fwa', ...: the search's optimisers, in schedule order."""
    return "dfo-lora:" + "+".join(cfg.schedule.optimizers or (cfg.optimizer.name,))


def results_summary(cfg: RunConfig, result: RunResult) -> dict:
    """results.json: the fields every method of the harness reports, then the run's details."""
    return {"method": method_name(cfg), "task": cfg.task.name, "model": cfg.model.name,
            "template": cfg.task.template, "seed": cfg.seed, "metric": selection_metric(cfg),
            "zero_shot": result.zero_shot,
            "final": result.final, "evaluations": result.evaluations,
            "wall_seconds": round(result.seconds, 3), "peak_memory_mb": result.peak_memory_mb,
            "generations": result.generations, "best_dev": result.best_dev,
            "stop_reason": result.stop_reason, "finished": result.finished}


def _keep_lines(path: Path, count: int) -> None:
    """Truncate a JSON-lines file to its first `count` complete lines."""
    if not path.exists():
        return
    lines = path.read_bytes().split(b"\n")[:count]
    atomic_write(path, b"".join(line + b"\n" for line in lines if line))
