"""GPU benchmark of population scoring on random-weight RoBERTa-large and GPT2-large shapes.

    python bench/gpu_eval.py [--models roberta-large,gpt2-large] [--dtype bfloat16] [--out F]
    python bench/gpu_eval.py --tiny          # tiny shapes, fp32, CPU: a few seconds

No weights or tokenizers can be downloaded on the GPU machine (docs/environment.md), so each
model is built from a transformers config with random weights, directly on the device in the
chosen dtype, with a word-level tokenizer made here; texts are random 20-40-word sentences, 16 per
class for training (valid for speed and memory, not for accuracy). Per model it measures:

* candidate evaluations/s of `EvalWorker.evaluate` with stacking (default `eval.max_stack_tokens`)
  and one candidate per pass (`max_stack_tokens=1`), at the first, middle and last layer, and over
  a full round of layers when time allows (the headline figure is the round's when there is one);
* the fraction of plain inference throughput: training examples x candidates / s of the stacked
  evaluation over the examples/s of a plain no-grad forward of the whole model (full logits) on
  the same examples, at the best of three batchings (the worker's batches, all 32 in one batch,
  and the examples tiled popsize times in passes as large as a stacked one);
* peak memory (CUDA `max_memory_allocated`, or peak RSS on CPU) of population scoring as a run
  does it (every layer committed, first and last layer scored) vs one gradient LoRA step (PEFT,
  same rank, q/k, all 32 training examples in one batch, AdamW; eval mode, no dropout, so the
  gradient step is measured at its cheapest). Peaks include the weights; `memory_ratio` is
  dfo / lora, `memory_ratio_over_weights` compares the increases over the loaded weights.

On CUDA each (model, phase) runs in a fresh process under a time guard (`--max-seconds`); a phase
that fails, runs out of memory or overruns leaves its partial figures and an error string, and the
next phase/model still runs. The last stdout line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True)
class Shape:
    family: str  # roberta | gpt2
    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int | None  # None: the tokenizer's size
    positions: int


SHAPES = {
    "roberta-large": Shape("roberta", 24, 1024, 16, 4096, 50265, 514),
    "gpt2-large": Shape("gpt2", 36, 1280, 20, 5120, 50257, 1024),
}
TINY = {
    "roberta-large": Shape("roberta", 2, 32, 2, 64, None, 130),
    "gpt2-large": Shape("gpt2", 2, 32, 2, 64, None, 128),
}
LABEL_WORDS = ["terrible", "great"]
TEMPLATES = {"roberta": "{text} it was {mask} .", "gpt2": "{text} it was"}
SPECIALS = ["[PAD]", "[UNK]", "[MASK]", "[BOS]", "[EOS]"]
K, N_EVAL = 16, 4  # train examples per class; dev and test examples per class


def log(msg: str) -> None:
    print(f"[gpu_eval {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- models, tokenizer, data ----------------------------------------------------------------
def vocabulary(tiny: bool) -> list[str]:
    return [f"w{i}" for i in range(200 if tiny else 3000)] + ["it", "was", "."] + LABEL_WORDS


def tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   mask_token="[MASK]", bos_token="[BOS]", eos_token="[EOS]")


def splits(words: list[str], seed: int, tiny: bool = False):
    """Random 20-40-word sentences (Rotten Tomatoes-like lengths; tiny: 5-10), two classes."""
    from common.data import Example, Splits

    rng = np.random.default_rng(seed)
    text_words = [w for w in words if w.startswith("w")]
    lengths = (5, 11) if tiny else (20, 41)

    def draw(n: int) -> list:
        return [Example((" ".join(rng.choice(text_words, rng.integers(*lengths))),), label)
                for label in (0, 1) for _ in range(n)]

    return Splits(draw(K), draw(N_EVAL), draw(N_EVAL))


def build_model(shape: Shape, tok, device, dtype):
    """Random weights, created on `device` in `dtype` (no fp32 CPU copy of a 774M model)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, GPT2Config, RobertaConfig

    from workers.models import LoadedModel, prepare

    torch.manual_seed(0)
    common = dict(vocab_size=shape.vocab or len(tok), pad_token_id=0, bos_token_id=3,
                  eos_token_id=4)
    if shape.family == "roberta":
        cfg = RobertaConfig(hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                            num_attention_heads=shape.heads, intermediate_size=shape.ffn,
                            max_position_embeddings=shape.positions, **common)
        auto, kind = AutoModelForMaskedLM, "masked"
    else:
        cfg = GPT2Config(n_embd=shape.hidden, n_layer=shape.layers, n_head=shape.heads,
                         n_inner=shape.ffn, n_positions=shape.positions, **common)
        auto, kind = AutoModelForCausalLM, "causal"
    major = int(transformers.__version__.split(".")[0])
    dtype_kw = {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}
    with torch.device(device):
        net = auto.from_config(cfg, **dtype_kw)
    net = net.to(device=device, dtype=dtype)  # a no-op unless the context was not honoured
    return LoadedModel(prepare(net, device), tok, kind, device)


def run_config(args, shape: Shape, max_stack: int | None = None):
    from common.config import RunConfig

    data = {"task": {"template": TEMPLATES[shape.family], "label_words": LABEL_WORDS, "k": K,
                     "max_test": 2 * N_EVAL},
            "adapter": {"rank": args.rank, "dim": args.dim},
            "optimizer": {"popsize": args.popsize},
            "model": {"device": args.device, "dtype": args.dtype}, "seed": args.seed}
    if max_stack is not None:
        data["eval"] = {"max_stack_tokens": max_stack}
    return RunConfig.from_dict(data)


# -- measuring ----------------------------------------------------------------------------
class Memory:
    """Peak memory: CUDA allocator statistics, or the process's peak RSS on CPU."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS

    def current_mb(self) -> float:
        if self.cuda:
            return self.torch.cuda.memory_allocated() / 2**20
        return _status_mb("VmRSS")

    def peak_mb(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated() / 2**20
        return _status_mb("VmHWM")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def timed(fn, device, min_s: float, max_reps: int) -> float:
    """Mean seconds of fn() over at least one call, until min_s has passed or max_reps calls."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    reps, total = 0, 0.0
    while reps < max_reps and (reps == 0 or total < min_s):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        total += time.perf_counter() - start
        reps += 1
    return total / reps


class Step:
    """Runs one named measurement; an exception (CUDA OOM included) becomes an error string."""

    def __init__(self, out: dict, emit):
        self.out, self.emit = out, emit

    def __call__(self, name: str, fn) -> None:
        import torch

        log(f"  {name} ...")
        try:
            self.out.update(fn())
        except Exception as err:  # noqa: BLE001 -- one try on the GPU: record it and go on
            oom = isinstance(err, torch.OutOfMemoryError)
            self.out.setdefault("errors", {})[name] = f"{'OOM: ' if oom else ''}{err!r}"[:500]
            log(f"  {name} failed: {err!r}"[:300])
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self.emit(self.out)


# -- phase 1: DFO memory, then speed --------------------------------------------------------
def phase_dfo(args, name: str, soft_deadline: float, emit) -> dict:
    import torch

    from workers.worker import EvalWorker

    device, dtype, shape = _device(args), getattr(torch, args.dtype), _shape(args, name)
    tok, out = tokenizer(vocabulary(args.tiny)), {}
    step = Step(out, emit)
    memory = Memory(device)
    data = splits(vocabulary(args.tiny), args.seed, args.tiny)
    loaded = build_model(shape, tok, device, dtype)
    memory.reset()
    out["weights_mb"] = round(memory.current_mb(), 1)
    holder: dict = {}

    def dfo_memory() -> dict:
        holder["w"] = worker = EvalWorker(run_config(args, shape), loaded=loaded, splits=data)
        rng = np.random.default_rng(args.seed)
        for layer in range(worker.n_layers):  # every layer committed and merged, as in a run
            worker.commit(layer, rng.standard_normal(worker.dim) * 0.1)
        for layer in (0, worker.n_layers - 1):  # the longest and the shortest suffix
            worker.evaluate(layer, rng.standard_normal((args.popsize, worker.dim)))
        return {"peak_mb_dfo": round(memory.peak_mb(), 1),
                "stack_size": worker._stack_size(worker.states[-1]),
                "train_examples": len(worker.examples["train"]), "n_layers": worker.n_layers}

    step("dfo_memory", dfo_memory)
    if "w" not in holder:
        return out
    worker = holder["w"]
    single = EvalWorker(run_config(args, shape, max_stack=1), stats=worker.calibration_stats(),
                        loaded=loaded, splits=data)
    speed = Speed(args, worker, single, device)
    step("sampled_layers", speed.sampled)
    step("inference", lambda: inference(args, worker, loaded, device))
    step("round_stacked", lambda: speed.round(worker, "stacked", soft_deadline))
    step("round_single", lambda: speed.round(single, "single", soft_deadline))
    return out


class Speed:
    def __init__(self, args, worker, single, device):
        self.args, self.worker, self.single, self.device = args, worker, single, device
        rng = np.random.default_rng(args.seed + 1)
        self.pops = [rng.standard_normal((args.popsize, worker.dim)) for _ in range(
            worker.n_layers)]
        self.per_layer: dict[str, dict[int, float]] = {"stacked": {}, "single": {}}
        self.reps = (2, 0.0) if args.tiny else (5, 0.5)

    def sampled(self) -> dict:
        w, last = self.worker, self.worker.n_layers - 1
        w.evaluate(last, self.pops[last])  # warm-up; brings the cached prefix up to date
        w.evaluate(0, self.pops[0])
        self.single.evaluate(last, self.pops[last][:2])
        layers = sorted({0, w.n_layers // 2, last})
        diff = 0.0
        for layer in layers:
            losses = [self._time(mode, layer) for mode in ("stacked", "single")]
            diff = max(diff, float(np.max(np.abs(losses[0] - losses[1]))))
        out = {f"per_layer_evals_per_s_{m}": {str(k): round(self.args.popsize / v, 3)
                                              for k, v in d.items()}
               for m, d in self.per_layer.items()}
        for mode, d in self.per_layer.items():  # the sampled layers' figure, until a round's
            out[f"evals_per_s_{mode}"] = round(len(d) * self.args.popsize / sum(d.values()), 3)
            out[f"evals_per_s_{mode}_source"] = f"layers {layers}"
        out["stacked_vs_single_max_abs_loss_diff"] = diff
        return out

    def _time(self, mode: str, layer: int) -> np.ndarray:
        """Seconds per `evaluate` of the layer's population, into per_layer; returns the losses."""
        worker, (reps, min_s) = (self.worker, self.reps) if mode == "stacked" else (
            self.single, (1, 0.0))
        losses = []

        def call():
            losses.append(worker.evaluate(layer, self.pops[layer]).losses)

        seconds = timed(call, self.device, min_s, reps)
        self.per_layer[mode][layer] = seconds
        log(f"    layer {layer}: {mode} {self.args.popsize / seconds:.1f} evals/s")
        return losses[-1]

    def round(self, worker, mode: str, soft_deadline: float) -> dict:
        sampled = self.per_layer[mode]
        estimate = 1.3 * worker.n_layers * sum(sampled.values()) / max(1, len(sampled))
        if time.time() + estimate > soft_deadline:
            return {f"round_{mode}_skipped": f"estimated {estimate:.0f} s exceeds the time guard"}
        start = time.time()
        seconds = sum(timed(lambda layer=layer: worker.evaluate(layer, self.pops[layer]),
                            self.device, 0.0, 1) for layer in range(worker.n_layers))
        log(f"    round {mode}: {time.time() - start:.1f} s")
        rate = round(worker.n_layers * self.args.popsize / seconds, 3)
        return {f"evals_per_s_{mode}": rate, f"evals_per_s_{mode}_source": "full round",
                f"round_{mode}_s": round(seconds, 2)}


def inference(args, worker, loaded, device) -> dict:
    """Examples/s of a plain no-grad full forward (all logits) at three batchings."""
    import torch

    from workers.fastpath import model_inputs

    train, prompter = worker.examples["train"], worker.prompter
    rows = args.popsize * worker.cfg.eval.train_batch_size
    sets = {f"bs{worker.cfg.eval.train_batch_size}": worker.batches["train"],
            f"bs{len(train)}": prompter.batches(train, len(train)),
            f"bs{rows}_tiled": prompter.batches(train * args.popsize, rows)}
    rates = {}
    for name, batches in sets.items():
        batches = [b.to(device) for b in batches]
        n = sum(b.input_ids.shape[0] for b in batches)

        def forward(batches=batches):
            with torch.inference_mode():
                for b in batches:
                    loaded.model(**model_inputs(b, loaded.kind))

        forward()  # warm-up
        seconds = timed(forward, device, 0.0 if args.tiny else 0.5, 2 if args.tiny else 5)
        rates[name] = round(n / seconds, 2)
        log(f"    inference {name}: {rates[name]:.1f} examples/s")
    best = max(rates, key=rates.get)
    return {"inference_examples_per_s": rates[best], "inference_best_batching": best,
            "inference_examples_per_s_by_batching": rates}


# -- phase 2: one gradient LoRA step --------------------------------------------------------
def phase_lora(args, name: str, emit) -> dict:
    import torch

    from common.tasks import resolve_template, task_spec
    from workers.batches import Prompter
    from workers.scorer import model_max_length

    device, dtype, shape = _device(args), getattr(torch, args.dtype), _shape(args, name)
    out: dict = {}
    cfg = run_config(args, shape)
    loaded = build_model(shape, tokenizer(vocabulary(args.tiny)), device, dtype)
    spec = task_spec(cfg.task)
    template = resolve_template(spec, loaded.kind, cfg.task.template, cfg.task.label_words)
    prompter = Prompter(loaded.tokenizer, loaded.kind, spec, template, cfg.task,
                        model_max_length(loaded.model, cfg.model.max_length))
    train = splits(vocabulary(args.tiny), args.seed, args.tiny).train
    (batch,) = [b.to(device) for b in prompter.batches(train, len(train))]
    memory = Memory(device)
    memory.reset()
    out["weights_mb"] = round(memory.current_mb(), 1)

    def lora_step() -> dict:
        model, impl = add_lora(loaded.model, shape.family, args.rank)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        label_ids = torch.tensor(prompter.label_ids, device=device)

        def one_step():
            with torch.enable_grad():
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               **({"use_cache": False} if loaded.kind == "causal" else {})).logits
                rows = torch.arange(len(batch.labels), device=device)
                scored = logits[rows, batch.positions][:, label_ids].float()
                loss = torch.nn.functional.cross_entropy(scored, batch.labels)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return loss

        loss = one_step()
        peak = memory.peak_mb()
        seconds = timed(one_step, device, 0.0, 1 if args.tiny else 3)
        return {"peak_mb_lora_step": round(peak, 1), "lora_impl": impl,
                "lora_trainable_params": sum(p.numel() for p in params),
                "lora_step_examples_per_s": round(len(batch.labels) / seconds, 2),
                "lora_loss": float(loss.detach())}

    Step(out, emit)("lora_step", lora_step)
    return out


def add_lora(model, family: str, rank: int):
    """PEFT LoRA on q/k (GPT-2: the fused c_attn); a hand-made equivalent if PEFT is missing."""
    targets = ["query", "key"] if family == "roberta" else ["c_attn"]
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return _manual_lora(model, targets, rank), "manual (peft not installed)"
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0)
    return get_peft_model(model, cfg), "peft"


def _manual_lora(model, targets: list[str], rank: int):
    import torch
    from torch import nn

    class Lora(nn.Module):
        def __init__(self, base, n_in: int, n_out: int):
            super().__init__()
            w = base.weight
            self.base = base
            self.a = nn.Parameter(torch.randn(n_in, rank, device=w.device) / rank)
            self.b = nn.Parameter(torch.zeros(rank, n_out, device=w.device))

        def forward(self, x):
            return self.base(x) + ((x.float() @ self.a) @ self.b).to(x.dtype)

    for name, module in list(model.named_modules()):
        if name.split(".")[-1] in targets:
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            w = module.weight  # Linear: (out, in); GPT-2 Conv1D: (in, out)
            n_in, n_out = (w.shape[1], w.shape[0]) if isinstance(module, nn.Linear) else w.shape
            setattr(parent, name.split(".")[-1], Lora(module, n_in, n_out))
    return model


# -- orchestration ----------------------------------------------------------------------------
def _device(args):
    from workers.models import resolve_device

    return resolve_device(args.device)


def _shape(args, name: str) -> Shape:
    return (TINY if args.tiny else SHAPES)[name]


def run_phase(args, phase: str, name: str, soft_deadline: float, hard_s: float) -> dict:
    """The phase in a fresh process (its partial figures survive a crash or the time guard)."""
    if not args.isolate:
        fn = {"dfo": lambda: phase_dfo(args, name, soft_deadline, lambda _o: None),
              "lora": lambda: phase_lora(args, name, lambda _o: None)}[phase]
        return fn()
    with tempfile.TemporaryDirectory() as tmp:
        partial = Path(tmp) / "partial.json"
        cmd = [sys.executable, __file__, "--phase", phase, "--models", name, "--partial",
               str(partial), "--soft-deadline", str(soft_deadline), *args.passthrough]
        try:
            rc = subprocess.run(cmd, stdout=sys.stderr, timeout=max(1.0, hard_s)).returncode
            problem = f"process exited with status {rc}" if rc else None
        except subprocess.TimeoutExpired:
            problem = f"killed by the time guard after {hard_s:.0f} s"
        out = json.loads(partial.read_text()) if partial.exists() else {}
    if problem:
        out.setdefault("errors", {})[f"{phase}_process"] = problem
    return out


def measure_model(args, name: str, model_deadline: float) -> dict:
    result: dict = {}
    for phase in ("lora", "dfo"):  # LoRA first: it is short; DFO's optional work fits the rest
        left = model_deadline - time.time()
        if left < 10:
            result.setdefault("errors", {})[phase] = "skipped: time budget spent"
            continue
        log(f"{name}: phase {phase} ({left:.0f} s left for this model)")
        hard = min(left, 120.0) if phase == "lora" else left
        try:
            out = run_phase(args, phase, name, model_deadline - 15, hard)
        except Exception as err:  # noqa: BLE001 -- record and go on to the next phase/model
            out = {"errors": {phase: repr(err)[:500]}}
        errors = out.pop("errors", {})
        result.setdefault("errors", {}).update({f"{phase}.{k}": v for k, v in errors.items()})
        weights = out.pop("weights_mb", None)
        result.update(out)
        result[f"weights_mb_{phase}"] = weights
    return derive(result)


def derive(r: dict) -> dict:
    def ratio(a, b):
        return round(a / b, 4) if a is not None and b else None

    stacked, single = r.get("evals_per_s_stacked"), r.get("evals_per_s_single")
    n = r.get("train_examples")
    dfo_ex = stacked * n if stacked is not None and n else None

    def extra(key: str, phase: str):  # a peak's increase over the memory in use after loading
        peak, base = r.get(key), r.get(f"weights_mb_{phase}")
        return None if peak is None or base is None else peak - base
    r.update({
        "evals_per_s_stacked": stacked, "evals_per_s_single": single,
        "stacking_speedup": ratio(stacked, single),
        "dfo_examples_per_s": round(dfo_ex, 2) if dfo_ex else None,
        "inference_examples_per_s": r.get("inference_examples_per_s"),
        "fraction_of_inference": ratio(dfo_ex, r.get("inference_examples_per_s")),
        "peak_mb_dfo": r.get("peak_mb_dfo"), "peak_mb_lora_step": r.get("peak_mb_lora_step"),
        "memory_ratio": ratio(r.get("peak_mb_dfo"), r.get("peak_mb_lora_step")),
        "memory_ratio_over_weights": ratio(extra("peak_mb_dfo", "dfo"),
                                           extra("peak_mb_lora_step", "lora")),
    })
    if not r.get("errors"):
        r.pop("errors", None)
    return r


TABLE = [("evals_per_s_stacked", "evals/s stacked"), ("evals_per_s_single", "evals/s single"),
         ("stacking_speedup", "stacking speed-up"), ("dfo_examples_per_s", "DFO examples/s"),
         ("inference_examples_per_s", "inference examples/s"),
         ("fraction_of_inference", "fraction of inference"), ("weights_mb_dfo", "weights MB"),
         ("peak_mb_dfo", "peak MB DFO"), ("peak_mb_lora_step", "peak MB LoRA step"),
         ("memory_ratio", "memory ratio"), ("memory_ratio_over_weights", "ratio over weights")]


def table(models: dict) -> str:
    names = list(models)
    lines = [f"{'':24s}" + "".join(f"{n:>18s}" for n in names)]
    for key, label in TABLE:
        cells = [models[n].get(key) for n in names]
        lines.append(f"{label:24s}" + "".join(
            f"{'-' if c is None else (f'{c:.4g}' if isinstance(c, float) else c):>18}"
            for c in cells))
    for n in names:
        for where, err in models[n].get("errors", {}).items():
            lines.append(f"! {n} {where}: {err}"[:200])
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes (fp32 unless --dtype)")
    p.add_argument("--models", default="roberta-large,gpt2-large")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, else float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--popsize", type=int, default=20)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--dim", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (0: its default); default 1 with --tiny, else 0")
    p.add_argument("--max-seconds", type=float, default=270.0, help="guard on the whole run")
    p.add_argument("--isolate", choices=["auto", "yes", "no"], default="auto",
                   help="one process per (model, phase); auto: on CUDA only")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--phase", choices=["dfo", "lora"], help=argparse.SUPPRESS)
    p.add_argument("--partial", help=argparse.SUPPRESS)
    p.add_argument("--soft-deadline", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.models.split(",")) - set(SHAPES)
    if unknown:
        p.error(f"--models: unknown {sorted(unknown)}; known: {', '.join(SHAPES)}")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    import torch

    threads = args.threads if args.threads is not None else (1 if args.tiny else 0)
    if threads:  # tiny ops on a shared 2-core machine: two OpenMP threads can be ~50x slower
        torch.set_num_threads(threads)
    device = _device(args)
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" and not args.tiny
                                else "float32")
    args.passthrough = ["--device", args.device, "--dtype", args.dtype, "--popsize",
                        str(args.popsize), "--rank", str(args.rank), "--dim", str(args.dim),
                        "--seed", str(args.seed), "--threads", str(threads)] + (
                            ["--tiny"] if args.tiny else [])
    if args.phase:  # a child process: one phase of one model, figures to --partial
        def emit(out):
            Path(args.partial).write_text(json.dumps(out))

        if args.phase == "dfo":
            emit(phase_dfo(args, args.models, args.soft_deadline, emit))
        else:
            emit(phase_lora(args, args.models, emit))
        return {}
    args.isolate = args.isolate == "yes" or (args.isolate == "auto" and device.type == "cuda")
    start = time.time()
    deadline = start + args.max_seconds
    names = args.models.split(",")
    models = {}
    for i, name in enumerate(names):
        share = (deadline - time.time()) / (len(names) - i)
        models[name] = measure_model(args, name, time.time() + share)
    result = {"device": str(device), "dtype": args.dtype, "tiny": args.tiny,
              "popsize": args.popsize, "rank": args.rank, "dim": args.dim,
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "torch": torch.__version__, "transformers": _version("transformers"),
              "memory_source": "cuda max_memory_allocated" if device.type == "cuda"
              else "process peak RSS (VmHWM)",
              "total_s": round(time.time() - start, 1), "models": models}
    print(table(models))
    line = json.dumps(result)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)
    return result


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
