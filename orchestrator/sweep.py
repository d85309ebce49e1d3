"""`dfolora sweep`: a grid of runs, each a `dfolora run` process in its own run folder.

The grid is sources (presets and config files) x seeds x the values of every `--vary` key, on
top of the `--set` overrides every run shares. Every run's config is resolved and validated
before anything starts, so a mistake is one error line naming the offending value and nothing
is written. A run is `dfolora run ... --out ROOT/NAME --resume` in a child process (the same
code, OMP_NUM_THREADS from --threads), `--jobs` at once: a finished run (results.json) is
skipped, an interrupted one continues from its checkpoint (docs/design.md §8), a new one starts.
A cell may also be a baseline on the same config (`Cell.command` lora or zero-shot, used by
bench/results_table.py): those cannot resume, so an unfinished one starts again.
A run's console output goes to ROOT/logs/NAME.log. On a Ray cluster the children inherit
RAY_ADDRESS, so each run's actors land on the cluster (deploy/README.md). The sweep ends with
the `dfolora compare` table of the finished runs.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError, DfoloraError
from orchestrator import presets
from orchestrator.runfolder import CHECKPOINTS, RESULTS
from orchestrator.validation import validate_run

ROOT = Path(__file__).resolve().parents[1]  # the code the children run


@dataclass(frozen=True)
class Cell:
    """One run of the grid: a source (`--preset NAME` or `--config FILE`, or neither: the
    defaults), its `--set` overrides, and the run folder name under the sweep's root."""

    source: tuple[str, ...]
    sets: tuple[str, ...]
    name: str
    command: str = "run"  # or a baseline on the same config: lora, zero-shot (never resumed)

    def argv(self, folder: Path) -> list[str]:
        sets = [arg for item in self.sets for arg in ("--set", item)]
        resume = ["--resume"] if self.command == "run" else []
        return [self.command, *self.source, *sets, "--out", str(folder), "--progress", "quiet",
                *resume]


def axes(vary: list[str]) -> list[tuple[str, list[str]]]:
    """`--vary KEY=VALUE` items grouped by key, in the order given: one axis per key."""
    grouped: dict[str, list[str]] = {}
    for item in vary:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"--vary '{item}': expected KEY=VALUE, e.g. --vary task.k=8")
        values = grouped.setdefault(key, [])
        if value in values:
            raise ConfigError(f"--vary {key}: the value '{value}' is given twice")
        values.append(value)
    return list(grouped.items())


def grid(presets_: list[str], configs: list[str], seeds: list[int], sets: list[str],
         vary: list[str]) -> list[Cell]:
    """Every cell, validated (a ConfigError names the offending run and value)."""
    sources = [("--preset", p) for p in presets_] + [("--config", c) for c in configs] or [()]
    seeds_ = [[f"seed={s}"] for s in seeds] or [[]]
    varied = [[f"{key}={value}" for value in values] for key, values in axes(vary)]
    cells, names = [], {}
    for source, seed, combo in itertools.product(sources, seeds_, itertools.product(*varied)):
        cell_sets = (*sets, *seed, *combo)
        label = " ".join([*source, *(f"--set {s}" for s in (*seed, *combo))]) or "defaults"
        try:
            cfg = presets.resolve(config=source[1] if source[:1] == ("--config",) else None,
                                  preset=source[1] if source[:1] == ("--preset",) else None,
                                  sets=list(cell_sets))
            validate_run(cfg)
        except DfoloraError as err:
            raise ConfigError(f"run {label}: {err}") from None
        name = cell_name(source, cfg.seed, combo)
        if name in names:
            raise ConfigError(f"runs {names[name]} and {label} would share the folder '{name}'")
        names[name] = label
        cells.append(Cell(tuple(source), cell_sets, name))
    return cells


def cell_name(source: tuple[str, ...], seed: int, combo: tuple[str, ...]) -> str:
    """`<preset or config stem>-seed<S>[-<key>=<value>...]`, in file-name-safe characters."""
    def safe(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9._+]+", "_", text).strip("_")

    base = Path(source[1]).stem if source else "defaults"
    varied = ["=".join(safe(x) for x in item.split("=", 1)) for item in combo]
    return "-".join([safe(base), f"seed{seed}", *varied])


def state(folder: Path) -> str:
    """finished (results.json), resumable (a checkpoint) or new."""
    if (folder / RESULTS).exists():
        return "finished"
    return "resumable" if (folder / CHECKPOINTS / "LATEST").exists() else "new"


def run_cells(cells: list[Cell], root: Path, jobs: int = 1, threads: int = 1,
              say=None) -> dict[str, int]:
    """Run the cells not finished yet, `jobs` at once; exit code per cell name (0 for the
    ones already finished). Ctrl-C reaches the children too (they checkpoint and stop); cells
    not started then are not started."""
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    (root / "logs").mkdir(parents=True, exist_ok=True)
    stop = threading.Event()

    def one(cell: Cell) -> int:
        folder = root / cell.name
        now = state(folder)
        if now == "finished":
            say(f"[sweep] {cell.name}: finished before, skipped")
            return 0
        if stop.is_set():
            return 130
        if cell.command != "run" and folder.exists():
            # a baseline cannot resume: what an interrupted one left (never results) goes
            shutil.rmtree(folder)
        say(f"[sweep] {cell.name}: {'resuming' if now == 'resumable' else 'starting'}")
        with open(root / "logs" / f"{cell.name}.log", "ab") as log:
            code = subprocess.run([sys.executable, "-m", "orchestrator.cli",
                                   *cell.argv(folder)], env=env, stdout=log,
                                  stderr=subprocess.STDOUT).returncode
        say(f"[sweep] {cell.name}: " + ("done" if code == 0 else f"exit code {code}"))
        if code == 130:
            stop.set()
        return code

    with ThreadPoolExecutor(jobs) as pool:
        futures = {cell.name: pool.submit(one, cell) for cell in cells}
        try:
            return {name: future.result() for name, future in futures.items()}
        except KeyboardInterrupt:
            stop.set()
            raise


def last_error(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["(no output)"])[-1]


def sweep(args) -> int:
    from orchestrator.commands import compare_rows, print_compare

    if args.jobs < 1 or args.threads < 1:
        raise ConfigError(f"--jobs and --threads must be >= 1, got {args.jobs} and "
                          f"{args.threads}")
    cells = grid(args.preset, args.config, args.seeds, args.sets, args.vary)
    root = Path(args.root)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"sweep root '{root}' is a file")
    say = (lambda line: None) if args.quiet else None
    try:
        codes = run_cells(cells, root, args.jobs, args.threads, say)
    except KeyboardInterrupt:
        codes = {"": 130}
    finished = [root / c.name for c in cells if state(root / c.name) == "finished"]
    if finished:
        print_compare(compare_rows([str(f) for f in finished]), as_json=args.json)
    failed = [name for name, code in codes.items() if code not in (0, 130)]
    for name in failed:
        print(f"error: run {name} failed (exit code {codes[name]}): "
              f"{last_error(root / 'logs' / f'{name}.log')}", file=sys.stderr)
    if 130 in codes.values():
        print("interrupted: run the same command again to resume (finished runs are skipped)",
              file=sys.stderr)
        return 130
    return 1 if failed else 0
