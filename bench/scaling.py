"""Strong scaling of a real run: one search (seed, budget) with 0 (in-process), 1, 2, ... actors.

    python bench/scaling.py --actors 0 1 2                      # this 2-core box, SmolLM2, CPU
    python bench/scaling.py --actors 1 2 4 8 --threads 1        # a 16-core machine, CPU actors
    python bench/scaling.py --actors 1 2 4 8 --mode gpu --set model.name=FOLDER   # one GPU, shared

Every setting is a fresh `dfolora run` process over the same preset and `--set` options, with
`cluster.num_actors` = N (0: scored in the driver's process) and one torch thread per scorer
(`--threads`). `--mode gpu` gives the N actors 1/N of the one GPU each (`cluster.gpus_per_actor`)
and puts the model there. Measured per setting, from the run's own metrics: search seconds (the
sum of its generations' times: model loading, calibration and dev/test scoring are left out),
candidates/s, speed-up over the first setting of `--actors` and efficiency (speed-up / actors).
`identical` says whether the setting's trajectory is the first setting's, bit for bit: every
candidate loss of every generation and the committed vectors of the final checkpoint. Chunking is
fixed by the config (docs/design.md §6), so it must hold for every N.

Ends with one JSON line: {"scaling": [{"actors", "mode", "candidates_per_s", "speedup",
"efficiency", "identical", ...}, ...]}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def run_setting(actors: int, args, out: Path) -> None:
    sets = [f"budget={args.budget}", f"schedule.layers={args.layers}",
            f"task.max_test={args.max_test}", f"cluster.num_actors={actors}",
            f"cluster.cpus_per_actor={args.threads}", *args.set]
    if args.mode == "gpu":
        sets += ["model.device=cuda"]
        if actors:
            sets += [f"cluster.gpus_per_actor={1 / actors:.6g}"]
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", "--preset", args.preset,
           "--out", str(out), "--progress", "quiet"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    print(f"[scaling] {actors} actor(s): {' '.join(cmd[3:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: the run with {actors} actor(s) failed:\n{proc.stderr[-2000:]}")


def measure(out: Path) -> dict:
    """Search time and throughput of a finished run, and a fingerprint of its trajectory."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    gens = [r for r in records if r.get("event") == "generation"]
    seconds = sum(r["seconds"] for r in gens)
    evaluations = sum(len(r["losses"]) for r in gens)
    digest = hashlib.sha256()
    for r in gens:
        digest.update(np.asarray(r["losses"], dtype=np.float64).tobytes())
    ckpt = out / "checkpoints"
    step = int((ckpt / "LATEST").read_text())
    with np.load(ckpt / f"ckpt-{step:06d}.npz") as arrays:
        for key in sorted(k for k in arrays.files if k.startswith("vector_")):
            digest.update(arrays[key].tobytes())
    return {"search_seconds": round(seconds, 2), "evaluations": evaluations,
            "candidates_per_s": round(evaluations / seconds, 2), "fingerprint": digest.hexdigest()}


def table(rows: list[dict]) -> str:
    lines = ["| actors | mode | search s | candidates/s | speed-up | efficiency | identical |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['actors'] or 'in-process'} | {r['mode']} | {r['search_seconds']} | "
                     f"{r['candidates_per_s']} | {r['speedup']} | {r['efficiency']} | "
                     f"{r['identical']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--actors", type=int, nargs="+", default=[0, 1, 2],
                        help="settings to run, in order; the first is the speed-up's baseline")
    parser.add_argument("--mode", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--budget", type=int, default=200)
    parser.add_argument("--layers", default="[29,28,27,26]", help="schedule.layers")
    parser.add_argument("--max-test", type=int, default=50,
                        help="test examples scored at the end (not timed; kept small)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per scorer")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="more dfolora --set options, the same for every setting")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the run folders (default: a temporary one)")
    args = parser.parse_args()
    if any(a < 0 for a in args.actors):
        raise SystemExit("error: --actors takes counts >= 0 (0: in-process)")
    root = args.out or Path(tempfile.mkdtemp(prefix="dfolora-scaling-"))
    rows = []
    for actors in args.actors:
        out = root / f"actors-{actors}"
        if not (out / "results.json").exists():
            run_setting(actors, args, out)
        rows.append({"actors": actors, "mode": args.mode, **measure(out)})
    base = rows[0]
    for r in rows:
        r["speedup"] = round(r["candidates_per_s"] / base["candidates_per_s"], 3)
        r["efficiency"] = round(r["speedup"] / max(r["actors"], 1) * max(base["actors"], 1), 3)
        r["identical"] = r["fingerprint"] == base["fingerprint"]
    print(table(rows))
    print(json.dumps({"scaling": [{k: v for k, v in r.items() if k != "fingerprint"}
                                  for r in rows]}))


if __name__ == "__main__":
    main()
