"""What each `dfolora` subcommand does (the parser is in orchestrator/cli.py).

Every method writes the same run folder files (orchestrator/runfolder.py), so `compare` and the
README's results table read them alike: zero-shot, the DFO search and gradient LoRA each report
`zero_shot.{dev,test}`, `final.{train,dev,test}`, `evaluations`, `wall_seconds`, `peak_memory_mb`.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from common.config import RunConfig
from common.errors import ConfigError
from common.messages import LABEL_OFFSETS
from orchestrator import presets
from orchestrator.reporting import (
    bar_reporter,
    fan_out,
    progress_reporter,
    stream_jsonl_reporter,
    tensorboard_reporter,
)
from orchestrator.runfolder import ADAPTER, CONFIG, RESULTS, RunFolder, read_config
from orchestrator.schedule import selection_metric


def _folder(args, cfg: RunConfig, method: str) -> RunFolder:
    """The run folder of a command that writes at once (zero-shot, lora), made now."""
    folder = RunFolder(_out(args, cfg, method))
    folder.prepare(resume=False)
    args.run_folder = folder  # for discard_refused
    return folder


def _out(args, cfg: RunConfig | None, method: str, resume: bool = False) -> str:
    """--out, or for a new run runs/<task>-<method>-<time> when it is not given."""
    if args.out is None:
        if resume:
            raise ConfigError("--resume needs --out: the folder of the run to continue")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        args.out = str(Path("runs") / f"{cfg.task.name}-{method}-{stamp}")
    return args.out


def discard_refused(args) -> None:
    """After a refusal (a DfoloraError) of zero-shot, lora or export: remove what the command
    created in a run folder that was new or empty, unless it got as far as results
    (docs/reliability.md). `dfolora run` needs none: its driver cleans up itself."""
    folder = getattr(args, "run_folder", None)
    if folder is None or (folder / RESULTS).exists():
        return
    folder.discard()


def _reporter(args, budget: int):
    mode = args.progress
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "lines"
    return {"bar": lambda: bar_reporter(budget), "lines": progress_reporter,
            "json": stream_jsonl_reporter, "quiet": lambda: None}[mode]()


def run(args) -> int:
    """`dfolora run`: the driver decides (new, resumed, forced; orchestrator/driver.py), this
    prints the folder, the trust notice before a checkpoint is read, progress and the outcome."""
    from orchestrator import driver

    given = bool(args.config or args.preset or args.sets)
    cfg = presets.resolve(args.config, args.preset, args.sets) if (
        given or not args.resume) else None
    plan = driver.plan(cfg, _out(args, cfg, "dfo", args.resume), resume=args.resume,
                       force=args.force, notice=lambda line: print(line, file=sys.stderr))
    board = tensorboard_reporter(args.tensorboard) if args.tensorboard else None
    print(f"run folder: {plan.folder.path}", file=sys.stderr)
    reporters = [r for r in (_reporter(args, plan.cfg.budget), board) if r is not None]
    result = driver.execute(plan, reporter=fan_out(*reporters) if reporters else None)
    _print_outcome(driver.results_summary(plan.cfg, result), plan.folder)
    return 0


def _print_outcome(results: dict, folder: RunFolder) -> None:
    metric = results.get("metric", "accuracy")
    zero, final = results["zero_shot"]["test"][metric], results["final"]["test"][metric]
    print(f"{results['method']}: test {metric} {final:.4f} (zero-shot {zero:.4f}, "
          f"{final - zero:+.4f}); {results['evaluations']} evaluations, "
          f"{results['wall_seconds']:.0f} s; outputs in {folder.path}")


def zero_shot(args) -> int:
    from orchestrator.evaluation.local import run_zero_shot

    cfg = presets.resolve(args.config, args.preset, args.sets)
    folder = _folder(args, cfg, "zero-shot")
    folder.write_config(cfg)
    began = time.perf_counter()
    scores, peak_memory_mb = run_zero_shot(cfg)
    results = {"method": "zero-shot", **_identity(cfg),
               "zero_shot": {"dev": scores["dev"], "test": scores["test"]},
               "final": scores, "evaluations": 0,
               "wall_seconds": round(time.perf_counter() - began, 3),
               "peak_memory_mb": peak_memory_mb}
    folder.write_results(results)
    _print_outcome(results, folder)
    return 0


def lora(args) -> int:
    from orchestrator.evaluation.local import train_gradient_lora as train_lora

    cfg = presets.resolve(args.config, args.preset, args.sets)
    lrs = _lr_grid(args.lr)
    if args.epochs < 1:
        raise ConfigError(f"--epochs must be an integer >= 1, got {args.epochs}")
    folder = _folder(args, cfg, "lora")
    folder.write_config(cfg)
    report = _reporter(args, 0) if args.progress in ("json", "lines") else None
    results = train_lora(cfg, lr=lrs, epochs=args.epochs, out_dir=str(folder / ADAPTER),
                         progress=report)
    results = {**results, **_identity(cfg), "metric": selection_metric(cfg)}
    folder.write_results(results)
    _print_outcome(results, folder)
    return 0


def _lr_grid(text) -> list[float]:
    """`--lr`: one learning rate or a comma-separated grid of distinct finite numbers > 0."""
    import math

    values = []
    for part in str(text).split(","):
        try:
            value = float(part)
        except ValueError:
            raise ConfigError(f"--lr: {part.strip()!r} is not a number (give one learning rate "
                              f"or a comma-separated list, e.g. 5e-4,1e-3,2e-3)") from None
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"--lr: learning rates must be finite numbers > 0, got "
                              f"{part.strip()!r}")
        values.append(value)
    if len(set(values)) < len(values):
        raise ConfigError(f"--lr: the learning rates must be distinct, got {text!r}")
    return values


def _identity(cfg: RunConfig) -> dict:
    return {"task": cfg.task.name, "model": cfg.model.name, "template": cfg.task.template,
            "seed": cfg.seed, "metric": selection_metric(cfg)}


def export(args) -> int:
    source = RunFolder(args.run_dir)
    adapter = source / ADAPTER
    if not (adapter / "adapter_config.json").exists():
        raise ConfigError(f"'{args.run_dir}' has no {ADAPTER}/adapter_config.json: not a "
                          f"finished run folder")
    out = RunFolder(args.out)
    out.prepare(resume=False)
    args.run_folder = out  # for discard_refused
    if args.format == "peft":
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copyfile(adapter / name, out / name)
    else:
        from orchestrator.evaluation.local import merge_adapter

        merge_adapter(RunConfig.from_dict(read_config(source / CONFIG)), adapter, out.path)
    if (adapter / LABEL_OFFSETS).exists():  # eval.calibrate: the decision rule travels along
        shutil.copyfile(adapter / LABEL_OFFSETS, out / LABEL_OFFSETS)
    print(f"{args.format} export of {args.run_dir} written to {out.path}")
    return 0


def compare(args) -> int:
    print_compare(compare_rows(args.run_dirs), as_json=args.json)
    return 0


def compare_rows(run_dirs: list[str]) -> list[dict]:
    """One row per finished run folder (`dfolora compare`, `dfolora sweep`)."""
    rows = []
    for path in run_dirs:
        r = RunFolder(path).read_results()
        metric = r.get("metric", "accuracy")
        final = r.get("final") or {}
        rows.append({"run": path, "method": r.get("method"), "template": r.get("template"),
                     "seed": r.get("seed"), "metric": metric,
                     **{split: (final.get(split) or {}).get(metric) for split in
                        ("train", "dev", "test")},
                     "zero_shot_test": r["zero_shot"]["test"][metric],
                     "evaluations": r.get("evaluations"), "wall_seconds": r.get("wall_seconds"),
                     "peak_memory_mb": r.get("peak_memory_mb")})
    return rows


def print_compare(rows: list[dict], as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    head = (f"{'run':<28} {'method':<18} {'seed':>4} {'train':>6} {'dev':>6} {'test':>6} "
            f"{'0-shot':>6} {'evals':>6} {'wall s':>7} {'peak MB':>8}")
    print(head)
    for row in rows:
        print(f"{_cut(row['run'], 28):<28} {_cut(row['method'], 18):<18} {row['seed']:>4} "
              f"{_fmt(row['train'])} {_fmt(row['dev'])} {_fmt(row['test'])} "
              f"{_fmt(row['zero_shot_test'])} {row['evaluations'] or 0:>6} "
              f"{row['wall_seconds'] or 0:>7.0f} {row['peak_memory_mb'] or 0:>8.0f}")


def _fmt(value) -> str:
    return f"{value:>6.3f}" if isinstance(value, (int, float)) else f"{'-':>6}"


def _cut(text, width: int) -> str:
    text = str(text)
    return text if len(text) <= width else "…" + text[-(width - 1):]


def list_presets(args) -> int:
    for name in presets.names():
        print(f"{name:<28} {presets.describe(name)}")
    return 0
