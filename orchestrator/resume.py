"""Which config a resumed run continues with (docs/design.md §8): the stored one, or with
`--force` a given one whose changes leave the stored state meaningful.

The trajectory so far stays the stored config's; `budget` and `schedule.rounds` extend or
shorten the search, `cluster.*` and the eval batch sizes change only how candidates are scored,
other keys act from the next generation. The driver calls `resume_config` while it plans a run
(driver.py), before any model is loaded or anything is written.
"""

from __future__ import annotations

import json
from typing import Any

from common.config import RunConfig
from common.errors import ConfigError
from orchestrator.state import ScheduleState

# Changes that make the stored state meaningless, refused even when forced: another model,
# data or objective (every stored loss and loss* would be of something else), other projection
# maps (adapter.*, seed, and sigma0, which scales them: the vectors would mean other deltas),
# other layers, or another population size (the optimisers' states are sized by it).
FROZEN = ("model", "task", "adapter", "seed", "schedule.layers", "optimizer.popsize",
          "optimizer.sigma0", "eval.loss", "eval.hinge_margin", "eval.calibrate", "eval.offsets")


def resume_config(cfg: RunConfig | None, stored: RunConfig, state: ScheduleState,
                  force: bool = False) -> RunConfig:
    """`stored` when no config is given or the given one equals it; with `force`, the given
    one if none of its changes is FROZEN and its limits are ones the schedule (at `state`) can
    still honour; otherwise a ConfigError listing the changes."""
    if cfg is None or cfg == stored:
        return stored
    diffs = differences(stored.to_dict(), cfg.to_dict())
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
    _check_limits(cfg, stored, state)
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


def differences(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, value in a, value in b) wherever two plain config trees differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [diff for k in sorted(set(a) | set(b))
                for diff in differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [(prefix.rstrip("."), a, b)]
