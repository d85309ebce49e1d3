"""Reporters: callables that receive the driver's records and show or store them.

The driver returns metrics and hands every record to one reporter; printing lives here only
(shared/style.md 10). Compose several with `fan_out`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

Reporter = Callable[[dict], None]


def progress_line(record: dict) -> str:
    """One human-readable line per record."""
    event = record.get("event")
    if event == "generation":
        best = record["best_loss"]
        return (f"round {record['round']:>3} layer {record['layer']:>3} {record['method']:<8} "
                f"gen {record['generation']:>5}  best {_num(best)}  loss* "
                f"{_num(record['loss_star'])}  step {_num(record['step_size'])}  "
                f"evals {record['evaluations']:>6}  {'*' if record['accepted'] else ' '} "
                f"{record['seconds']:.2f}s")
    if event == "dev":
        dev = record["dev"]
        return (f"dev after round {record['round']}: acc {dev['accuracy']:.4f} loss "
                f"{dev['loss']:.4f}{'  (new best)' if record['improved'] else ''}")
    if event == "start":
        return (f"zero adapter: train loss {record['loss_star']:.4f}, dev acc "
                f"{record['dev']['accuracy']:.4f}")
    if event == "final":
        return (f"final (best dev after round {record['best_dev_round']}): train acc "
                f"{record['train']['accuracy']:.4f}  dev acc {record['dev']['accuracy']:.4f}  "
                f"test acc {record['test']['accuracy']:.4f}")
    return json.dumps(record)


def _num(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:.4f}"


def progress_reporter(stream: TextIO | None = None) -> Reporter:
    """Print one progress line per record to `stream` (default stderr)."""

    def report(record: dict) -> None:
        print(progress_line(record), file=stream or sys.stderr, flush=True)

    return report


def jsonl_reporter(path: str | Path) -> Reporter:
    """Append every record as one JSON line to `path`."""

    def report(record: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

    return report


def fan_out(*reporters: Reporter) -> Reporter:
    def report(record: dict) -> None:
        for reporter in reporters:
            reporter(record)

    return report
