"""Does `eval.calibrate=train` help the unadapted model? Raw and calibrated zero-shot scores.

    python bench/zero_shot_calibration.py --templates default instruct --seeds 13 21 42 87 100

For each template and seed, the demo preset's model and splits are scored once (workers/scorer.py)
and the dev and test metrics computed both ways: raw label logits, and logits less their mean
over that seed's training examples (the `eval.calibrate=train` rule), and logits less the offsets
fitted to the training cross-entropy (`eval.offsets=fit`, keys `*_fit_*`). Dev is what a setting
may be chosen on; test is reported. The last line of stdout is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import RunConfig  # noqa: E402
from orchestrator import presets  # noqa: E402


def other_offsets(parts: dict) -> dict:
    """Test accuracy and dev loss under other two-class offsets estimated on train (a probe, not
    a setting): the mean margin (the `train` rule), its median, and the test split's own mean (an
    oracle). The intercept fitted to the training CE is a setting, `eval.offsets=fit`."""
    import numpy as np

    def margin(split):
        logits = parts[split][0][0]
        return logits[:, 1] - logits[:, 0]

    def ce(m, labels, offset):  # two-class CE of margins shifted by offset
        z = (m - offset) * np.where(labels == 1, 1.0, -1.0)
        return float(np.logaddexp(0.0, -z).mean())

    train = margin("train")
    offsets = {"mean": train.mean(), "median": float(np.median(train)),
               "oracle_test_mean": margin("test").mean()}
    out = {}
    for name, o in offsets.items():
        for split in ("dev", "test"):
            m, y = margin(split), parts[split][0][1]
            out[f"{split}_{name}_accuracy"] = float(((m > o).astype(int) == y).mean())
        out[f"dev_{name}_loss"] = ce(margin("dev"), parts["dev"][0][1], o)
    return out


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
            fitted = calibrated.replace(**{"eval.offsets": "fit"})
            row = {"template": template, "seed": seed}
            for split in ("dev", "test"):
                raw = combine_scores(parts[split], cfg)
                cal = combine_scores(parts[split], calibrated, parts["train"])
                fit = combine_scores(parts[split], fitted, parts["train"])
                row |= {f"{split}_raw_accuracy": raw["accuracy"], f"{split}_raw_loss": raw["loss"],
                        f"{split}_cal_accuracy": cal["accuracy"], f"{split}_cal_loss": cal["loss"],
                        f"{split}_fit_accuracy": fit["accuracy"], f"{split}_fit_loss": fit["loss"]}
            row |= other_offsets(parts)
            rows.append(row)
            print(f"{template:<9} s{seed:<4} dev acc {row['dev_raw_accuracy']:.3f} -> "
                  f"{row['dev_cal_accuracy']:.3f}, loss {row['dev_raw_loss']:.3f} -> "
                  f"{row['dev_cal_loss']:.3f}; test acc {row['test_raw_accuracy']:.3f} -> "
                  f"{row['test_cal_accuracy']:.3f} (fit {row['test_fit_accuracy']:.3f})",
                  flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
