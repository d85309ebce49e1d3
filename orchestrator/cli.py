"""The `dfolora` command line (also `python -m orchestrator.cli`).

    dfolora run [--config FILE | --preset NAME] [--set KEY=VALUE ...] [--out DIR]
                [--resume [--force]]
    dfolora zero-shot [--config FILE | --preset NAME] [--set KEY=VALUE ...] [--out DIR]
    dfolora lora [--config FILE | --preset NAME] [--set ...] [--lr LR[,LR...]] [--epochs N]
                 [--out DIR]
    dfolora export RUN_DIR --format peft|merged --out DIR
    dfolora compare RUN_DIR [RUN_DIR ...] [--json]
    dfolora sweep [--preset NAME ...] [--config FILE ...] [--seeds S ...] [--set KEY=VALUE ...]
                  [--vary KEY=VALUE ...] --root DIR [--jobs N] [--threads T]
    dfolora presets

A user mistake (a bad key, a missing file, a non-empty output folder) is an `error:` line (a
refused resume adds one line per changed key) and exit code 2, before any model is loaded;
nothing already written is touched. A mistake found only once the model or data load (a missing
model, unreadable data) leaves no run folder behind either: what the refused command created is
removed again (by the driver for `run`, by `commands.discard_refused` for the others).
"""

from __future__ import annotations

import argparse
import sys
import warnings

from common.errors import DfoloraError
from orchestrator import commands, sweep

EXAMPLES = """examples:
  dfolora run --preset demo
  dfolora run --preset smoke --set budget=80 --set schedule.layers=[29,28,27] --out runs/s
  dfolora run --resume --out runs/s                 # continue an interrupted run
  dfolora run --preset roberta-large-sst2 --set cluster.num_actors=4 --set cluster.gpus_per_actor=1
  dfolora export runs/s --format peft --out adapters/s
  dfolora sweep --preset demo --seeds 13 42 100 --vary schedule.optimizers=[cma] \\
      --vary schedule.optimizers=[fwa] --root runs/grid --jobs 2
"""

SWEEP_EXAMPLES = """examples:
  # 2 presets x 3 seeds = 6 runs, two at a time, one torch thread each
  dfolora sweep --preset demo --preset smoke --seeds 13 42 100 --root runs/grid --jobs 2
  # one config x 2 seeds x 2 optimisers x 2 budgets = 8 runs; every run gets task.k=8
  dfolora sweep --config my.yaml --seeds 1 2 --set task.k=8 \\
      --vary schedule.optimizers=[cma] --vary "schedule.optimizers=[cma, fwa]" \\
      --vary budget=400 --vary budget=800 --root runs/grid
  # on a Ray cluster: each run's actors on the cluster, 4 runs at once
  ray job submit --working-dir . -- python -m orchestrator.cli sweep \\
      --preset roberta-large-sst2 --seeds 13 42 --set cluster.num_actors=4 \\
      --set cluster.gpus_per_actor=1 --root /shared/sweeps/sst2 --jobs 4

The same command again resumes: finished runs are skipped, interrupted ones continue from their
checkpoints. Run folders are ROOT/<preset or config name>-seed<S>[-<key>=<value>...], the
console output of each run ROOT/logs/<name>.log.
"""


def _config_args(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group()
    source.add_argument("--config", metavar="FILE", help="a YAML config (e.g. a run's "
                        "config.yaml); keys not given keep their defaults")
    source.add_argument("--preset", metavar="NAME", help="a named config (`dfolora presets`)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one dotted key; VALUE is YAML (repeatable), e.g. "
                        "--set budget=2000 --set schedule.optimizers=[cma,fwa]")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="run folder; when not given, runs/<task>-<method>-<timestamp>")
    p.add_argument("--progress", choices=("auto", "bar", "lines", "json", "quiet"),
                   default="auto", help="console output: a live bar (auto on a terminal), one "
                   "line per record (auto otherwise), JSON lines on stdout, or nothing")


def parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    top = argparse.ArgumentParser(
        prog="dfolora", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Derivative-free low-rank adaptation of frozen language models "
                    "(Jin, Liu & Tan 2024) on one machine or a Ray cluster.", epilog=EXAMPLES)
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="search an adapter (the main job)", formatter_class=fmt,
                       description="Run the alternating per-layer DFO search; writes config.yaml, "
                       "metrics.jsonl, results.json, adapter/, checkpoints/ and plots/.")
    _config_args(p)
    p.add_argument("--tensorboard", metavar="LOGDIR", default=None,
                   help="also log scalars for TensorBoard here (needs the tensorboard package)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (a config given "
                        "too must equal the stored one, unless --force)")
    p.add_argument("--force", action="store_true",
                   help="with --resume: continue under the given config although it differs "
                        "from the stored one. The trajectory so far stays the stored config's. "
                        "Safe: budget and schedule.rounds extend (or shorten) the search; "
                        "cluster.* and eval batch sizes change only how candidates are scored; "
                        "other optimiser and schedule keys act from the next generation. "
                        "Refused even so: model.*, task.*, adapter.*, seed, schedule.layers, "
                        "optimizer.popsize, optimizer.sigma0, eval.loss, eval.hinge_margin, "
                        "eval.calibrate, eval.offsets")
    p.set_defaults(handler=commands.run)

    p = sub.add_parser("zero-shot", help="score the unadapted model on the same splits",
                       formatter_class=fmt)
    _config_args(p)
    p.set_defaults(handler=commands.zero_shot)

    p = sub.add_parser("lora", help="gradient LoRA baseline (PEFT, AdamW) on the same splits",
                       formatter_class=fmt, description="Gradient LoRA on the same q/k "
                       "projections and rank, trained on the few-shot train split; learning "
                       "rate and epoch chosen by dev over a small grid, only the chosen one "
                       "scored on test; reports the same results.json fields. wall_seconds and "
                       "peak_memory_mb cover the whole grid.")
    _config_args(p)
    p.add_argument("--lr", default="5e-4,1e-3,2e-3,5e-3", metavar="LR[,LR...]",
                   help="AdamW learning rate, or a comma-separated grid: every lr trains from "
                        "the same initial adapter, and the (lr, epoch) with the best dev metric "
                        "is kept (ties: lower dev loss, then smaller lr, earlier epoch)")
    p.add_argument("--epochs", type=int, default=20,
                   help="most passes over the train split per lr; the best epoch is chosen by "
                        "dev (0: the unadapted model)")
    p.set_defaults(handler=commands.lora)

    p = sub.add_parser("export", help="write a run's adapter as PEFT files or a merged model",
                       formatter_class=fmt)
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--format", choices=("peft", "merged"), default="peft",
                   help="peft: adapter_config.json + adapter_model.safetensors; merged: the "
                        "base model with the deltas merged, save_pretrained format")
    p.add_argument("--out", required=True, metavar="DIR", help="a new or empty folder")
    p.set_defaults(handler=commands.export)

    p = sub.add_parser("compare", help="a table of finished runs", formatter_class=fmt)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=commands.compare)

    p = sub.add_parser("sweep", help="a grid of runs (sources x seeds x --vary values)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SWEEP_EXAMPLES,
                       description="Run every combination of the given presets and config "
                       "files, seeds and --vary values as `dfolora run` processes, --jobs at "
                       "once, each in its own folder under --root; end with the compare table.")
    p.add_argument("--preset", action="append", default=[], metavar="NAME",
                   help="a named config (repeatable: one grid row each)")
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="a YAML config (repeatable; with --preset too)")
    p.add_argument("--seeds", nargs="+", type=int, default=[], metavar="S",
                   help="run seeds (default: each config's own seed)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for every run (repeatable)")
    p.add_argument("--vary", action="append", default=[], metavar="KEY=VALUE",
                   help="one value of a grid axis: repeat a key for each of its values; "
                        "several keys make the product")
    p.add_argument("--root", required=True, metavar="DIR", help="where the run folders go")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP_NUM_THREADS of each run (default 1)")
    p.add_argument("--json", action="store_true", help="end with JSON instead of the table")
    p.add_argument("--quiet", action="store_true", help="no line per run on stderr")
    p.set_defaults(handler=sweep.sweep)

    p = sub.add_parser("presets", help="list the named configs", formatter_class=fmt)
    p.set_defaults(handler=commands.list_presets)
    return top


def _warning_line(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"  # one readable line, not Python's file:line form


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    warnings.formatwarning = _warning_line
    try:
        return args.handler(args) or 0
    except DfoloraError as err:
        commands.discard_refused(args)  # a refused run leaves no half-made folder behind
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        hint = f": resume with `dfolora run --resume --out {out}`" if out else ""
        print(f"\ninterrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
