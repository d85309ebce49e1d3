"""The search study (docs/study.md): named variants of the demo setting x five seeds, paired.

    python bench/study.py --variants base param-b --seeds 13 21 42 87 100 --jobs 2 --threads 1
    python bench/study.py --report base param-b lora      # the table only, from finished runs

Each variant is a list of `dfolora` options on top of `--preset demo --set seed=S`; each run is
a fresh process writing `runs/study/<variant>-<template>-s<seed>/` (a finished run, with its
results.json, is not run again; an interrupted DFO run resumes). The report is a Markdown table
per variant: test accuracy (mean ± std over seeds), dev accuracy and loss of the selected
snapshot, zero-shot test, the paired difference against `--against` per seed (mean ± std), peak
memory, wall time, and the command that reproduces the row. Settings are chosen on dev; test is
only reported.
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

SEEDS = (13, 21, 42, 87, 100)
WORDS_3 = "task.label_words=[[negative, bad, terrible], [positive, good, great]]"

CALIB_LOSS = ["run", "--set", "eval.calibrate=train", "--set", "schedule.select=loss"]
AUTO_LOSS = ["run", "--set", "eval.calibrate=auto", "--set", "schedule.select=loss"]

VARIANTS: dict[str, list[str]] = {  # name -> dfolora arguments after `--preset demo`
    "zero-shot": ["zero-shot"],
    "lora": ["lora"],  # gradient LoRA, lr and epoch chosen on dev (its own default grid)
    "base": ["run"],
    "param-b": ["run", "--set", "adapter.param=b"],
    "param-a": ["run", "--set", "adapter.param=a"],
    "select-loss": ["run", "--set", "schedule.select=loss"],
    "recenter": ["run", "--set", "schedule.recenter=visit"],
    "l2": ["run", "--set", "schedule.l2=0.05"],  # too strong at sigma0 1: nothing is accepted
    "l2x4": ["run", "--set", "schedule.l2=0.2"],
    "l2s": ["run", "--set", "schedule.l2=0.005"],
    # label logits centred on their train means, in the loss and in every score (fifth session)
    "calib": ["run", "--set", "eval.calibrate=train"],
    "calib-loss": CALIB_LOSS,
    "zero-shot-calib": ["zero-shot", "--set", "eval.calibrate=train"],
    "calib-loss-1200": [*CALIB_LOSS, "--set", "budget=1200"],
    # the demo preset after the fifth session (eval.calibrate=auto, schedule.select=loss)
    "auto-loss": AUTO_LOSS,
    "lora-calib": ["lora", "--set", "eval.calibrate=train"],  # scoring only: LoRA's loss is CE
    # sixth session: one lever at a time on top of calib-loss (= the demo preset on `default`)
    "cl-words3": [*CALIB_LOSS, "--set", WORDS_3],
    "cl-ratio1": [*CALIB_LOSS, "--set", "adapter.ratio_bounds=[1.0,1.0]"],
    "cl-dim100": [*CALIB_LOSS, "--set", "adapter.dim=100"],
    "cl-recenter": [*CALIB_LOSS, "--set", "schedule.recenter=visit"],
    "cl-l2s": [*CALIB_LOSS, "--set", "schedule.l2=0.005"],
    "cl-dim100-l2s": [*CALIB_LOSS, "--set", "adapter.dim=100", "--set", "schedule.l2=0.005"],
    "auto-loss-dim100": [*AUTO_LOSS, "--set", "adapter.dim=100"],  # the demo preset, d 100
    # seventh session: the untried levers (population, separable CMA-ES, generations
    # per visit), one at a time on top of calib-loss
    "cl-pop10": [*CALIB_LOSS, "--set", "optimizer.popsize=10"],
    "cl-pop40": [*CALIB_LOSS, "--set", "optimizer.popsize=40"],
    "cl-gpv2": [*CALIB_LOSS, "--set", "schedule.generations_per_visit=2"],
    # Nevergrad's DiagonalCMA (pycma with CMA_diagonal: separable CMA-ES) in CMA-ES's place
    "cl-diag": [*CALIB_LOSS, "--set", "schedule.optimizers=[nevergrad:DiagonalCMA, fwa]"],
    "cl-sep": [*CALIB_LOSS, "--set", "optimizer.cma_diagonal=true"],  # pycma's own separable
    # label offsets fitted to the training cross-entropy instead of the label means
    "cl-fit": [*CALIB_LOSS, "--set", "eval.offsets=fit"],
    "auto-fit": [*AUTO_LOSS, "--set", "eval.offsets=fit"],  # the demo preset since the 7th
    # candidate demo presets: separable CMA-ES (Nevergrad's or pycma's) with fitted offsets
    "auto-loss-diag": [*AUTO_LOSS, "--set", "schedule.optimizers=[nevergrad:DiagonalCMA, fwa]"],
    "auto-fit-diag": [*AUTO_LOSS, "--set", "eval.offsets=fit",
                      "--set", "schedule.optimizers=[nevergrad:DiagonalCMA, fwa]"],
    "auto-fit-sep": [*AUTO_LOSS, "--set", "eval.offsets=fit",
                     "--set", "optimizer.cma_diagonal=true"],
    "zero-shot-fit": ["zero-shot", "--set", "eval.calibrate=train", "--set", "eval.offsets=fit"],
    "ratio005": ["run", "--set", "adapter.ratio_bounds=[0.05,0.05]"],
    "hinge": ["run", "--set", "eval.loss=hinge"],
    "layers3": ["run", "--set", "schedule.layers=[29,28,27]"],
    "layers2": ["run", "--set", "schedule.layers=[29,28]"],
    "alpha2": ["run", "--set", "adapter.alpha=2"],
    "alpha05": ["run", "--set", "adapter.alpha=0.5"],
    "cma": ["run", "--set", "schedule.optimizers=[cma]"],
    "mean": ["run", "--set", "schedule.accept=mean"],
    "cma-mean": ["run", "--set", "schedule.optimizers=[cma]", "--set", "schedule.accept=mean"],
    "cma-mean-1200": ["run", "--set", "schedule.optimizers=[cma]", "--set", "schedule.accept=mean",
                      "--set", "budget=1200"],
    "noclamp": ["run", "--set", "adapter.ratio_bounds=null"],
    "ratio1": ["run", "--set", "adapter.ratio_bounds=[1.0,1.0]"],
    "ratio04": ["run", "--set", "adapter.ratio_bounds=[0.4,0.4]"],
    "dim100": ["run", "--set", "adapter.dim=100"],
    "dim40": ["run", "--set", "adapter.dim=40"],
    "words3": ["run", "--set", WORDS_3],
    "pca": ["run", "--set", "adapter.basis=input-pca"],
    "energy": ["run", "--set", "adapter.basis=input-energy"],
    "pca8": ["run", "--set", "adapter.basis=input-pca", "--set", "adapter.basis_rank=8"],
    "lora-words3": ["lora", "--set", WORDS_3],
    "zero-shot-words3": ["zero-shot", "--set", WORDS_3],
}


def add_variant(spec: str) -> str:
    """`name=OPTIONS...` defines a variant on the command line (options split on spaces,
    `--set` values may not contain spaces then); a plain name must be in VARIANTS."""
    if "=" in spec.split()[0] and not spec.startswith("--"):
        name, _, rest = spec.partition("=")
        parts = rest.split()
        VARIANTS[name] = parts if parts and parts[0] in ("run", "lora", "zero-shot") else [
            "run", *parts]
        return name
    if spec not in VARIANTS:
        raise SystemExit(f"error: unknown variant {spec!r}; known: {', '.join(VARIANTS)}")
    return spec


# The demo preset as the study's first four sessions ran it: the fifth changed the preset's
# calibration and snapshot rule (variant auto-loss), the seventh its offsets (variant auto-fit),
# so every variant pins the old ones first
BEFORE = ["--set", "eval.calibrate=off", "--set", "schedule.select=metric",
          "--set", "eval.offsets=mean"]


def command(name: str, seed: int, template: str, root: Path) -> list[str]:
    args = VARIANTS[name]
    return ["dfolora", args[0], "--preset", "demo", "--set", f"seed={seed}",
            "--set", f"task.template={template}", *BEFORE, *args[1:],
            "--out", str(root / run_name(name, seed, template)), "--progress", "quiet"]


def run_name(name: str, seed: int, template: str) -> str:
    return f"{name}-{template}-s{seed}"


def run_one(name: str, seed: int, template: str, root: Path, threads: int) -> None:
    out = root / run_name(name, seed, template)
    if (out / "results.json").exists():
        return
    cmd = [sys.executable, "-m", "orchestrator.cli", *command(name, seed, template, root)[1:]]
    if out.exists() and VARIANTS[name][0] == "run":
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    print(f"[study] {out.name} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    status = proc.stdout.strip() if proc.returncode == 0 else f"FAILED\n{proc.stderr[-1500:]}"
    print(f"[study] {out.name}: {status}", file=sys.stderr, flush=True)


FIGURES = Path("docs/figures/study_runs.json")  # per-run figures of every finished study run


def figure(r: dict, name: str) -> dict:
    """The per-run record kept in FIGURES, from a run's results.json."""
    return {"method": r["method"], "seed": r["seed"], "template": r["template"],
            "test_accuracy": r["final"]["test"]["accuracy"],
            "dev_accuracy": r["final"]["dev"]["accuracy"], "dev_loss": r["final"]["dev"]["loss"],
            "zero_shot_test": r["zero_shot"]["test"]["accuracy"],
            "evaluations": r.get("evaluations"), "peak_memory_mb": r["peak_memory_mb"],
            "wall_seconds": r["wall_seconds"], "settings": r.get("settings") or {}}


def save_figures(root: Path, path: Path = FIGURES) -> int:
    """Merge every finished run under `root` into the figures file; returns how many it holds."""
    kept = json.loads(path.read_text()) if path.exists() else {}
    for results in sorted(root.glob("*/results.json")):
        kept[results.parent.name] = figure(json.loads(results.read_text()), results.parent.name)
    path.write_text(json.dumps(dict(sorted(kept.items())), indent=1) + "\n")
    return len(kept)


def load(name: str, seed: int, template: str, root: Path) -> dict | None:
    """A finished run's figures: from its results.json, else from FIGURES (a fresh checkout
    reports the committed runs without rerunning them)."""
    path = root / run_name(name, seed, template) / "results.json"
    if not path.exists():
        kept = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
        f = kept.get(run_name(name, seed, template))
        if f is None:
            return None
        return {"test": f["test_accuracy"], "dev": f["dev_accuracy"], "dev_loss": f["dev_loss"],
                "zero": f["zero_shot_test"], "memory": f["peak_memory_mb"],
                "wall": f["wall_seconds"], "settings": f.get("settings")}
    r = json.loads(path.read_text())
    return {"test": r["final"]["test"]["accuracy"], "dev": r["final"]["dev"]["accuracy"],
            "dev_loss": r["final"]["dev"]["loss"], "zero": r["zero_shot"]["test"]["accuracy"],
            "memory": r["peak_memory_mb"], "wall": r["wall_seconds"],
            "settings": r.get("settings")}


def mean_std(values: list[float], digits: int = 3, sign: bool = False) -> str:
    fmt = f"{{:+.{digits}f}}" if sign else f"{{:.{digits}f}}"
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {statistics.stdev(values):.{digits}f}"


def report(names: list[str], seeds: list[int], template: str, root: Path, against: str) -> str:
    base = {s: load(against, s, template, root) for s in seeds}
    lines = [f"template `{template}`, seeds {' '.join(map(str, seeds))}; paired: minus "
             f"`{against}` on the same seed", "",
             "| variant | n | test acc | dev acc | dev loss | zero-shot test | paired test diff "
             "| peak MB | wall s | command |", "|---|---|---|---|---|---|---|---|---|---|"]
    rows = {}
    for name in names:
        runs = {s: load(name, s, template, root) for s in seeds}
        got = {s: r for s, r in runs.items() if r is not None}
        if not got:
            continue
        diffs = [got[s]["test"] - base[s]["test"] for s in got if base.get(s)]
        rows[name] = {s: r["test"] for s, r in got.items()}
        cmd = " ".join(command(name, "S", template, root)[:-4])
        lines.append(
            f"| {name} | {len(got)} | {mean_std([r['test'] for r in got.values()])} "
            f"| {mean_std([r['dev'] for r in got.values()])} "
            f"| {mean_std([r['dev_loss'] for r in got.values()])} "
            f"| {mean_std([r['zero'] for r in got.values()])} "
            f"| {mean_std(diffs, sign=True) if name != against else '-'} "
            f"| {statistics.mean(r['memory'] for r in got.values()):.0f} "
            f"| {statistics.mean(r['wall'] for r in got.values()):.0f} | `{cmd}` |")
    lines += ["", "per seed (test accuracy): " + json.dumps(rows)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--variants", nargs="*", default=[], action="extend",
                        help="variants to run (then report)")
    parser.add_argument("--report", nargs="*", default=None, help="variants to report only")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--template", default="default")
    parser.add_argument("--root", default="runs/study", type=Path)
    parser.add_argument("--against", default="lora", help="the paired baseline variant")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--save-figures", action="store_true",
                        help=f"merge every finished run's figures into {FIGURES}")
    args = parser.parse_args()
    names = [add_variant(v) for v in args.variants]
    cells = [(n, s) for s in args.seeds for n in names]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda c: run_one(c[0], c[1], args.template, args.root, args.threads),
                      cells))
    shown = [add_variant(v) for v in (args.report if args.report is not None else names)]
    print(report(shown, args.seeds, args.template, args.root, args.against))
    if args.save_figures:
        print(f"{FIGURES}: {save_figures(args.root)} runs", file=sys.stderr)


if __name__ == "__main__":
    main()
