"""The alternating per-layer schedule (docs/design.md §5) as a checkpointable state machine.

Block-coordinate descent over layers: one optimiser per (layer, method), each keeping its state
across visits; a generation asks one optimiser for a population for its layer, the evaluator
scores it with every other layer at its committed vector, and the accept rule decides what is
committed. `ScheduleState` (state.py) is all that evolves besides the optimisers; both go into
every checkpoint, so a resumed run replays the identical trajectory. Phases, driven by the driver:

    start  -> the zero adapter is scored (loss* on train, dev): `start(loss, dev)`
    search -> `ask()` a generation, the evaluator scores it, `tell()` accepts or not
    dev    -> after each round (and at the end) the assembled state is scored: `record_dev(dev)`
    final  -> the best-dev snapshot is scored on train/dev/test: `finish()`; then done

Accept rules: `elitist` installs the generation's best only if it beats loss*; since it was
measured with every other layer at its current vector, loss* stays exact and never increases.
`xbest` installs the optimiser's best-ever vector (the released code's rule), even though its
loss was measured in an older context. `mean` tells the optimiser, then scores its new centre
(CMA-ES's mean: the recombination of the generation's better half, which averages out what a
single lucky sample fits by chance) through the `score_centre` callback the driver passes to
`tell()`, and installs the centre only if it beats loss*; it costs one evaluation per
generation (none when the centre is the committed vector). The budget counts candidate
evaluations; a generation that would exceed it is never started. The one reference evaluation of
loss* at the start is not a candidate and is not counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from common.config import RunConfig
from common.errors import ConfigError
from common.messages import EvalResult
from common.seeding import derive_seed
from common.tasks import task_spec
from orchestrator.methods import methods, optimizer_options
from orchestrator.optimizers import Optimizer, make_optimizer
from orchestrator.state import OptKey, ScheduleState, Snapshot


@dataclass(frozen=True)
class Generation:
    """One population for one layer, as asked: row i of `Z` is candidate i, and the evaluator's
    result has one row per candidate, in the same order."""

    round: int
    layer: int
    method: str
    generation: int
    Z: np.ndarray


def layer_order(cfg: RunConfig, n_layers: int) -> tuple[int, ...]:
    order = cfg.schedule.layers or tuple(range(n_layers))
    bad = [layer for layer in order if layer >= n_layers]
    if bad:
        raise ConfigError(f"schedule.layers: {bad} out of range; the model has {n_layers} "
                          f"layers (0..{n_layers - 1})")
    return tuple(order)


def selection_metric(cfg: RunConfig) -> str:
    """The dev metric that picks the snapshot: the task's (accuracy; F1 for MRPC)."""
    return task_spec(cfg.task).metric  # custom tasks included


class Schedule:
    """The state machine plus its optimisers; see the module docstring."""

    def __init__(self, cfg: RunConfig, n_layers: int, dim: int,
                 state: ScheduleState | None = None,
                 optimizers: dict[OptKey, Optimizer] | None = None) -> None:
        self.cfg, self.dim = cfg, dim
        self.order = layer_order(cfg, n_layers)
        self.methods = methods(cfg)
        self.metric = selection_metric(cfg)
        self.state = state or ScheduleState({layer: np.zeros(dim) for layer in self.order})
        self.optimizers: dict[OptKey, Optimizer] = dict(optimizers or {})
        self.dirty: set[OptKey] = set()  # optimisers touched since the last checkpoint

    # -- rules ------------------------------------------------------------------------------
    def method_for(self, layer: int, round_: int) -> str:
        """`alternate: round`: method r % n in round r; `layer`: method l % n for layer l."""
        index = round_ if self.cfg.schedule.alternate == "round" else layer
        return self.methods[index % len(self.methods)]

    @property
    def n_optimizers(self) -> int:
        per_layer = len(self.methods) if self.cfg.schedule.alternate == "round" else 1
        return len(self.order) * per_layer

    @property
    def per_generation(self) -> int:
        """Evaluations a generation may use: the population, plus its centre under `mean`."""
        return self.cfg.optimizer.popsize + (self.cfg.schedule.accept == "mean")

    def _budget_fits(self) -> bool:
        return self.state.evaluations + self.per_generation <= self.cfg.budget

    # -- phases -----------------------------------------------------------------------------
    def start(self, loss_star: float, dev: dict) -> dict:
        """Record the zero adapter: its training loss is loss*, its dev score the 1st snapshot."""
        s = self._expect("start")
        s.loss_star = float(loss_star)
        s.best_dev = Snapshot(None, 0, dev, {k: v.copy() for k, v in s.vectors.items()})
        s.phase = "search"
        return {"event": "start", "loss_star": s.loss_star, "dev": dev}

    def ask(self) -> Generation | None:
        """The next population, or None when the round ended because every optimiser left in
        it has stopped (the phase is then `dev`)."""
        s = self._expect("search")
        while True:
            layer = self.order[s.position]
            method = self.method_for(layer, s.round)
            opt, created = self._optimizer(layer, method)
            if not opt.stop():
                break
            s.visit_generation, s.position = 0, s.position + 1  # skip the rest of this visit
            self._check_progress()
            if s.phase != "search":
                return None
        switched = s.last_method.get(layer, method) != method
        visit_start = s.visit_generation == 0 and self.cfg.schedule.recenter == "visit"
        if not created and (switched or visit_start):
            opt.recenter(s.vectors[layer])  # start at the current vector (loss*)
        s.last_method[layer] = method
        return Generation(s.round, layer, method, s.generation, opt.ask())

    def tell(self, gen: Generation, result: EvalResult,
             score_centre: Callable[[np.ndarray], float] | None = None,
             ) -> tuple[dict, np.ndarray | None]:
        """Tell the optimiser, apply the accept rule; returns (metrics record, vector to commit
        for gen.layer or None). `score_centre(z)`: z's training loss in the current context,
        needed by `accept: mean` only."""
        s = self._expect("search")
        if gen.generation != s.generation:
            raise RuntimeError(f"tell() for generation {gen.generation}, expected {s.generation}")
        opt = self.optimizers[(gen.layer, gen.method)]
        l2 = self.cfg.schedule.l2
        if l2:  # the objective: training loss + l2 * mean(z^2), a pull toward the zero delta
            result = replace(result, losses=result.losses + l2 * np.mean(gen.Z ** 2, axis=1))
        opt.tell(gen.Z, result.losses)
        s.evaluations += len(gen.Z)
        centre_loss = None
        if self.cfg.schedule.accept == "mean":
            commit, centre_loss = self._accept_centre(gen, opt, score_centre)
        else:
            commit = self._accept(gen, result.losses, opt)
        s.generation += 1
        s.round_generations += 1
        record = self._record(gen, result, opt, accepted=commit is not None)
        if self.cfg.schedule.accept == "mean":
            record["centre_loss"] = _json_float(centre_loss) if centre_loss is not None else None
        s.visit_generation += 1
        if s.visit_generation >= self.cfg.schedule.generations_per_visit:
            s.visit_generation, s.position = 0, s.position + 1
        self._check_progress()
        return record, commit

    def confirm(self, layer: int, loss: float, previous: tuple[np.ndarray, float],
                record: dict) -> np.ndarray | None:
        """eval.rescore_commits: `loss` is the committed state's own training loss, scored after
        the install that `tell` returned; it becomes loss* (docs/design.md §9). Under `elitist`
        and `mean` an install whose own loss does not beat the `previous` (vector, loss*) is
        undone: the previous vector is returned, to be committed back. `xbest` keeps it."""
        s = self.state
        z = s.vectors[layer]
        if self.cfg.schedule.l2:
            loss += self.cfg.schedule.l2 * float(np.mean(z ** 2))
        record["committed_loss"] = _json_float(loss)
        vector, loss_star = previous
        if self.cfg.schedule.accept != "xbest" and not loss < loss_star:  # NaN included
            s.vectors[layer], s.loss_star = np.array(vector, dtype=np.float64), loss_star
            record.update(accepted=False, undone=True, loss_star=loss_star)
            return s.vectors[layer].copy()
        s.loss_star = loss
        record["loss_star"] = loss
        return None

    def record_dev(self, dev: dict, delta_norms: list[dict] | None = None) -> dict:
        """Score of the assembled state on dev after a round (or at the end of the budget)."""
        s = self._expect("dev")
        improved = self._better(dev, s.best_dev.dev)  # ties keep the earlier
        if improved:
            s.best_dev = Snapshot(s.round, s.evaluations, dev,
                                  {k: v.copy() for k, v in s.vectors.items()})
        record = {"event": "dev", "round": s.round, "complete": s.position == len(self.order),
                  "generation": s.generation, "evaluations": s.evaluations,
                  "loss_star": s.loss_star, "dev": dev, "metric": self.metric,
                  "improved": improved,
                  "best_dev_round": s.best_dev.round, "delta_norms": delta_norms or []}
        if s.position == len(self.order):
            if s.round_generations == 0 and s.stop_reason is None:
                s.stop_reason = "every optimiser has stopped"
            s.round, s.position, s.round_generations = s.round + 1, 0, 0
            rounds = self.cfg.schedule.rounds
            if s.stop_reason is None and rounds is not None and s.round >= rounds:
                s.stop_reason = "rounds"
            if s.stop_reason is None and not self._budget_fits():
                s.stop_reason = "budget"
        s.phase = "search" if s.stop_reason is None else "final"
        return record

    def finish(self) -> None:
        self._expect("final").phase = "done"

    # -- helpers ----------------------------------------------------------------------------
    def _better(self, dev: dict, best: dict) -> bool:
        """`select: metric`: a higher task metric; `loss`: a lower dev loss (strictly)."""
        if self.cfg.schedule.select == "loss":
            return dev["loss"] < best["loss"]
        return dev[self.metric] > best[self.metric]

    def _expect(self, phase: str) -> ScheduleState:
        if self.state.phase != phase:
            raise RuntimeError(f"schedule is in phase {self.state.phase!r}, not {phase!r}")
        return self.state

    def _check_progress(self) -> None:
        """After a visit or generation: a finished round or an exhausted budget means dev."""
        s = self.state
        if s.position == len(self.order):
            s.phase = "dev"
        elif not self._budget_fits():
            s.phase, s.stop_reason = "dev", "budget"

    def _optimizer(self, layer: int, method: str) -> tuple[Optimizer, bool]:
        key = (layer, method)
        self.dirty.add(key)
        if key in self.optimizers:
            return self.optimizers[key], False
        opt = make_optimizer(method, self.dim, x0=self.state.vectors[layer],
                             seed=derive_seed(self.cfg.seed, "opt", layer, method),
                             **optimizer_options(self.cfg, method, self.n_optimizers))
        self.optimizers[key] = opt
        return opt, True

    def _accept(self, gen: Generation, losses: np.ndarray, opt: Optimizer) -> np.ndarray | None:
        s = self.state
        if self.cfg.schedule.accept == "elitist":
            finite = np.isfinite(losses)
            if not finite.any():
                return None
            i = int(np.argmin(np.where(finite, losses, np.inf)))  # first of equal losses
            if not losses[i] < s.loss_star:
                return None
            x, f = gen.Z[i], float(losses[i])
        else:  # xbest
            best = opt.best
            if not math.isfinite(best.f) or np.array_equal(best.x, s.vectors[gen.layer]):
                return None
            x, f = best.x, best.f
        s.vectors[gen.layer], s.loss_star = np.array(x, dtype=np.float64), f
        return s.vectors[gen.layer].copy()

    def _accept_centre(self, gen: Generation, opt: Optimizer,
                       score_centre: Callable[[np.ndarray], float] | None,
                       ) -> tuple[np.ndarray | None, float | None]:
        """`mean`: score the optimiser's centre after its tell, install it if it beats loss*."""
        if score_centre is None:
            raise RuntimeError("schedule.accept = mean needs tell(..., score_centre=...)")
        s, x = self.state, opt.centre
        if np.array_equal(x, s.vectors[gen.layer]):  # already installed: its loss is loss*
            return None, None
        f = float(score_centre(x))
        s.evaluations += 1
        if self.cfg.schedule.l2:
            f += self.cfg.schedule.l2 * float(np.mean(x ** 2))
        if not f < s.loss_star:  # NaN included
            return None, f
        s.vectors[gen.layer], s.loss_star = x, f
        return x.copy(), f

    def _record(self, gen: Generation, result: EvalResult, opt: Optimizer,
                accepted: bool) -> dict:
        s, losses = self.state, result.losses
        finite = losses[np.isfinite(losses)]
        record = {"event": "generation", "round": gen.round, "layer": gen.layer,
                  "method": gen.method, "generation": gen.generation,
                  "best_loss": float(finite.min()) if len(finite) else None,
                  "median_loss": float(np.median(finite)) if len(finite) else None,
                  "loss_star": s.loss_star, "accepted": accepted,
                  "step_size": _json_float(opt.step_size),
                  "evaluations": s.evaluations,
                  "n_nonfinite": int(opt.last_tell_info.get("n_nonfinite", 0)),
                  "losses": [_json_float(v) for v in losses.tolist()]}
        if result.accuracies is not None and len(finite):
            i = int(np.argmin(np.where(np.isfinite(losses), losses, np.inf)))
            record["best_accuracy"] = float(result.accuracies[i])
        return record


def _json_float(value: float) -> float | None:
    """NaN/inf become null, so metrics stay strict JSON."""
    return float(value) if math.isfinite(value) else None
