"""Probe: does averaging the deltas of several finished searches ("model soup") beat its members?

    python bench/soup_probe.py --seed 13 --group calib-loss,cl-dim100,cl-ratio1

Each group names `bench/study.py` variants whose runs on `--seed` (same model, data and template,
calibrated) are in `--root`. For every member the run's PEFT adapter is merged into the frozen
model and its test accuracy recomputed under the `eval.calibrate=train` rule (a check against the
run's own figure); then the members' deltas dW = B A (scaling folded in) are averaged, merged,
and scored the same way. Uniform soup: Wortsman et al. 2022, "Model soups", where fine-tuned
models from one initialisation are averaged; here every search starts from the zero delta.
A soup of N rank-r LoRA deltas is itself a LoRA delta of rank N r, so it could be exported.
The last line of stdout is JSON. A diagnosis for docs/study.md, not a setting.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import RunConfig  # noqa: E402
from orchestrator import presets  # noqa: E402


def deltas(run: Path) -> dict:
    """{module name: dW (out, in)} of a run's PEFT adapter, lora_alpha / r folded in."""
    from safetensors.torch import load_file

    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    out = {}
    for key, lora_a in tensors.items():
        if key.endswith("lora_A.weight"):
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            out[name] = scale * tensors[key.replace("lora_A", "lora_B")] @ lora_a
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--group", action="append", required=True,
                        help="comma-separated study variants (repeatable)")
    parser.add_argument("--template", default="default")
    parser.add_argument("--root", type=Path, default=Path("runs/study"))
    args = parser.parse_args()
    import torch

    from workers import models
    from workers.scorer import Scorer, combine_scores, load_splits

    base = presets.load("demo")
    cfg = RunConfig.from_dict({**base, "seed": args.seed, "eval": {"calibrate": "train"},
                               "task": {**base["task"], "template": args.template}})
    loaded = models.load(cfg.model)
    scorer = Scorer(cfg, loaded, load_splits(cfg))

    pristine: dict = {}  # the frozen weights, restored exactly after each scoring

    def accuracy(dw: dict) -> float:
        with torch.no_grad():
            for name, d in dw.items():
                weight = loaded.model.get_submodule(name).weight
                pristine.setdefault(name, weight.clone())
                weight.add_(d)
            train, test = [scorer.predict("train")], [scorer.predict("test")]
            for name in dw:
                loaded.model.get_submodule(name).weight.copy_(pristine[name])
        return combine_scores(test, cfg, train)["accuracy"]

    rows = []
    for group in args.group:
        names = group.split(",")
        members = [deltas(args.root / f"{n}-{args.template}-s{args.seed}") for n in names]
        singles = [accuracy(m) for m in members]
        soup = {k: sum(m[k] for m in members) / len(members) for k in members[0]}
        row = {"seed": args.seed, "members": names, "member_test": singles,
               "member_mean": float(np.mean(singles)), "soup_test": accuracy(soup)}
        rows.append(row)
        print(f"s{args.seed} {'+'.join(names)}: members "
              f"{' '.join(f'{s:.3f}' for s in singles)} (mean {row['member_mean']:.3f}), "
              f"soup {row['soup_test']:.3f}", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
