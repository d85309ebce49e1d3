"""How much of a finished run's test error is label bias (docs/study.md, "Where the errors are").

    python bench/label_bias.py RUN_DIR [RUN_DIR ...]

For each run folder with a PEFT adapter (`dfolora run` or `dfolora lora`), the adapter is put on
the base model and train, dev and test are scored through the run's own scorer
(workers/scorer.py). Printed per run: the predicted class counts on test and the test accuracy
of the raw logits (as scored with `eval.calibrate=off`), and the test accuracy with the
two-class margin (logit of class 1 minus class 0) re-centred by its mean over the balanced
train split (the `eval.calibrate=train` rule), by its median there, or by its median over dev.
A diagnosis: the run's adapter is not changed. Two-class tasks only.
The last line of stdout is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import RunConfig  # noqa: E402
from orchestrator.runfolder import ADAPTER, CONFIG, read_config  # noqa: E402


def accuracy(margin: np.ndarray, labels: np.ndarray, offset: float = 0.0) -> float:
    return float(np.mean((margin - offset > 0).astype(int) == labels))


def probe(run: Path, loaded) -> dict:
    from peft import PeftModel

    from workers.scorer import Scorer, load_splits

    cfg = RunConfig.from_dict(read_config(run / CONFIG))
    peft = PeftModel.from_pretrained(loaded.model, str(run / ADAPTER))  # injected in place
    try:
        scorer = Scorer(cfg, loaded, load_splits(cfg))
        scored = {split: scorer.predict(split) for split in ("train", "dev", "test")}
    finally:
        peft.unload()
    if scored["test"][0].shape[1] != 2:
        raise SystemExit(f"error: {run} is not a two-class task")
    margin = {split: logits[:, 1] - logits[:, 0] for split, (logits, _) in scored.items()}
    labels = {split: gold for split, (_, gold) in scored.items()}
    return {"run": str(run),
            "test_predicted": np.bincount((margin["test"] > 0).astype(int), minlength=2).tolist(),
            "test_accuracy": accuracy(margin["test"], labels["test"]),
            "test_accuracy_train_mean_centred": accuracy(margin["test"], labels["test"],
                                                         float(np.mean(margin["train"]))),
            "test_accuracy_train_centred": accuracy(margin["test"], labels["test"],
                                                    float(np.median(margin["train"]))),
            "test_accuracy_dev_centred": accuracy(margin["test"], labels["test"],
                                                  float(np.median(margin["dev"])))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders")
    args = parser.parse_args()
    for run in args.runs:
        if not (run / ADAPTER / "adapter_config.json").exists():
            raise SystemExit(f"error: {run} has no {ADAPTER}/adapter_config.json")
    from workers import models

    loaded = models.load(RunConfig.from_dict(read_config(args.runs[0] / CONFIG)).model)
    rows = []
    for run in args.runs:
        rows.append(probe(run, loaded))
        r = rows[-1]
        print(f"{run.name:<28} predicted {r['test_predicted']} test {r['test_accuracy']:.3f} "
              f"train-mean-centred {r['test_accuracy_train_mean_centred']:.3f} "
              f"train-centred {r['test_accuracy_train_centred']:.3f} "
              f"dev-centred {r['test_accuracy_dev_centred']:.3f}", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
