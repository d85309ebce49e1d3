"""What a run checkpoints besides its optimisers (docs/design.md §8): the schedule's state, the
run's log and the evaluator's setup, each a dataclass with its plain (JSON and npz) form.

`ScheduleState` is all of the search that evolves besides the optimisers (schedule.py steps it);
`RunLog` is what the run has reported so far (records, zero-shot and final scores, time, memory);
`Setup` is what a resumed session needs to rebuild its evaluator identically. The stored keys are
those older versions wrote, so their checkpoints still resume. Plain numpy: no torch, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

OptKey = tuple[int, str]  # an optimiser's (layer, method)


@dataclass
class Snapshot:
    """An assembled state scored on dev; the best one is the run's final adapter."""

    round: int | None  # the round after which it was scored; None: the zero adapter
    evaluations: int
    dev: dict
    vectors: dict[int, np.ndarray]


@dataclass
class ScheduleState:
    vectors: dict[int, np.ndarray]  # committed vector of every scheduled layer
    phase: str = "start"
    round: int = 0
    position: int = 0  # index into the layer order
    visit_generation: int = 0  # generations done in the current visit
    generation: int = 0  # generations done in the run
    round_generations: int = 0  # generations done in the current round
    evaluations: int = 0
    loss_star: float = math.inf
    last_method: dict[int, str] = field(default_factory=dict)  # method of each layer's last visit
    stop_reason: str | None = None
    best_dev: Snapshot | None = None

    def to_plain(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON-safe part, arrays): the checkpoint stores the first as JSON, the second as npz."""
        plain = {k: getattr(self, k) for k in ("phase", "round", "position", "visit_generation",
                                               "generation", "round_generations", "evaluations",
                                               "loss_star", "stop_reason")}
        plain["last_method"] = {str(k): v for k, v in self.last_method.items()}
        arrays = {f"vector_{k}": v for k, v in self.vectors.items()}
        snap = self.best_dev
        if snap is not None:
            plain["best_dev"] = {"round": snap.round, "evaluations": snap.evaluations,
                                 "dev": snap.dev}
            arrays.update({f"snapshot_{k}": v for k, v in snap.vectors.items()})
        return plain, arrays

    @classmethod
    def from_plain(cls, plain: dict, arrays: dict[str, np.ndarray]) -> ScheduleState:
        def vectors(prefix: str) -> dict[int, np.ndarray]:
            return {int(k[len(prefix):]): np.array(v, dtype=np.float64)
                    for k, v in arrays.items() if k.startswith(prefix)}

        plain = dict(plain)
        snap = plain.pop("best_dev", None)
        state = cls(vectors=vectors("vector_"), **{k: v for k, v in plain.items()
                                                   if k != "last_method"})
        state.last_method = {int(k): v for k, v in plain["last_method"].items()}
        if snap is not None:
            state.best_dev = Snapshot(snap["round"], snap["evaluations"], snap["dev"],
                                      vectors("snapshot_"))
        return state


@dataclass
class RunLog:
    """What the run has reported, over every session (checkpoint key "log")."""

    metrics: list[dict] = field(default_factory=list)  # one record per generation
    dev: list[dict] = field(default_factory=list)  # one record per dev evaluation
    zero_shot: dict | None = None  # the zero adapter's train loss, dev and test scores
    final: dict | None = None  # the best-dev snapshot's train/dev/test scores, delta norms
    seconds: float = 0.0  # wall seconds over every session, as of the last checkpoint
    # records written to metrics.jsonl: a resumed session keeps that many lines, so the
    # records of a step it replays are not written twice
    emitted: int = 0
    peak_memory_mb: float | None = None  # the largest over every session (common/memory.py)

    def record(self, record: dict, kind: str | None = None) -> None:
        """Count a record written to metrics.jsonl; keep it under `kind` ("metrics", "dev")."""
        if kind is not None:
            getattr(self, kind).append(record)
        self.emitted += 1

    def to_plain(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_plain(cls, plain: dict[str, Any]) -> RunLog:
        """An entry's log; keys an older version did not write (peak_memory_mb) get defaults."""
        return cls(**{f.name: plain[f.name] for f in fields(cls) if f.name in plain})


@dataclass
class Setup:
    """What a resumed session needs to rebuild its evaluator identically (key "setup")."""

    calibration: dict | None = None  # statistics the maps are built from (EvaluatorInfo)
    stack_cap: int | None = None  # candidates per stacked pass after out-of-memory halvings

    def to_plain(self) -> dict[str, Any]:
        """Only the facts that are known, as older versions stored them."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None}

    @classmethod
    def from_plain(cls, plain: dict[str, Any]) -> Setup:
        return cls(plain.get("calibration"), plain.get("stack_cap"))
