"""The run configuration: one typed, frozen tree assembled from component defaults.

`RunConfig.from_dict(data)` validates as it builds: an unknown key (with a close-match hint), a
value of the wrong type or one outside its allowed set raises `ConfigError` naming the dotted key.
No option is ever `eval`-ed. (The shape follows PEFT's `LoraConfig` and nanoGPT's stored config.)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from common.errors import ConfigError

CHOICES: dict[str, tuple[str, ...]] = {
    "model.kind": ("auto", "causal", "masked"),
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "task.label_token": ("single", "first"),
    "adapter.init": ("qk-input", "paper", "paper-a-only", "random"),
    "eval.loss": ("ce", "hinge"),
    "eval.rescore_commits": ("auto", "on", "off"),
    "eval.calibrate": ("off", "train", "auto"),
    "eval.offsets": ("mean", "fit"),
    "schedule.alternate": ("round", "layer"),
    "schedule.accept": ("elitist", "xbest", "mean"),
    "schedule.select": ("metric", "loss"),
    "schedule.recenter": ("switch", "visit"),
    "adapter.param": ("ab", "b", "a"),
    "adapter.basis": ("random", "input-pca", "input-energy"),
}


INT_MIN, INT_MAX = -(2**63), 2**63 - 1  # every integer key: counts, sizes, seeds


@dataclass(frozen=True)
class ModelConfig:
    name: str = "smollm2-135m"  # built-in name, Hugging Face hub name, or local folder
    kind: str = "auto"  # causal | masked | auto (from the model's architecture)
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on GPU
    device: str = "auto"  # auto: cuda if available, else cpu
    max_length: int = 128  # tokens per example; longer texts are truncated (text part only)


@dataclass(frozen=True)
class TaskConfig:
    name: str = "rotten_tomatoes"
    k: int = 16  # examples per class in train, and again in dev
    template: str = "default"  # a named template of the task, or a literal with {text} / {mask}
    # one word per class, or a list of words per class whose logits are averaged (BBT-RGB's
    # multi-word verbalisers); None: the task's words for the template
    label_words: tuple[str | tuple[str, ...], ...] | None = None
    label_space: bool = True  # prepend a space to label words (BPE/SentencePiece tokenizers)
    label_token: str = "single"  # "first": allow multi-token words, scoring their first token
    max_test: int | None = 1000  # cap on test examples (class-stratified, fixed sample); None: all
    # local data (CSV, TSV with a header, JSONL, or a `save_to_disk` folder) instead of the hub;
    # no test_file: the folder's test split, else a fixed 20 % of train_file is held out
    train_file: str | None = None
    dev_file: str | None = None  # dev = k per class drawn from here instead of from train
    test_file: str | None = None
    # custom tasks (name: custom): the text column(s) that fill the template's {slots}, the label
    # column, and each label value's word, in class order
    text_fields: tuple[str, ...] | None = None
    label_field: str | None = None
    labels: dict[str, str] | None = None


@dataclass(frozen=True)
class AdapterConfig:
    rank: int = 4
    dim: int = 500  # subspace dimension d per layer, split in four equal chunks
    init: str = "qk-input"
    alpha: float = 1.0
    # qk-input only: rescale a layer's maps so that a typical first candidate's ||dW|| / ||W||
    # is inside these bounds (docs/design.md §2); null keeps the unscaled maps exactly
    ratio_bounds: tuple[float, ...] | None = (0.1, 1.0)
    # which factors the vector searches (docs/design.md §2): ab: A and B both maps of z (the paper;
    # the delta is quadratic in z and flat at 0); b: A fixed random, z -> B (linear in z); a: B
    # fixed random, z -> A
    param: str = "ab"
    # the row space of A_Q and A_K (docs/design.md §2): random (the paper), or the top
    # `basis_rank` principal directions of the layer's q/k inputs on the training examples,
    # centred (input-pca) or not (input-energy), so x A is large on what the examples share
    basis: str = "random"
    basis_rank: int = 32


@dataclass(frozen=True)
class EvalConfig:
    loss: str = "ce"
    hinge_margin: float = 2.0
    batch_size: int = 16  # examples per forward pass when scoring dev/test (length-bucketed)
    # training examples per batch when scoring populations: small batches of similar length
    # waste almost no padding, and candidates are stacked to fill the pass instead
    train_batch_size: int = 4
    max_stack_tokens: int = 16384  # candidates x tokens per stacked forward pass (memory budget)
    # loss* := the committed model's own training loss, scored after each commit (auto: on in
    # bf16/fp16, where stacked and merged arithmetic round apart; docs/design.md §9)
    rescore_commits: str = "auto"
    # CPU only: have the C heap return big freed buffers to the system at once, so a run's peak
    # memory is what it uses, not what the heap kept (docs/design.md §7; costs CPU search time)
    lean_heap: bool = True
    # train: every label's logit less its mean over the training examples, in the search's loss
    # and in every score, so no evaluation is spent on the label bias; auto: train if that
    # lowers the unadapted model's dev loss, else off (docs/design.md §3)
    calibrate: str = "off"
    # how eval.calibrate estimates the offsets: mean (each label's mean training logit) or fit
    # (the intercepts that minimise the training cross-entropy; docs/design.md §3)
    offsets: str = "mean"


@dataclass(frozen=True)
class OptimizerConfig:
    # cma | fwa | fwa-dyn | nevergrad:<Name>; the names are checked by orchestrator.validate_run
    # (that needs the optimiser registry, which this torch- and orchestrator-free module avoids)
    name: str = "cma"
    popsize: int = 20  # candidates per generation (CMA-ES lambda, FWA sparks)
    sigma0: float = 1.0  # initial step size; also scales the projection maps (docs/design.md §2)
    bounds: tuple[float, ...] | None = None  # [lo, hi] box for every coordinate; must hold 0
    fireworks: int | None = None  # fwa-dyn only: number of fireworks (null: its default)
    # nevergrad:<Name> only: the budget Nevergrad plans for (NGOpt and other meta-optimisers
    # need one); null: the run budget shared out over the (layer, method) optimisers
    nevergrad_budget: int | None = None
    # cma only: separable CMA-ES (Ros & Hansen 2008), a diagonal covariance whose variances
    # learn about d/3 times faster (pycma's CMA_diagonal); false: the full covariance
    cma_diagonal: bool = False


@dataclass(frozen=True)
class ScheduleConfig:
    """The alternating per-layer schedule (docs/design.md §5)."""

    optimizers: tuple[str, ...] | None = None  # methods to alternate; null: [optimizer.name]
    alternate: str = "round"  # round: method = round % n; layer: method = layer index % n
    # elitist: only improvements of loss*; xbest: the authors' rule; mean: each generation also
    # scores the optimiser's centre (CMA-ES's mean), and only the centre is installed, when it
    # improves loss* (docs/design.md §5)
    accept: str = "elitist"
    layers: tuple[int, ...] | None = None  # visiting order (and subset); null: 0..L-1
    rounds: int | None = None  # null: until the budget is spent
    generations_per_visit: int = 1  # generations of a layer's optimiser per visit
    # the dev score that picks the final snapshot: metric (the task's, e.g. accuracy; ties keep
    # the earlier) or loss (dev loss, a finer signal on 32 examples)
    select: str = "metric"
    # re-centre a layer's optimiser on its committed vector: switch (only when the method
    # changes) or visit (at every visit, so it never drifts from loss*)
    recenter: str = "switch"
    # objective = training loss + l2 * mean(z^2) (a pull toward the zero delta, as OpenAI-ES and
    # evosax decay weights); 0: the plain loss. loss* and the metrics records hold the objective
    l2: float = 0.0


@dataclass(frozen=True)
class ClusterConfig:
    # 0: score in this process; N: N Ray actors (orchestrator/evaluation); -1: one Ray actor per
    # GPU of the cluster, or per pair of CPUs when it has none
    num_actors: int = 0
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    # candidates per dispatched chunk; null: population/(2 actors) near-equal chunks; "guided":
    # chunks that shrink towards the end of a generation (docs/design.md §6)
    chunk_size: int | str | None = None
    deadline_s: float | None = None  # an actor silent this long is replaced; null: no deadline
    address: str | None = None  # an existing cluster; null: RAY_ADDRESS or a local one
    # idle actors run copies of the longest-outstanding chunks; the first answer wins (the same
    # bits either way: docs/design.md §6)
    backup_chunks: bool = True
    # each chunk's training batches split over this many actors, per-batch losses combined in
    # batch order (the same bits: docs/design.md §6); "auto": enough for two pieces per
    # configured actor when actors outnumber chunks, else 1
    example_shards: int | str = 1


@dataclass(frozen=True)
class RunConfig:
    seed: int = 42
    budget: int = 8000  # candidate evaluations on the training set ("API calls")
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None = None) -> RunConfig:
        cfg = _build(cls, {} if data is None else data, "")
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def replace(self, **dotted: Any) -> RunConfig:
        """A copy with dotted keys overridden, e.g. `cfg.replace(**{"task.k": 8})`."""
        data = self.to_dict()
        for key, value in dotted.items():
            *parents, leaf = key.split(".")
            node = data
            for part in parents:
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"unknown config key '{key}'")
                node = node[part]
            node[leaf] = value
        return RunConfig.from_dict(data)

    def validate(self) -> None:
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        positive = {
            "model.max_length": self.model.max_length,
            "task.k": self.task.k,
            "adapter.rank": self.adapter.rank,
            "adapter.dim": self.adapter.dim,
            "adapter.alpha": self.adapter.alpha,
            "adapter.basis_rank": self.adapter.basis_rank,
            "eval.batch_size": self.eval.batch_size,
            "eval.train_batch_size": self.eval.train_batch_size,
            "eval.max_stack_tokens": self.eval.max_stack_tokens,
            "eval.hinge_margin": self.eval.hinge_margin,
            "optimizer.sigma0": self.optimizer.sigma0,
            "cluster.cpus_per_actor": self.cluster.cpus_per_actor,
        }
        if isinstance(self.cluster.chunk_size, str) and self.cluster.chunk_size != "guided":
            raise ConfigError(f"cluster.chunk_size must be an integer > 0, null or \"guided\", "
                              f"got {self.cluster.chunk_size!r}")
        for key in ("chunk_size", "deadline_s"):  # optional, but positive when given
            if getattr(self.cluster, key) not in (None, "guided"):
                positive[f"cluster.{key}"] = getattr(self.cluster, key)
        shards = self.cluster.example_shards
        if shards != "auto" and not (isinstance(shards, int) and shards >= 1):
            raise ConfigError(f"cluster.example_shards must be \"auto\" or an integer >= 1, "
                              f"got {shards!r}")
        if self.eval.calibrate != "off" and shards not in ("auto", 1):
            raise ConfigError(f"eval.calibrate={self.eval.calibrate} scores each candidate on the "
                              f"whole training set: cluster.example_shards must be 1 or "
                              f"\"auto\", got {shards!r}")
        if self.cluster.num_actors < -1 or self.cluster.gpus_per_actor < 0:
            raise ConfigError(f"cluster.num_actors must be >= -1 (-1: one per GPU or CPU pair) "
                              f"and cluster.gpus_per_actor >= 0, got "
                              f"{self.cluster.num_actors} and {self.cluster.gpus_per_actor}")
        for key, value in positive.items():
            if not value > 0:
                raise ConfigError(f"{key} must be > 0, got {value!r}")
        if self.adapter.dim % 4:
            raise ConfigError(f"adapter.dim must be divisible by 4, got {self.adapter.dim}")
        bounds = self.adapter.ratio_bounds
        if bounds is not None and not (len(bounds) == 2 and 0 < bounds[0] <= bounds[1]):
            raise ConfigError(f"adapter.ratio_bounds must be [low, high] with 0 < low <= high, "
                              f"got {list(bounds)}")
        if self.task.max_test is not None and self.task.max_test < 1:
            raise ConfigError(f"task.max_test must be >= 1 or null, got {self.task.max_test}")
        self._validate_search()

    def _validate_search(self) -> None:
        """The optimiser and schedule checks that need no registry (names: validate_run)."""
        opt, sched = self.optimizer, self.schedule
        if opt.popsize < 2:
            raise ConfigError(f"optimizer.popsize must be >= 2, got {opt.popsize}")
        if self.budget < opt.popsize:
            raise ConfigError(f"budget ({self.budget}) is smaller than one generation "
                              f"(optimizer.popsize = {opt.popsize})")
        if opt.bounds is not None and not (len(opt.bounds) == 2
                                            and opt.bounds[0] <= 0.0 <= opt.bounds[1]
                                            and opt.bounds[0] < opt.bounds[1]):
            raise ConfigError(f"optimizer.bounds must be [lo, hi] with lo <= 0 <= hi and "
                              f"lo < hi (the search starts at 0), got {list(opt.bounds)}")
        for key in ("fireworks", "nevergrad_budget"):
            value = getattr(opt, key)
            if value is not None and value < 1:
                raise ConfigError(f"optimizer.{key} must be >= 1 or null, got {value}")
        if sched.optimizers is not None and len(set(sched.optimizers)) != len(sched.optimizers):
            raise ConfigError(f"schedule.optimizers lists a method twice: "
                              f"{list(sched.optimizers)}")
        if sched.layers is not None:
            if min(sched.layers) < 0 or len(set(sched.layers)) != len(sched.layers):
                raise ConfigError(f"schedule.layers must be distinct layer indices >= 0, "
                                  f"got {list(sched.layers)}")
        if sched.rounds is not None and sched.rounds < 1:
            raise ConfigError(f"schedule.rounds must be >= 1 or null, got {sched.rounds}")
        if not sched.l2 >= 0:
            raise ConfigError(f"schedule.l2 must be >= 0, got {sched.l2}")
        if sched.generations_per_visit < 1:
            raise ConfigError(f"schedule.generations_per_visit must be >= 1, "
                              f"got {sched.generations_per_visit}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, "
                          f"got {_show(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        name = key if isinstance(key, str) else _show(key)
        path = f"{prefix}{name}"
        if key not in names:
            near = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean '{prefix}{near[0]}'?)" if near else ""
            raise ConfigError(f"unknown config key {path!r}{hint}")
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path + ".")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for alternative in inner:  # e.g. a word or a list of words: the first that fits
            try:
                return _coerce(alternative, value, path)
            except ConfigError as err:
                errors.append(err)
        # report the alternative of the value's own shape: a list's error inside the list
        shaped = [e for a, e in zip(inner, errors, strict=True)
                  if (typing.get_origin(a) is tuple) == isinstance(value, (list, tuple))]
        raise (shaped or errors)[0]
    if origin is dict:  # string keys (YAML integer keys become strings) -> coerced values
        if not isinstance(value, dict) or not value:
            raise ConfigError(f"{path} must be a non-empty mapping, got {_show(value)}")
        bad = [k for k in value if isinstance(k, bool) or not isinstance(k, (str, int))
               or (isinstance(k, int) and not INT_MIN <= k <= INT_MAX)]
        if bad:
            raise ConfigError(f"{path}: keys must be strings or 64-bit integers, "
                              f"got {_show(bad[0])}")
        return {str(k): _coerce(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"{path} must be a non-empty list, got {_show(value)}")
        return tuple(_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    allowed = CHOICES.get(path)
    if hint is str and isinstance(value, bool) and allowed and "off" in allowed:
        # YAML 1.1 reads a bare on/off (yes/no, true/false) as a boolean: take the word meant
        value = {True: "on", False: "off"}[value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"{path} must be float, got an integer too large for one") from None
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{path} must be {hint.__name__}, got {_show(value)}")
    if hint is int and not INT_MIN <= value <= INT_MAX:  # JSON, YAML and torch seeds need this
        raise ConfigError(f"{path} must be a 64-bit integer, got one of "
                          f"{value.bit_length()} bits")
    if hint is float and not math.isfinite(value):
        raise ConfigError(f"{path} must be a finite number, got {value!r}")
    if allowed and value not in allowed:
        raise ConfigError(f"{path} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _show(value: Any) -> str:
    """repr(value) for an error message, or a stand-in where Python refuses to print it: an
    integer of more than 4300 digits (sys.get_int_max_str_digits), or nesting too deep."""
    try:
        return repr(value)
    except (ValueError, RecursionError):
        return f"<{type(value).__name__} too large to print>"


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
