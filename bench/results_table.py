"""The README's results table: every method of the harness on the demo setting, several seeds.

    python bench/results_table.py [--root runs/results] [--seeds 13 21 42 87 100]
                                  [--templates default instruct] [--jobs 2] [--set KEY=VALUE]

A thin call of `dfolora sweep` (orchestrator/sweep.py): each cell is one run of the demo preset
with `--set seed=S --set task.template=T` in a fresh process (so peak memory is the method's
own), the DFO methods differing only in `schedule.optimizers`, the baselines being the same
config's `dfolora zero-shot` and `dfolora lora` (learning rate and epoch chosen on dev). A
finished cell is skipped and an interrupted DFO cell resumes, as in a sweep. Prints a Markdown
table of mean ± std over seeds (test accuracy, peak memory, evaluations, wall time) and, last,
JSON with every run's figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator import sweep  # noqa: E402

METHODS = {  # name -> (dfolora command, --set items)
    "zero-shot": ("zero-shot", []),
    "dfo cma": ("run", ["schedule.optimizers=[cma]"]),
    "dfo fwa": ("run", ["schedule.optimizers=[fwa]"]),
    "dfo cma+fwa": ("run", ["schedule.optimizers=[cma, fwa]"]),
    "gradient lora": ("lora", []),
}


def cell_name(template: str, method: str, seed: int) -> str:
    return f"{template}-{method.replace(' ', '-').replace('+', '-')}-{seed}"


def cells(args) -> list[tuple[str, str, int, sweep.Cell]]:
    """(template, method, seed, the sweep's cell) for every cell, validated before any runs."""
    out = []
    for template in args.templates:
        for method in args.methods:
            command, sets = METHODS[method]
            grid = sweep.grid(["demo"], [], args.seeds,
                              [f"task.template={template}", *sets, *args.sets], [])
            for seed, cell in zip(args.seeds, grid, strict=True):
                out.append((template, method, seed, dataclasses.replace(
                    cell, command=command, name=cell_name(template, method, seed))))
    return out


def row(root: Path, template: str, method: str, seed: int) -> dict:
    r = json.loads((root / cell_name(template, method, seed) / "results.json").read_text())
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
    parser.add_argument("--seeds", nargs="+", type=int, default=[13, 21, 42, 87, 100])
    parser.add_argument("--templates", nargs="+", default=["default", "instruct"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        metavar="METHOD", help=f"some of: {', '.join(METHODS)}")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per cell")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="more config for every cell, e.g. --set budget=400")
    args = parser.parse_args()
    todo = cells(args)
    codes = sweep.run_cells([c[3] for c in todo], args.root, args.jobs, args.threads)
    failed = [name for name, code in codes.items() if code]
    if failed:
        raise SystemExit(f"failed cells (logs in {args.root / 'logs'}): {', '.join(failed)}")
    rows = [row(args.root, *c[:3]) for c in todo]
    text = table(rows, args.templates)
    (args.root / "table.md").write_text(text + "\n")
    print(text)
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
