"""Zero-shot scores of the unadapted model on the few-shot splits, for one or more templates.

    python -m workers.zeroshot [--model smollm2-135m] [--templates default instruct]
                               [--seed 42] [--k 16] [--max-test 1000]

Prints a table and, as its last line, JSON with the dev/test metrics per template.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from common.config import RunConfig
from common.errors import DfoloraError
from workers import models
from workers.worker import EvalWorker, load_splits


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = RunConfig()
    parser = argparse.ArgumentParser(
        prog="python -m workers.zeroshot", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=defaults.model.name,
                        help="built-in name, Hugging Face hub name or local folder")
    parser.add_argument("--task", default=defaults.task.name)
    parser.add_argument("--templates", nargs="+", default=["default", "instruct"],
                        help="named templates of the task, or literals with {text}")
    parser.add_argument("--label-words", nargs="+", default=None,
                        help="label words (required with a literal template)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--k", type=int, default=defaults.task.k, help="examples per class")
    parser.add_argument("--max-test", type=int, default=defaults.task.max_test,
                        help="test examples scored (class-stratified fixed sample)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    base = RunConfig.from_dict({
        "seed": args.seed,
        "model": {"name": args.model},
        "task": {"name": args.task, "k": args.k, "max_test": args.max_test,
                 "label_words": args.label_words},
    })
    splits = load_splits(base)
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    loaded = models.load(base.model)
    results = {}
    for template in args.templates:
        cfg = base.replace(**{"task.template": template})
        start = time.perf_counter()
        worker = EvalWorker(cfg, loaded=loaded, splits=splits)
        results[template] = {
            "template": worker.prompter.template.text,
            "dev": worker.score("dev"),
            "test": worker.score("test"),
            "seconds": round(time.perf_counter() - start, 1),
        }
    return {"model": args.model, "task": args.task, "seed": args.seed, "k": args.k,
            "results": results}


def main(argv: list[str] | None = None) -> int:
    try:
        report = run(parse_args(argv))
    except DfoloraError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(f"\nzero-shot {report['model']} on {report['task']} (seed {report['seed']}, "
          f"k={report['k']})")
    print(f"{'template':<40} {'dev acc':>8} {'test acc':>9} {'test n':>7}")
    for res in report["results"].values():
        print(f"{res['template']!r:<40} {res['dev']['accuracy']:>8.3f} "
              f"{res['test']['accuracy']:>9.3f} {res['test']['n']:>7}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
