"""Does `eval.calibrate=train` help the unadapted model? Raw and calibrated zero-shot scores.

    python bench/zero_shot_calibration.py --templates default instruct --seeds 13 21 42 87 100

For each template and seed, the demo preset's model and splits are scored once (workers/scorer.py)
and the dev and test metrics computed both ways: raw label logits, and logits less their mean
over that seed's training examples (the `eval.calibrate=train` rule). Dev is what a setting may
be chosen on; test is reported. The last line of stdout is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import RunConfig  # noqa: E402
from orchestrator import presets  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--templates", nargs="+", default=["default", "instruct"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[13, 21, 42, 87, 100])
    parser.add_argument("--preset", default="demo")
    args = parser.parse_args()
    from workers import models
    from workers.scorer import Scorer, combine_scores, load_splits

    base = presets.load(args.preset)
    loaded = models.load(RunConfig.from_dict(base).model)
    rows = []
    for template in args.templates:
        for seed in args.seeds:
            cfg = RunConfig.from_dict({**base, "seed": seed,
                                       "task": {**base["task"], "template": template}})
            scorer = Scorer(cfg, loaded, load_splits(cfg))
            parts = {split: [scorer.predict(split)] for split in ("train", "dev", "test")}
            calibrated = cfg.replace(**{"eval.calibrate": "train"})
            row = {"template": template, "seed": seed}
            for split in ("dev", "test"):
                raw = combine_scores(parts[split], cfg)
                cal = combine_scores(parts[split], calibrated, parts["train"])
                row |= {f"{split}_raw_accuracy": raw["accuracy"], f"{split}_raw_loss": raw["loss"],
                        f"{split}_cal_accuracy": cal["accuracy"], f"{split}_cal_loss": cal["loss"]}
            rows.append(row)
            print(f"{template:<9} s{seed:<4} dev acc {row['dev_raw_accuracy']:.3f} -> "
                  f"{row['dev_cal_accuracy']:.3f}, loss {row['dev_raw_loss']:.3f} -> "
                  f"{row['dev_cal_loss']:.3f}; test acc {row['test_raw_accuracy']:.3f} -> "
                  f"{row['test_cal_accuracy']:.3f}", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
