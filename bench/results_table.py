"""The README's results table: every method of the harness on the demo setting, several seeds.

    python bench/results_table.py [--root runs/results] [--seeds 13 42 100]
                                  [--templates default instruct] [--jobs 2]

Each cell is one `dfolora` command in a fresh process (so peak memory is the method's own), with
the demo preset (SmolLM2-135M, Rotten Tomatoes 16-shot, top 6 layers) and `--set seed=S
--set task.template=T`; the DFO methods differ only in `schedule.optimizers`. A finished cell
(its results.json exists) is not run again, so an interrupted table resumes. Prints a Markdown
table of mean ± std over seeds (test accuracy, peak memory, evaluations, wall time) and, last,
JSON with every run's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

METHODS = {  # name -> the dfolora command line after the shared options
    "zero-shot": ["zero-shot"],
    "dfo cma": ["run", "--set", "schedule.optimizers=[cma]"],
    "dfo fwa": ["run", "--set", "schedule.optimizers=[fwa]"],
    "dfo cma+fwa": ["run", "--set", "schedule.optimizers=[cma, fwa]"],
    "gradient lora": ["lora"],
}


def cell_dir(root: Path, template: str, method: str, seed: int) -> Path:
    return root / f"{template}-{method.replace(' ', '-').replace('+', '-')}-{seed}"


def run_cell(root: Path, template: str, method: str, seed: int, args) -> dict:
    out = cell_dir(root, template, method, seed)
    if not (out / "results.json").exists():
        cmd = [sys.executable, "-m", "orchestrator.cli", *METHODS[method], "--preset", "demo",
               "--set", f"seed={seed}", "--set", f"task.template={template}",
               "--out", str(out), "--progress", "quiet", *args.extra]
        if method == "gradient lora":
            cmd += ["--lr", str(args.lora_lr), "--epochs", str(args.lora_epochs)]
        if out.exists() and method.startswith("dfo"):
            cmd.append("--resume")  # an interrupted cell continues from its checkpoint
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        print(f"[table] {out.name} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{out.name} failed:\n{proc.stderr[-2000:]}")
        print(f"[table] {out.name}: {proc.stdout.strip()}", file=sys.stderr, flush=True)
    r = json.loads((out / "results.json").read_text())
    return {"template": template, "method": method, "seed": seed,
            "test": r["final"]["test"]["accuracy"], "dev": r["final"]["dev"]["accuracy"],
            "zero_shot_test": r["zero_shot"]["test"]["accuracy"],
            "evaluations": r["evaluations"], "wall_seconds": r["wall_seconds"],
            "peak_memory_mb": r["peak_memory_mb"], "n_test": r["final"]["test"]["n"]}


def mean_std(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(rows: list[dict], templates: list[str]) -> str:
    lines = ["| template | method | test accuracy | peak memory (MB) | evaluations | wall (s) |",
             "|---|---|---|---|---|---|"]
    for template in templates:
        for method in METHODS:
            cell = [r for r in rows if r["template"] == template and r["method"] == method]
            if not cell:
                continue
            lines.append(
                f"| {template} | {method} | {mean_std([r['test'] for r in cell])} | "
                f"{statistics.mean(r['peak_memory_mb'] for r in cell):.0f} | "
                f"{statistics.mean(r['evaluations'] for r in cell):.0f} | "
                f"{statistics.mean(r['wall_seconds'] for r in cell):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--root", default="runs/results", type=Path)
    parser.add_argument("--seeds", nargs="+", type=int, default=[13, 42, 100])
    parser.add_argument("--templates", nargs="+", default=["default", "instruct"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        metavar="METHOD", help=f"some of: {', '.join(METHODS)}")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per cell")
    parser.add_argument("--lora-lr", type=float, default=2e-3)
    parser.add_argument("--lora-epochs", type=int, default=10)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="more dfolora options for every cell, e.g. --set budget=400")
    args = parser.parse_args()
    cells = [(t, m, s) for t in args.templates for m in args.methods for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda c: run_cell(args.root, *c, args), cells))
    text = table(rows, args.templates)
    (args.root / "table.md").write_text(text + "\n")
    print(text)
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
