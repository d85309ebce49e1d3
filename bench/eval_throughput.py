"""Worker throughput and memory against the authors' way of scoring candidates.

    python bench/eval_throughput.py [--popsize 20] [--layers all] [--ref-candidates 3]

Speed (this process): a full round over the chosen layers, one generation of `--popsize`
candidates per layer, scored by `EvalWorker.evaluate` (merged committed layers, prefix reuse,
candidate stacking, label-only logits), against the reference loop of workers/reference.py (every
candidate: unmerged adapters on all layers, full forward of the whole training set as one padded
batch, full-vocabulary logits at every position, one candidate at a time). The reference costs the
same at every layer, so it is timed on `--ref-candidates` candidates spread over the layers; the
fast path's losses are checked against it on those candidates.

Memory (two fresh processes): peak RSS of population scoring as the worker runs it by default vs
one training step of gradient LoRA as workers/gradient_lora.py takes it (PEFT, same rank, q/k,
label-word head, same 32 examples in one batch, AdamW), in a process with no EvalWorker.
`memory_ratio_vs_backprop` compares the peaks' increase over the loaded model; the peak is reset
after loading (/proc/self/clear_refs) so load-time transients do not count.

The last line of output is JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import RunConfig  # noqa: E402


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def config(args) -> RunConfig:
    return RunConfig.from_dict({"model": {"name": args.model}, "task": {"k": 16, "max_test": 8},
                                "seed": args.seed})


def speed(args) -> dict:
    import torch

    from workers.reference import reference_losses
    from workers.worker import EvalWorker

    worker = EvalWorker(config(args))
    layers = list(range(worker.n_layers)) if args.layers == "all" else [
        int(x) for x in args.layers.split(",")]
    rng = np.random.default_rng(args.seed)
    pops = {layer: rng.standard_normal((args.popsize, worker.dim)) for layer in layers}
    worker.evaluate(layers[-1], pops[layers[-1]][:1])  # warm-up
    per_layer = {}
    start = time.perf_counter()
    for layer in layers:
        t = time.perf_counter()
        worker.evaluate(layer, pops[layer])
        per_layer[layer] = time.perf_counter() - t
        print(f"layer {layer:2d}: {args.popsize / per_layer[layer]:7.2f} candidates/s",
              file=sys.stderr, flush=True)
    fast_seconds = time.perf_counter() - start
    one_batch = worker.prompter.batches(worker.examples["train"], len(worker.examples["train"]))
    one_batch = [b.to(worker.device) for b in one_batch]
    ref_layers = np.linspace(0, len(layers) - 1, args.ref_candidates).round().astype(int)
    ref_seconds, max_rel = 0.0, 0.0
    for i in ref_layers:
        layer, z = layers[i], pops[layers[i]][:1]
        t = time.perf_counter()
        ref = reference_losses(worker, layer, z, batches=one_batch)
        ref_seconds += time.perf_counter() - t
        fast = worker.evaluate(layer, z).losses
        max_rel = max(max_rel, float(np.max(np.abs(fast - ref) / np.abs(ref))))
    evals = args.popsize * len(layers)
    evals_per_s = evals / fast_seconds
    ref_per_s = len(ref_layers) / ref_seconds
    return {
        "evals_per_s": round(evals_per_s, 3),
        "reference_evals_per_s": round(ref_per_s, 3),
        # a whole round's throughput: what a run sees (the conservative figure)
        "speedup_vs_reference": round(evals_per_s / ref_per_s, 2),
        # the mean over layers of each layer's own speedup (deep layers count as much as early)
        "mean_layer_speedup_vs_reference": round(
            float(np.mean([args.popsize / v for v in per_layer.values()])) / ref_per_s, 2),
        "per_layer_evals_per_s": {str(k): round(args.popsize / v, 2) for k, v in per_layer.items()},
        "fast_vs_reference_max_rel_diff": max_rel,
        "popsize": args.popsize, "layers": len(layers), "threads": torch.get_num_threads(),
        "train_examples": len(worker.examples["train"]),
    }


def memory_dfo(args) -> dict:
    from workers import models
    from workers.worker import EvalWorker

    cfg = config(args)
    loaded = models.load(cfg.model)
    base = rss_mb("VmRSS")
    reset_peak()
    worker = EvalWorker(cfg, loaded=loaded)
    rng = np.random.default_rng(args.seed)
    for layer in range(worker.n_layers):  # every layer's maps and committed weights, as in a run
        worker.commit(layer, rng.standard_normal(worker.dim) * 0.1)
    for layer in (0, worker.n_layers - 1):  # the deepest and the shallowest suffix
        worker.evaluate(layer, rng.standard_normal((args.popsize, worker.dim)))
    return {"loaded_mb": base, "peak_mb": rss_mb("VmHWM")}


def memory_backprop(args) -> dict:
    """One gradient-LoRA step as workers/gradient_lora.py trains: its PEFT adapter (same rank,
    q/k, seeded init), its label-word head and loss, AdamW. No EvalWorker is created in this
    process, so the peak is the LoRA step's own."""
    import torch

    from workers import models
    from workers.gradient_lora import LoraRun
    from workers.scorer import load_splits

    cfg = config(args)
    loaded = models.load(cfg.model)
    base = rss_mb("VmRSS")
    reset_peak()
    # the splits are loaded after the reset, as EvalWorker loads them in memory_dfo
    run = LoraRun(cfg, loaded, load_splits(cfg))  # same tokenised examples, label words, head
    params, _ = run.attach()
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    with torch.enable_grad():
        loss = run.loss(list(run.examples["train"]))  # all training examples in one batch
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {"loaded_mb": base, "peak_mb": rss_mb("VmHWM"), "loss": float(loss.detach())}


def in_fresh_process(mode: str, argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--mode", mode, *argv], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--popsize", type=int, default=20)
    parser.add_argument("--layers", default="all", help="'all' or a comma-separated list")
    parser.add_argument("--ref-candidates", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--mode", default="all",
                        choices=["all", "speed", "memory-dfo", "memory-backprop"])
    args = parser.parse_args()
    modes = {"speed": speed, "memory-dfo": memory_dfo, "memory-backprop": memory_backprop}
    if args.mode != "all":
        print(json.dumps(modes[args.mode](args)))
        return
    passthrough = ["--model", args.model, "--popsize", str(args.popsize), "--seed", str(args.seed)]
    dfo = in_fresh_process("memory-dfo", passthrough)
    backprop = in_fresh_process("memory-backprop", passthrough)
    print(f"memory: dfo {dfo}, backprop {backprop}", file=sys.stderr)
    result = speed(args)
    result.update({
        "memory_ratio_vs_backprop": round(
            (dfo["peak_mb"] - dfo["loaded_mb"]) / (backprop["peak_mb"] - backprop["loaded_mb"]), 3),
        "peak_ratio_vs_backprop": round(dfo["peak_mb"] / backprop["peak_mb"], 3),
        "dfo_memory_mb": dfo, "backprop_memory_mb": backprop,
    })
    print(json.dumps(result))


if __name__ == "__main__":
    main()
