"""The evaluation worker: a plain class (no Ray) that scores candidate populations for one layer.

It loads the frozen model and the tokenised few-shot batches once, calibrates (or takes the
statistics another worker measured), and keeps the committed best vector of every layer merged
into the weights. `evaluate(layer, Z)` returns one training loss per candidate, using prefix
reuse, candidate stacking and label-only logits (docs/design.md §7; see workers/fastpath.py).

Only the searched layers (`schedule.layers`; null: all) keep pristine weight copies and
calibration statistics, and training hidden states are cached from the lowest searched layer up.
A worker that loads its own model (no `loaded=`) and searches no layer below some layer F also
never holds layers 0..F-1 resident: their output is computed one layer at a time from the
safetensors files, once for the train and dev examples (kept), and for the test examples each time
test is scored, a group of batches at a time (not kept: the test split is large and scored twice);
everything after starts at layer F ("frozen prefix", docs/design.md §7).
"""

from __future__ import annotations

import numpy as np
import torch

from common.config import RunConfig
from common.data import Splits
from common.errors import DfoloraError
from common.memory import peak_memory_mb
from common.messages import EvalResult
from common.shards import BatchTerms, combine_batches, shard_range
from common.tasks import task_spec
from workers import fastpath, models
from workers.adapters import architecture, installed, merge_delta
from workers.batches import Batch
from workers.calibration import calibrate
from workers.memory import lean_heap, release_free_memory
from workers.projection import CalibrationStats, LayerShape, Projector
from workers.scorer import Scorer, load_splits
from workers.scoring import example_losses, label_offsets
from workers.selfcheck import self_check

TEST_GROUP = 16  # test batches whose frozen prefix is computed together (~15 MB on SmolLM2)


class EvalWorker(Scorer):
    def __init__(self, cfg: RunConfig, stats: dict | None = None,
                 loaded: models.LoadedModel | None = None, splits: Splits | None = None):
        if cfg.eval.lean_heap and models.resolve_device(cfg.model.device).type == "cpu":
            lean_heap()  # before the model is loaded: its buffers follow the same rule
        task_spec(cfg.task)  # an unknown task is refused before data or model load
        splits = splits or load_splits(cfg)
        own = loaded is None  # a preloaded model (tests, benchmarks) keeps the full-forward path
        loaded = loaded or models.load(cfg.model)
        super().__init__(cfg, loaded, splits)  # prompts, batches, label head (workers/scorer.py)
        self.arch = architecture(self.model)
        order = [i for i in cfg.schedule.layers or () if 0 <= i < self.n_layers]
        self.searched = frozenset(order or range(self.n_layers))  # layers that take vectors
        self.first = min(self.searched)  # no layer below it ever changes
        # pristine q/k blocks of the searched layers; an empty stand-in (norm 0: the projector
        # leaves its gain alone and never builds its maps) for the others
        self.pristine = [tuple(p.weight_view(p.module.weight).clone() if i in self.searched
                               else p.module.weight.new_empty(0) for p in pair)
                         for i, pair in enumerate(self.arch.sites)]
        self.committed: dict[int, np.ndarray] = {}
        self._stack_cap = 1 << 30  # lowered when a stacked pass runs out of memory
        self.rescore = rescores_commits(cfg.eval.rescore_commits, self.model.dtype)
        files = models.WeightFiles.of(loaded) if own and self.first > 0 else None
        self._files = files  # .fallbacks: frozen tensors served from the model (not released)
        # frozen prefix: train's and dev's batch states holding the hidden state entering layer
        # `first` (which no commit changes); test's are made when scored. None: dev/test are
        # scored by a full forward
        self.prefix: dict[str, list[fastpath.BatchState]] | None = None
        if files is not None:
            kept = self._frozen_prefix(self.batches["train"] + self.batches["dev"])
            n_train = len(self.batches["train"])
            self.prefix = {"train": kept[:n_train], "dev": kept[n_train:]}
            self.states = self.prefix["train"]
            self._valid = self.first  # hidden states entering layers <= this are current
        else:
            self.states = [fastpath.capture(self.model, self.arch, b, self.kind, self.first)
                           for b in self.batches["train"]]
            self._valid = self.n_layers - 1
        self.stats = CalibrationStats.from_dict(stats) if stats else calibrate(self, files)
        shapes = [LayerShape(q.in_features, q.out_features, k.in_features, k.out_features)
                  for q, k in self.arch.sites]
        a = cfg.adapter
        self.projector = Projector(shapes, rank=a.rank, dim=a.dim, init=a.init, alpha=a.alpha,
                                   sigma0=cfg.optimizer.sigma0, seed=cfg.seed, stats=self.stats,
                                   device=self.device, ratio_bounds=a.ratio_bounds,
                                   param=a.param, basis=a.basis,
                                   weight_norms=[tuple(float(torch.linalg.norm(w.double()))
                                                       for w in pair) for pair in self.pristine])
        self.choose_calibration()  # eval.calibrate=auto: decided on the unadapted model
        # the fast path against the model's own forward, before any search (ModelError if not)
        self.self_check = self_check(self)
        release_free_memory()  # construction temporaries, before the first generation

    @torch.no_grad()
    def _frozen_prefix(self, batches: list[Batch]) -> list[fastpath.BatchState]:
        """The batches' states with the hidden state entering layer `first`, without layers
        0..first-1 (or the embedding tables) ever resident in the model: one pass records each
        layer's arguments, then each frozen layer is read from the files, run on every batch
        and dropped."""
        files, base = self._files, self.model.base_model
        embed = files.read(base, skip=(self.arch.layers, self.arch.final_norm))
        states = [fastpath.record_calls(self.arch, b, self.kind, base, embed) for b in batches]
        del embed
        fastpath.frozen_prefix(self.arch, states, self.first,
                               lambda i: files.read(self.arch.layers[i]))
        return states

    @property
    def n_layers(self) -> int:
        return self.arch.n_layers

    @property
    def dim(self) -> int:
        return self.cfg.adapter.dim

    def calibration_stats(self) -> dict:
        return self.stats.to_dict()

    # -- committed state ------------------------------------------------------------------
    def commit(self, layer: int, vector) -> None:
        """Install `vector` as layer's current best: merged into the weights of that layer."""
        z = self._check(layer, vector, ndim=1)
        self.committed[layer] = z.copy()
        self.merge(layer)
        self._valid = min(self._valid, layer)

    def merge(self, layer: int, committed: bool = True) -> None:
        z = self.committed.get(layer) if committed else None
        factors = [None] * 4
        if z is not None:
            factors = [f[0] for f in self.projector.factors(layer, torch.from_numpy(z[None]))]
        for i, (proj, pristine) in enumerate(zip(self.arch.sites[layer], self.pristine[layer],
                                                 strict=True)):
            merge_delta(proj, pristine, factors[2 * i], factors[2 * i + 1])

    @torch.no_grad()
    def advance_states(self, layer: int) -> None:
        """Bring the cached hidden states entering `layer` up to the committed state."""
        while self._valid < layer:
            for state in self.states:
                state.hidden[self._valid + 1] = fastpath.run_layers(
                    self.arch, state, self._valid, self._valid + 1, state.hidden[self._valid])
            self._valid += 1

    # -- population scoring -----------------------------------------------------------------
    def evaluate(self, layer: int, population) -> EvalResult:
        """Mean training loss and accuracy of each candidate vector for `layer` (others fixed):
        every batch's terms, combined in the canonical order (common/shards.py)."""
        return EvalResult(*combine_batches(self.batch_terms(layer, population)))

    @torch.no_grad()
    def batch_terms(self, layer: int, population, shard: tuple[int, int] = (0, 1)) -> BatchTerms:
        """Each candidate's summed loss and correct answers on every training batch of shard
        i of n (common/shards.py: consecutive batches), for `layer` (others fixed)."""
        z = torch.from_numpy(self._check(layer, population, ndim=2))
        index, count = shard
        if not 0 <= index < count:
            raise DfoloraError(f"shard {shard} must be (i, n) with 0 <= i < n")
        if self.calibrate and count > 1:
            raise DfoloraError(f"eval.calibrate={self.cfg.eval.calibrate} scores each candidate "
                               f"on the whole training set: example shards are off")
        first, stop = shard_range(len(self.states), index, count)
        n = z.shape[0]
        counts = np.array([s.batch.labels.shape[0] for s in self.states[first:stop]], np.int64)
        if n == 0:
            empty = np.zeros((stop - first, 0))
            return BatchTerms(first, empty, empty.copy(), counts)
        self.advance_states(layer)
        self.merge(layer, committed=False)  # candidates replace the layer's committed vector
        try:
            rows = [self._population_logits(layer, state, z) for state in self.states[first:stop]]
        finally:
            self.merge(layer)
        offsets = self._offsets(rows)
        loss_sums = np.zeros((stop - first, n), dtype=np.float64)
        hits = np.zeros((stop - first, n), dtype=np.float64)
        for row, (state, logits) in enumerate(zip(self.states[first:stop], rows, strict=True)):
            logits = logits.float() - offsets
            losses = example_losses(logits, state.batch.labels, self.cfg.eval.loss,
                                    self.cfg.eval.hinge_margin)
            # the float32 sum over the batch's examples, widened (common/shards.py)
            loss_sums[row] = losses.sum(-1).double().cpu().numpy()
            hits[row] = (logits.argmax(-1) == state.batch.labels).sum(-1).double().cpu().numpy()
        return BatchTerms(first, loss_sums, hits, counts)

    def _population_logits(self, layer: int, state: fastpath.BatchState,
                           z: torch.Tensor) -> torch.Tensor:
        """Label logits (n, B, K) of every candidate on one training batch, stacked as memory
        allows (docs/design.md §7): an out-of-memory pass is halved, remembered and retried."""
        n, start, parts = z.shape[0], 0, []
        while start < n:
            sl = slice(start, min(start + self._stack_size(state), n))
            try:
                parts.append(self._stacked(layer, state, z[sl]))
            except torch.OutOfMemoryError:
                if sl.stop - sl.start == 1:
                    raise
                self._stack_cap = max(1, (sl.stop - sl.start) // 2)
                continue
            start = sl.stop
        return torch.cat(parts)

    def _offsets(self, logits: list[torch.Tensor]) -> torch.Tensor | float:
        """The label offsets of `eval.calibrate=train` over every training example's logits
        (workers/scoring.py; `logits` one tensor per training batch, in batch order), per
        candidate; 0 when off."""
        if not self.calibrate:
            return 0.0
        labels = torch.cat([state.batch.labels for state in self.states])
        return label_offsets(torch.cat(logits, -2), labels, self.cfg.eval.offsets)

    @property
    def train_batches(self) -> int:
        """How many training batches a population is scored on (the unit of example shards)."""
        return len(self.states)

    @property
    def stack_cap(self) -> int | None:
        """Candidates per pass after out-of-memory halvings; None: never halved."""
        return None if self._stack_cap == 1 << 30 else self._stack_cap

    def limit_stack(self, cap: int) -> None:
        """Score with at most `cap` candidates per pass: a halving recorded in the checkpoint,
        re-applied on resume and on every actor (docs/design.md §8)."""
        if not isinstance(cap, (int, np.integer)) or isinstance(cap, bool) or cap < 1:
            raise DfoloraError(f"stack cap must be an integer >= 1, got {cap!r}")
        self._stack_cap = int(cap)

    @torch.no_grad()
    def committed_loss(self, layer: int) -> EvalResult:
        """Training loss and accuracy (one row) of the committed model, every layer merged:
        the layers from `layer` up run once per training batch (no stacking, no unmerged
        delta), as `predict` runs them, and the losses add up as in `evaluate`. `layer` only
        says where the cached hidden states are current; the result does not depend on it
        (docs/design.md §9, eval.rescore_commits)."""
        self._check(layer, np.zeros(self.dim), ndim=1)
        self.advance_states(layer)
        rows = [self.prefix_logits(state, layer) for state in self.states]
        offsets = self._offsets(rows)
        loss_sum = correct = 0.0
        total = 0
        for state, logits in zip(self.states, rows, strict=True):
            logits = logits.float() - offsets
            losses = example_losses(logits, state.batch.labels, self.cfg.eval.loss,
                                    self.cfg.eval.hinge_margin)
            loss_sum += float(losses.sum(-1).double().cpu())
            correct += float((logits.argmax(-1) == state.batch.labels).sum().double().cpu())
            total += state.batch.labels.shape[0]
        return EvalResult(np.array([loss_sum / total]), np.array([correct / total]))

    def _stack_size(self, state: fastpath.BatchState) -> int:
        by_budget = max(1, self.cfg.eval.max_stack_tokens // state.batch.tokens)
        return min(by_budget, self._stack_cap)

    def _stacked(self, layer: int, state: fastpath.BatchState, z: torch.Tensor) -> torch.Tensor:
        dtype = self.pristine[layer][0].dtype
        factors = tuple(f.to(dtype) for f in self.projector.factors(layer, z))
        with installed(self.arch.sites[layer], factors):
            logits = fastpath.suffix_logits(self.arch, self.head, state, layer, z.shape[0])
        return logits.reshape(z.shape[0], state.batch.labels.shape[0], -1)

    # -- committed-state scoring ------------------------------------------------------------
    @torch.no_grad()
    def prefix_logits(self, state: fastpath.BatchState, start: int | None = None) -> torch.Tensor:
        """`logits(state.batch)` from the stored hidden state entering layer `start` (default
        `first`): the same layers, final norm (on every position, as the base model applies
        it) and label head."""
        start = self.first if start is None else start
        hidden = fastpath.run_layers(self.arch, state, start, self.n_layers, state.hidden[start])
        hidden = self.arch.final_norm(hidden)
        return self.head(fastpath.gather_positions(hidden, state.batch.positions))

    def split_logits(self, split: str, batches: list[Batch],
                     shard: tuple[int, int]) -> list[torch.Tensor]:
        """Label logits of the committed model for a shard of a split's batches: from the
        stored frozen prefix where there is one (train, dev), from a frozen prefix made a group
        of batches at a time for test (not kept), else by a full forward."""
        if self.prefix is not None and split in self.prefix:
            index, count = shard
            return [self.prefix_logits(state) for state in self.prefix[split][index::count]]
        if self.prefix is None:
            return super().split_logits(split, batches, shard)
        parts = [self.prefix_logits(state)
                 for start in range(0, len(batches), TEST_GROUP)
                 for state in self._frozen_prefix(batches[start:start + TEST_GROUP])]
        release_free_memory()
        return parts

    # -- outputs and diagnostics ------------------------------------------------------------------
    def peft_adapter(self) -> tuple[dict, dict]:
        """The committed state in PEFT's LoRA format (workers/export.py)."""
        from workers.export import peft_adapter

        return peft_adapter(self)

    def peak_memory_mb(self) -> float:
        return peak_memory_mb(self.device)

    @torch.no_grad()
    def delta_ratio(self, layer: int, vector) -> tuple[float, float]:
        """||dW|| / ||W|| for the query and key deltas that `vector` gives at `layer`."""
        z = torch.from_numpy(self._check(layer, vector, ndim=1)[None])
        a_q, b_q, a_k, b_k = (f[0].double() for f in self.projector.factors(layer, z))
        w_q, w_k = (w.double() for w in self.pristine[layer])
        return (float(torch.linalg.norm(a_q @ b_q) / torch.linalg.norm(w_q)),
                float(torch.linalg.norm(a_k @ b_k) / torch.linalg.norm(w_k)))

    def delta_norms(self) -> list[dict]:
        """Relative size of each committed delta: the first thing to read when nothing learns."""
        out = []
        for layer in sorted(self.committed):
            q, k = self.delta_ratio(layer, self.committed[layer])
            out.append({"layer": layer, "q_ratio": q, "k_ratio": k})
        return out

    def _check(self, layer: int, vector, ndim: int) -> np.ndarray:
        if (not isinstance(layer, (int, np.integer)) or isinstance(layer, bool)
                or not 0 <= layer < self.n_layers):
            raise DfoloraError(f"layer {layer!r} out of range: the model has {self.n_layers}")
        if layer not in self.searched:
            raise DfoloraError(f"layer {layer} is not searched: schedule.layers is "
                               f"{sorted(self.searched)}")
        try:
            if np.iscomplexobj(vector):
                raise TypeError("complex values")
            z = np.asarray(vector, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise DfoloraError(f"vector for layer {layer} is not a real array ({err})") from None
        expect = "(d,)" if ndim == 1 else "(n, d)"
        if z.ndim != ndim or z.shape[-1] != self.dim:
            raise DfoloraError(f"vector for layer {layer} has shape {z.shape}; expected "
                               f"{expect} with d = {self.dim}")
        if not np.all(np.isfinite(z)):
            raise DfoloraError(f"vector for layer {layer} has non-finite entries")
        # arrays from Ray arrive read-only; torch.from_numpy wants a writable buffer
        return np.ascontiguousarray(z) if z.flags.writeable else z.copy()


def rescores_commits(setting: str, dtype: torch.dtype) -> bool:
    """eval.rescore_commits: `auto` is on for half-precision weights only, so fp32 runs keep
    their trajectories (docs/design.md §9)."""
    if setting == "auto":
        return dtype in (torch.bfloat16, torch.float16)
    return setting == "on"

