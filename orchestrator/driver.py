"""The local driver: the whole life of a run, from a config or a run folder to its outputs.

    from common.config import RunConfig
    from orchestrator.driver import run
    from orchestrator.reporting import progress_reporter
    result = run(RunConfig.from_dict({"budget": 400}), "runs/demo", reporter=progress_reporter())
    result.final["test"]["accuracy"], result.zero_shot["test"]["accuracy"]

`run` is the one entry point for a new, a resumed and a forced run. It is `plan` (decide what the
folder's run does, validate the config once, refuse what cannot run: nothing written, no model
loaded) followed by `execute` (create the folder, build the evaluator, step the schedule,
checkpoint, write the outputs); the command line calls the two halves itself, to print between
them (orchestrator/commands.py). A run refused before its first checkpoint leaves no folder it
created behind.

One loop, one phase per step (schedule.py): score the zero adapter, then generations and dev
evaluations, then the best-dev snapshot on train/dev/test. A checkpoint follows every step, so
`run(None, out_dir, resume=True)` continues an interrupted run on the identical trajectory.
Library code: every record (one per generation, per dev evaluation, and the start and final
ones) goes to the run's outputs, metrics.jsonl, the caller's reporter and the plots, and into
the result; nothing is printed here. No torch is imported unless the driver builds the
in-process evaluator itself.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.config import RunConfig
from common.errors import ConfigError, DfoloraError
from orchestrator.checkpoint import CheckpointStore, Entry
from orchestrator.evaluation.interface import Evaluator
from orchestrator.optimizers import restore_optimizer
from orchestrator.plots import Plotter
from orchestrator.reporting import Reporter
from orchestrator.resume import resume_config
from orchestrator.runfolder import CHECKPOINTS, CONFIG, PLOTS, RunFolder
from orchestrator.schedule import Schedule, selection_metric
from orchestrator.state import RunLog, ScheduleState, Setup
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


@dataclass
class Plan:
    """A run decided but not started: what `execute` does in `folder`."""

    cfg: RunConfig  # the config the run goes on with, validated
    folder: RunFolder
    store: CheckpointStore
    entry: Entry | None = None  # the checkpoint the run resumes from; None: it starts


def run(cfg: RunConfig | None, out_dir: str | Path, *, evaluator: Evaluator | None = None,
        resume: bool = False, force: bool = False, stop_after: int | None = None,
        reporter: Reporter | None = None, plots: bool = True, fsync: bool = True) -> RunResult:
    """Run a search writing into `out_dir`: `plan`, then `execute` (see both).

    With `resume`, continue the run whose checkpoint is there (or start one, if there is none:
    a preemptible job can always pass `resume=True`). `cfg` may be None when resuming (the
    checkpoint's config is used); a given one must equal it, unless `force`: then the run
    continues under the given config (orchestrator/resume.py says which changes it still
    refuses). `evaluator`: default an in-process `LocalEvaluator` built from the config.
    `stop_after`: return, unfinished, once this many generations are done and checkpointed
    (tests use it to simulate an interruption). `plots`: draw plots/ (orchestrator/plots.py);
    `fsync`: flush every file to disk before its rename. The checkpoint holds pickles
    (orchestrator/checkpoint.py): resume only folders you trust.
    """
    return execute(plan(cfg, out_dir, resume=resume, force=force, fsync=fsync),
                   evaluator=evaluator, reporter=reporter, stop_after=stop_after, plots=plots)


def plan(cfg: RunConfig | None, out_dir: str | Path, *, resume: bool = False,
         force: bool = False, fsync: bool = True,
         notice: Callable[[str], None] | None = None) -> Plan:
    """What a run in `out_dir` does, decided before anything is written or any model loaded:

    * no checkpoint there: a new run of `cfg`; with `resume` and no `cfg`, a run stopped
      before its first checkpoint starts again from its config.yaml;
    * a checkpoint, with `resume`: the run continues under the stored config, or a given one
      (`force`, orchestrator/resume.py);
    * refused (ConfigError, CheckpointError): a checkpoint or a non-empty folder without
      `resume`, a path that is a file, a config that cannot run, a changed config.

    The config is validated once (orchestrator/validation.py): a given one first, so that its
    mistakes are reported before the folder's, a stored one once read. `notice(line)` is
    called before a checkpoint is read (it holds pickles)."""
    if cfg is not None:
        validate_run(cfg)
    folder = RunFolder(out_dir, fsync=fsync)
    store = CheckpointStore(folder / CHECKPOINTS, fsync=fsync)
    checkpointed = folder.path.is_dir() and store.exists()
    if checkpointed and not resume:
        raise ConfigError(f"'{folder.path}' already holds a checkpoint: resume it (--resume) "
                          f"or choose another output folder")
    folder.check(resume)
    given, entry = cfg, None
    if checkpointed:
        if notice is not None:
            notice(f"resuming from {folder.path}: checkpoints hold pickled optimiser state; "
                   f"resume only folders you trust")
        entry = store.load()
        cfg = resume_config(cfg, RunConfig.from_dict(entry.payload["config"]), _state(entry),
                            force)
    elif cfg is None and resume:
        cfg = folder.stored_config()  # stopped before its first checkpoint: start it again
    if cfg is None:
        raise ConfigError(f"nothing to resume in '{folder.path}': no checkpoint, no {CONFIG} "
                          f"and no config given")
    if given is None:
        validate_run(cfg)
    return Plan(cfg, folder, store, entry)


def execute(p: Plan, *, evaluator: Evaluator | None = None, reporter: Reporter | None = None,
            stop_after: int | None = None, plots: bool = True) -> RunResult:
    """Carry out a plan: create the folder and write config.yaml (on resume too: a forced
    config changes it), build the evaluator unless one is given (and close it at the end), run
    the loop. A finished run only gets missing output files written again. A refusal
    (DfoloraError: a missing model, unreadable data, ...) before the first checkpoint removes
    what the run created in a folder that was missing or empty."""
    entry = p.entry
    if entry is not None and entry.payload["schedule"]["phase"] == "done":
        result = _result(_state(entry), RunLog.from_plain(entry.payload["log"]))
        # a run killed between its last checkpoint and these files gets them now
        _write_outputs(p.folder, RunConfig.from_dict(entry.payload["config"]), result)
        return result
    p.folder.create()
    try:
        p.folder.write_config(p.cfg)
        setup = Setup.from_plain(entry.payload["setup"]) if entry is not None else None
        own = evaluator is None
        if own:
            evaluator = build_evaluator(p.cfg, setup.calibration if setup else None)
        try:
            return _Session(p, evaluator, setup, reporter, plots).loop(stop_after)
        finally:
            if own:
                evaluator.close()
    except DfoloraError:
        if not p.store.exists():
            p.folder.discard()
        raise


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


def _state(entry: Entry) -> ScheduleState:
    return ScheduleState.from_plain(entry.payload["schedule"], entry.arrays)


class _Session:
    """One session of a run: the schedule, its evaluator, outputs and checkpoints."""

    def __init__(self, p: Plan, evaluator: Evaluator, setup: Setup | None,
                 reporter: Reporter | None, plots: bool) -> None:
        self.cfg, self.ev, self.store, self.folder = p.cfg, evaluator, p.store, p.folder
        self.started = time.perf_counter()
        info = evaluator.info
        if p.entry is None:
            self.schedule = Schedule(self.cfg, info.n_layers, info.dim)
            self.log, self.setup = RunLog(), Setup(calibration=info.calibration)
        else:
            optimizers = {key: restore_optimizer(state)
                          for key, state in p.entry.optimizers.items()}
            self.schedule = Schedule(self.cfg, info.n_layers, info.dim, _state(p.entry),
                                     optimizers)
            self.log, self.setup = RunLog.from_plain(p.entry.payload["log"]), setup
        self.seconds_before = self.log.seconds
        self.folder.keep_metrics(self.log.emitted)  # drop a replayed step's records
        # every record goes to these, in order: metrics.jsonl (before the checkpoint that
        # counts it), the caller's reporter, the plots
        self.outputs: list[Reporter] = [self.folder.append_metrics]
        if reporter is not None:
            self.outputs.append(reporter)
        if plots:
            self.outputs.append(Plotter(self.folder / PLOTS, self.log))
        # Install the assembled state in every scheduled layer, in a fresh run too (zeros): an
        # evaluator may cache what it computed from committed layers (the worker's prefix
        # states), and the same commits at the start keep that cache, and so every loss, the
        # same in a fresh and in a resumed session.
        for layer, z in self.schedule.state.vectors.items():
            self.ev.commit(layer, z)
        if self.setup.stack_cap is not None:  # an earlier session's halvings
            self.ev.limit_stack(self.setup.stack_cap)

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
        self.log.record(record, kind)
        for output in self.outputs:
            output(record)

    def _start(self) -> None:
        dev, test = self.ev.score("dev"), self.ev.score("test")
        layer = self.schedule.order[0]
        if self.ev.info.rescores_commits:  # loss* is always the committed model's own score
            loss = float(self.ev.committed_loss(layer))
        else:  # the zero adapter's: one all-zero row (not a candidate: not in the budget)
            ref = self.ev.evaluate(layer, np.zeros((1, self.ev.info.dim)))
            loss = float(ref.checked(1).losses[0])
        loss = loss if math.isfinite(loss) else math.inf  # then any finite candidate beats it
        self.log.zero_shot = {"train_loss": loss, "dev": dev, "test": test}
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
            self.folder.write_adapter(*adapter, final["train"].get("label_offsets"))
        self.log.final = final
        self.schedule.finish()
        self._emit({"event": "final", "best_dev_round": snapshot.round, **final})

    def _wall(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    def _checkpoint(self) -> None:
        self.log.seconds = self._wall()
        diag = self.ev.diagnostics()
        cap = diag.stack_cap
        if cap is not None and cap != self.setup.stack_cap:
            # an out-of-memory halving: every actor and any resumed session scores with it
            self.setup.stack_cap = cap
            self.ev.limit_stack(cap)
        peak = diag.peak_memory_mb
        if peak is not None:  # the largest over every session of the run
            self.log.peak_memory_mb = max(peak, self.log.peak_memory_mb or 0.0)
        plain, arrays = self.schedule.state.to_plain()
        payload = {"config": self.cfg.to_dict(), "schedule": plain,
                   "log": self.log.to_plain(), "setup": self.setup.to_plain()}
        self.store.save(payload, arrays, self.schedule.optimizers, self.schedule.dirty)
        self.schedule.dirty.clear()


def _write_outputs(folder: RunFolder, cfg: RunConfig, result: RunResult) -> None:
    folder.write_vectors(result.best_vectors)
    folder.write_results(results_summary(cfg, result))


def _result(s: ScheduleState, log: RunLog) -> RunResult:
    snap = s.best_dev
    return RunResult(
        finished=s.phase == "done", stop_reason=s.stop_reason, zero_shot=log.zero_shot,
        final=log.final, metrics=log.metrics, dev_history=log.dev,
        best_dev=None if snap is None else {"round": snap.round,
                                             "evaluations": snap.evaluations, "dev": snap.dev},
        evaluations=s.evaluations, generations=s.generation, seconds=log.seconds,
        vectors={k: v.copy() for k, v in s.vectors.items()},
        best_vectors={} if snap is None else {k: v.copy() for k, v in snap.vectors.items()},
        peak_memory_mb=log.peak_memory_mb)


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
