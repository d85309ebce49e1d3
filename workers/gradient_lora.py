"""The gradient LoRA baseline, in the same harness as the derivative-free run (honest comparison).

Same frozen model, same few-shot splits (same seed, same examples), same prompts, label words and
scored position, same loss on the same label-word logits, same dev-selection rule; the only
difference is how the low-rank q/k deltas are found: backpropagation and AdamW on PEFT LoRA
factors (Hu et al. 2021, "LoRA", arXiv 2106.09685; Hugging Face PEFT) instead of a gradient-free
search in a random subspace.

* Adapter: rank `adapter.rank` on the query and key projections of every layer (or of
  `schedule.layers`), `lora_alpha = rank` so the scaling alpha/r is 1 (docs/design.md §1 uses none),
  no dropout. PEFT starts B at zero, so training starts at the unmodified model, as the DFO search
  does. GPT-2's fused `c_attn` is the only module PEFT can target there, so its LoRA would also
  adapt the value block; we zero the gradient of B's value rows, which then stay exactly zero (B
  starts at zero; Adam's update for a zero gradient is zero; decoupled weight decay keeps zero at
  zero), so the delta is q/k only and the exported adapter is a standard one with zero v rows.
* The model stays in eval mode while training (no dropout): the function trained is the function
  scored, as for the DFO fitness.
* Learning rate and epoch are chosen on dev: `lr` is one value or a grid. Every lr trains from
  the same initial adapter (same seeded A, B = 0) with a fresh AdamW and the same minibatch order,
  for up to `epochs` epochs. The zero adapter is every lr's epoch 0; after every `eval_every`
  epochs (and after the last) dev is scored. Of all scored (lr, epoch) pairs the one with the best
  dev score on the task's selection metric (orchestrator/schedule.py's) is kept; ties go to the
  lower dev loss, then the smaller lr, then the earlier epoch. Only that snapshot is restored,
  exported and scored on test (the zero-shot test score, of the zero adapter, is reported too).
  With one lr this is the best epoch by dev, as before, except that a tie on the metric now goes
  to the lower dev loss rather than always to the earlier epoch.
* History: the chosen lr's epochs. Epoch 0 is the zero adapter (its scored train loss and dev
  score); for later epochs `train_loss` is the mean loss of the epoch's minibatches as they were
  trained on. `settings.per_lr` summarises every lr's dev scores per epoch.
* Counting, over the whole grid: `evaluations` counts example forward passes in training
  (examples x epochs x lrs), each followed by a backward pass; a DFO "evaluation" is one forward
  pass over the whole training set, so `train_set_passes` (= epochs x lrs) is the figure
  comparable with the DFO budget. Scoring passes (zero-shot, dev, final) are counted by neither
  method. `wall_seconds` and `peak_memory_mb` also cover the whole grid.

The caller's model is modified only while the function runs: PEFT injects its layers in place and
`unload()` takes them out again at the end (no merge), so `loaded` can be reused.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from common.config import RunConfig
from common.data import Example, Splits
from common.errors import ConfigError, DfoloraError
from common.messages import LABEL_OFFSETS, label_offsets_document
from common.seeding import derive_seed
from workers import models
from workers.adapters import Architecture, architecture
from workers.memory import peak_memory_mb
from workers.scorer import Scorer, load_splits
from workers.scoring import example_losses

METHOD = "gradient-lora"
ADAPTER = "default"  # PEFT's adapter name
DEFAULT_LRS = (5e-4, 1e-3, 2e-3, 5e-3)  # `dfolora lora`'s default grid
SELECTION = ("best dev metric over every (lr, epoch); ties: lower dev loss, then smaller lr, "
             "then earlier epoch; epoch 0 is the zero adapter (no training)")


def export_peft(model: PeftModel, out_dir: str | Path, base_name: str | None = None) -> Path:
    """Save the adapter in the PEFT format: adapter_config.json + adapter_model.safetensors.

    `base_name`: the model as the user named it (`model.name`), recorded instead of the folder it
    was loaded from, so no local path of this machine is written into a shareable file."""
    if not isinstance(model, PeftModel):
        raise DfoloraError(f"export_peft needs a peft.PeftModel, got {type(model).__name__}")
    if base_name is not None:
        for config in model.peft_config.values():
            config.base_model_name_or_path = base_name
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    return out


def train_lora(cfg: RunConfig, *, lr: float | Sequence[float] = 1e-3, epochs: int = 20,
               batch_size: int | None = None, weight_decay: float = 0.0, eval_every: int = 1,
               loaded: models.LoadedModel | None = None, splits: Splits | None = None,
               progress: Callable[[dict], None] | None = None,
               out_dir: str | None = None) -> dict:
    """Train LoRA on q/k with AdamW on the few-shot train split, for one lr or each lr of a grid,
    and keep the (lr, epoch) that is best on dev; see the module docstring.

    Returns a JSON-safe dict with the DFO run's result fields (zero_shot, final, evaluations)
    plus best_epoch, steps, wall_seconds, peak_memory_mb, the chosen lr's per-epoch history and
    `settings` (the grid, the chosen lr and epoch, per-lr dev scores).
    """
    batch_size = cfg.eval.train_batch_size if batch_size is None else batch_size
    lrs = _check_args(lr, epochs, batch_size, weight_decay, eval_every, progress)
    device = loaded.device if loaded is not None else models.resolve_device(cfg.model.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loaded = loaded or models.load(cfg.model)
    splits = splits or load_splits(cfg)
    run = LoraRun(cfg, loaded, splits)
    try:
        return run.train(lrs, epochs, batch_size, weight_decay, eval_every, progress, out_dir)
    finally:
        run.close()


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_args(lr, epochs, batch_size, weight_decay, eval_every, progress) -> list[float]:
    """Refuse bad arguments with one ConfigError; returns the lr grid, ascending."""
    def is_int(value) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    grid = list(lr) if isinstance(lr, (list, tuple)) else [lr]
    if not grid:
        raise ConfigError(f"gradient LoRA: lr needs at least one value, got {lr!r}")
    for value in grid:
        if not _is_number(value) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"gradient LoRA: lr must be a finite number > 0, got {value!r}")
    grid = sorted(float(value) for value in grid)
    if len(set(grid)) < len(grid):
        raise ConfigError(f"gradient LoRA: lr values must be distinct, got {lr!r}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size),
                        ("eval_every", eval_every)):
        if not is_int(value) or value < 1:
            raise ConfigError(f"gradient LoRA: {name} must be an integer >= 1, got {value!r}")
    if (not _is_number(weight_decay) or not math.isfinite(weight_decay)
            or weight_decay < 0):
        raise ConfigError(f"gradient LoRA: weight_decay must be a finite number >= 0, "
                          f"got {weight_decay!r}")
    if progress is not None and not callable(progress):
        raise ConfigError(f"gradient LoRA: progress must be callable, got {progress!r}")
    return grid


def selection_key(dev: dict, metric: str, lr: float, epoch: int) -> tuple:
    """Smaller is better: the dev metric (higher), then dev loss (lower), then the smaller lr,
    then the earlier epoch. A NaN metric or loss (a diverged run) ranks last."""
    score, loss = float(dev[metric]), float(dev["loss"])
    return (-score if math.isfinite(score) else math.inf,
            loss if math.isfinite(loss) else math.inf, lr, epoch)


class LoraRun(Scorer):
    """One training run, scored through workers/scorer.py as `EvalWorker` scores (same prompts,
    batches and label head), on the caller's model with whatever PEFT adapter it carries.

    `score(split)` also scores a model that already carries a PEFT adapter (tests use it on an
    exported adapter loaded with `PeftModel.from_pretrained`).
    """

    def __init__(self, cfg: RunConfig, loaded: models.LoadedModel, splits: Splits):
        super().__init__(cfg, loaded, splits)  # self.model: PEFT injects into its modules
        self.peft: PeftModel | None = None

    # -- training ------------------------------------------------------------------------------
    def attach(self) -> tuple[list[torch.nn.Parameter], int]:
        """Inject PEFT LoRA into the model (A seeded from the run's seed, B = 0) and return its
        trainable parameters and how many of their entries stay frozen at zero (fused v rows)."""
        torch.manual_seed(derive_seed(self.cfg.seed, "lora"))  # PEFT's kaiming init of A
        arch = architecture(self.model)
        fused = _fused_rows(arch)  # before PEFT replaces the modules
        self.peft = get_peft_model(self.model, lora_config(self.cfg, arch, self.model))
        frozen = _restrict_fused(self.peft, fused)
        return [p for p in self.peft.parameters() if p.requires_grad], frozen

    def train(self, lrs, epochs, batch_size, weight_decay, eval_every, progress, out_dir) -> dict:
        start = time.perf_counter()
        metric = self.metric
        self.choose_calibration()  # eval.calibrate=auto, on the unadapted model
        zero_train = self.score("train")
        zero = {"train_loss": zero_train["loss"], "dev": self.score("dev"),
                "test": self.score("test")}
        params, frozen = self.attach()
        initial = [p.detach().clone() for p in params]
        best: dict | None = None  # over the whole grid: key, lr, epoch, state
        histories, per_lr, steps = {}, [], 0
        for lr in lrs:
            with torch.no_grad():  # every lr starts from the same adapter
                for p, saved in zip(params, initial, strict=True):
                    p.copy_(saved)
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
            order = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "lora", "order"))
            history = [{"epoch": 0, "train_loss": zero_train["loss"], "dev": zero["dev"]}]
            lr_best = (selection_key(zero["dev"], metric, lr, 0), 0)
            if best is None or lr_best[0] < best["key"]:
                best = {"key": lr_best[0], "lr": lr, "epoch": 0,
                        "state": [p.clone() for p in initial]}
            for epoch in range(1, epochs + 1):
                train_loss, n_steps = self._epoch(opt, batch_size, order)
                steps += n_steps
                record = {"epoch": epoch, "train_loss": train_loss, "dev": None}
                if epoch % eval_every == 0 or epoch == epochs:
                    record["dev"] = self.score("dev")
                    key = selection_key(record["dev"], metric, lr, epoch)
                    if key < lr_best[0]:
                        lr_best = (key, epoch)
                    if key < best["key"]:
                        best = {"key": key, "lr": lr, "epoch": epoch,
                                "state": [p.detach().clone() for p in params]}
                history.append(record)
                if progress is not None:
                    progress({"lr": lr, **record, "best_epoch": lr_best[1]})
            histories[lr] = history
            per_lr.append(_lr_summary(lr, lr_best[1], history, metric))
        with torch.no_grad():
            for p, saved in zip(params, best["state"], strict=True):
                p.copy_(saved)
        final = {split: self.score(split) for split in ("train", "dev", "test")}
        if out_dir is not None:
            export_peft(self.peft, out_dir, self.cfg.model.name)
            if "label_offsets" in final["train"]:  # eval.calibrate: the rule its scores used
                (Path(out_dir) / LABEL_OFFSETS).write_text(
                    label_offsets_document(final["train"]["label_offsets"]))
        n, passes = len(self.examples["train"]), epochs * len(lrs)
        return {"method": METHOD, "zero_shot": zero, "final": final, "best_epoch": best["epoch"],
                "evaluations": n * passes, "evaluations_unit": "training example forward passes "
                "(each with a backward pass), over every lr of the grid; a DFO evaluation is one "
                "pass over all of them",
                "train_set_passes": passes, "train_examples": n, "steps": steps,
                "trainable_parameters": int(sum(p.numel() for p in params)) - frozen,
                "wall_seconds": time.perf_counter() - start,
                "peak_memory_mb": peak_memory_mb(self.device), "history": histories[best["lr"]],
                "settings": {"lr": best["lr"], "epochs": epochs, "lr_grid": list(lrs),
                             "chosen_lr": best["lr"], "chosen_epoch": best["epoch"],
                             "selection": SELECTION, "metric": metric, "per_lr": per_lr,
                             "batch_size": batch_size, "weight_decay": weight_decay,
                             "eval_every": eval_every, "seed": self.cfg.seed,
                             "rank": self.cfg.adapter.rank,
                             "measured_over": "wall_seconds, peak_memory_mb, evaluations and "
                                              "steps cover the whole lr grid"}}

    def _epoch(self, opt: torch.optim.Optimizer, batch_size: int,
               order: torch.Generator) -> tuple[float, int]:
        """One shuffled pass; returns the mean training loss over its examples and the steps."""
        perm = torch.randperm(len(self.examples["train"]), generator=order).tolist()
        total, steps = 0.0, 0
        for lo in range(0, len(perm), batch_size):
            chunk = [self.examples["train"][i] for i in perm[lo : lo + batch_size]]
            loss = self.loss(chunk)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(chunk)
            steps += 1
        return total / len(perm), steps

    def loss(self, chunk: list[Example]) -> torch.Tensor:
        """The mean training loss of `chunk` as one padded batch (with autograd)."""
        (batch,) = self.prompter.batches(chunk, len(chunk))  # one padded batch
        batch = batch.to(self.device)
        losses = example_losses(self.logits(batch), batch.labels, self.cfg.eval.loss,
                                self.cfg.eval.hinge_margin)
        return losses.mean()

    def close(self) -> None:
        """Take PEFT's layers out again (no merge): the caller's model is as it was."""
        if self.peft is not None:
            self.peft.unload()
            self.peft = None


def _lr_summary(lr: float, best_epoch: int, history: list[dict], metric: str) -> dict:
    """One lr's dev scores per epoch (None where dev was not scored) and its best epoch."""
    def dev(record: dict, key: str) -> float | None:
        return None if record["dev"] is None else record["dev"][key]

    return {"lr": lr, "best_epoch": best_epoch,
            "best_dev_metric": history[best_epoch]["dev"][metric],
            "best_dev_loss": history[best_epoch]["dev"]["loss"],
            "dev_metric": [dev(h, metric) for h in history],
            "dev_loss": [dev(h, "loss") for h in history],
            "train_loss": [h["train_loss"] for h in history]}


def lora_config(cfg: RunConfig, arch: Architecture, model: torch.nn.Module) -> LoraConfig:
    """PEFT LoRA on the q and k projections adapters.py finds (separate, or a fused q/k/v module
    whose v rows `_restrict_fused` keeps at zero), rank r, alpha = r (scaling 1), no dropout."""
    names = sorted({proj.attr for pair in arch.sites for proj in pair})
    layers = None
    if cfg.schedule.layers is not None:
        bad = [layer for layer in cfg.schedule.layers if layer >= arch.n_layers]
        if bad:
            raise ConfigError(f"schedule.layers: {bad} out of range; the model has "
                              f"{arch.n_layers} layers (0..{arch.n_layers - 1})")
        layers = sorted(cfg.schedule.layers)
    pattern = next(name for name, mod in model.named_modules() if mod is arch.layers)
    return LoraConfig(r=cfg.adapter.rank, lora_alpha=cfg.adapter.rank, lora_dropout=0.0,
                      target_modules=names, layers_to_transform=layers,
                      layers_pattern=pattern.split(".")[-1] if layers else None,
                      fan_in_fan_out=any(p.transposed for pair in arch.sites for p in pair),
                      bias="none")


def _fused_rows(arch: Architecture) -> dict[int, torch.Tensor]:
    """For each fused q/k/v module, by id: which output features are q or k."""
    keep: dict[int, torch.Tensor] = {}
    for q, k in arch.sites:
        if q.module is k.module:
            weight = q.module.weight
            rows = torch.zeros(weight.shape[1 if q.transposed else 0], dtype=torch.bool,
                               device=weight.device)
            rows[q.cols] = True
            rows[k.cols] = True
            keep[id(q.module)] = rows
    return keep


def _restrict_fused(peft: PeftModel, keep: dict[int, torch.Tensor]) -> int:
    """Zero the gradient of B's rows outside q and k in fused modules (v's features);
    returns how many LoRA entries that freezes (at zero)."""
    frozen = 0
    for module in peft.modules():
        if isinstance(module, LoraLayer) and id(module.get_base_layer()) in keep:
            weight = module.lora_B[ADAPTER].weight  # (out, r)
            mask = keep[id(module.get_base_layer())].to(weight.device, weight.dtype)[:, None]
            weight.register_hook(lambda grad, mask=mask: grad * mask)
            frozen += int((mask == 0).sum()) * weight.shape[1]
    return frozen
