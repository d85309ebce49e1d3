"""A small real run of the local driver: SmolLM2 + Rotten Tomatoes 16-shot, top layers only.

    python bench/small_run.py OUT_DIR [--budget 600] [--optimizers cma] [--template default]

Prints the driver's progress on stderr and, last, JSON with zero-shot and final accuracies. This is
the check that a short search beats zero-shot on dev and test (written before the CLI).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import RunConfig  # noqa: E402
from orchestrator.driver import run  # noqa: E402
from orchestrator.reporting import progress_reporter  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--budget", type=int, default=600)
    parser.add_argument("--optimizers", default="cma", help="comma-separated, e.g. cma,fwa")
    parser.add_argument("--template", default="default")
    parser.add_argument("--layers", default="29,28,27,26,25,24")
    parser.add_argument("--max-test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--actors", type=int, default=0, help="Ray actors (0: in-process)")
    args = parser.parse_args()
    cfg = RunConfig.from_dict({
        "seed": args.seed, "budget": args.budget,
        "task": {"max_test": args.max_test, "template": args.template},
        "schedule": {"layers": [int(x) for x in args.layers.split(",")],
                     "optimizers": args.optimizers.split(",")},
        "cluster": {"num_actors": args.actors},
    })
    start = time.time()
    res = run(cfg, args.out_dir, reporter=progress_reporter())
    print(json.dumps({
        "zero_shot": {k: res.zero_shot[k]["accuracy"] for k in ("dev", "test")},
        "final": {k: res.final[k]["accuracy"] for k in ("train", "dev", "test")},
        "best_dev_round": res.best_dev["round"], "evaluations": res.evaluations,
        "wall_s": round(time.time() - start, 1),
    }))


if __name__ == "__main__":
    main()
