"""Reporters: callables that receive the driver's records and show or store them.

The driver returns metrics and hands every record to one reporter; printing lives here only:
workers and library code never print. Compose several with `fan_out`.
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


def bar_reporter(budget: int, stream: TextIO | None = None) -> Reporter:
    """A live tqdm bar over the evaluation budget: round/layer, best loss, dev metric,
    candidates/s and ETA; dev evaluations and the final scores are printed above it."""
    from tqdm import tqdm

    out = stream or sys.stderr
    bar = tqdm(total=budget, unit="eval", file=out, dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} evals [{elapsed}<{remaining}]"
                          "{postfix}")
    shown = {"dev": None}

    def report(record: dict) -> None:
        event = record.get("event")
        if event == "generation":
            bar.update(record["evaluations"] - bar.n)
            dev = shown["dev"]
            bar.set_postfix_str(
                f"round {record['round']} layer {record['layer']} {record['method']} "
                f"best {_num(record['best_loss'])} dev {'-' if dev is None else f'{dev:.3f}'} "
                f"{record.get('candidates_per_s', 0):.1f} cand/s", refresh=True)
        elif event in ("start", "dev"):
            metric = record.get("metric", "accuracy")
            shown["dev"] = record["dev"][metric]
            bar.write(progress_line(record), file=out)
        elif event == "final":
            bar.close()
            print(progress_line(record), file=out, flush=True)
        else:
            bar.write(progress_line(record), file=out)

    return report


def stream_jsonl_reporter(stream: TextIO | None = None) -> Reporter:
    """Every record as one JSON line on `stream` (default stdout): for cluster job logs."""

    def report(record: dict) -> None:
        print(json.dumps(record), file=stream or sys.stdout, flush=True)

    return report


def tensorboard_reporter(logdir: str | Path) -> Reporter:
    """Scalars for TensorBoard (optional: needs the `tensorboard` package): best loss, loss*,
    step size and candidates/s per generation, the dev metric per round, final metrics."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from common.errors import ConfigError

        raise ConfigError("--tensorboard needs the tensorboard package: pip install "
                          "tensorboard") from None
    writer = SummaryWriter(str(logdir))

    def report(record: dict) -> None:
        event, step = record.get("event"), record.get("evaluations", 0)
        if event == "generation":
            for key in ("best_loss", "loss_star", "step_size", "candidates_per_s"):
                if record.get(key) is not None:
                    writer.add_scalar(f"search/{key}", record[key], step)
        elif event in ("start", "dev"):
            metric = record.get("metric", "accuracy")
            writer.add_scalar(f"dev/{metric}", record["dev"][metric], step)
        elif event == "final":
            for split in ("train", "dev", "test"):
                writer.add_scalar(f"final/{split}_accuracy", record[split]["accuracy"], step)
            writer.close()
            return
        writer.flush()

    return report


def fan_out(*reporters: Reporter) -> Reporter:
    def report(record: dict) -> None:
        for reporter in reporters:
            reporter(record)

    return report
