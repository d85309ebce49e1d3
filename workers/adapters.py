"""Where the low-rank deltas go: the query and key projections of every attention layer.

We wrap the model's own modules and never fork modelling code (PEFT's `inject_adapter` idea).
Separate projections are found by name in any family: `q_proj`/`k_proj` (Llama-style, OPT;
grouped-query attention included), `query`/`key` (BERT-style), `q_lin`/`k_lin` (DistilBERT).
A fused projection holds q, k and v in one module, in a layout its modelling code fixes, so it is
supported per model type only (`_FUSED`); the delta goes into the q and k output features alone,
v's are never touched (docs/design.md §1). A delta is `x A B` with `A` (in, r) and `B` (r, out):
no alpha/r scaling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from common.errors import ModelError

# where the base model keeps its layers, and what it applies after the last one, in order
_LAYERS = ("layers", "h", "decoder.layers", "encoder.layer", "transformer.layer")
_FINAL = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "project_out")
_SEPARATE = (("q_proj", "k_proj"), ("query", "key"), ("q_lin", "k_lin"))
SUPPORTED = ("separate q_proj/k_proj, query/key or q_lin/k_lin projections (Llama, Mistral, Qwen, "
             "Gemma, OPT, BERT, RoBERTa, ELECTRA, DistilBERT, ...) or the fused q/k/v "
             "projections of gpt2, phi3, gpt_neox and falcon")

Cols = slice | torch.Tensor  # output features: a contiguous block, or an index (interleaved heads)


@dataclass(frozen=True)
class Projection:
    """One of a layer's q or k projections: a module and the output features that are q (or k)."""

    parent: nn.Module
    attr: str
    cols: Cols
    in_features: int
    out_features: int
    transposed: bool  # GPT-2 Conv1D stores its weight as (in, out)

    @property
    def module(self) -> nn.Module:
        return getattr(self.parent, self.attr)

    def weight_view(self, weight: torch.Tensor) -> torch.Tensor:
        """The (out, in) block of `weight` (the module's weight or a copy of it) for q or k; a
        copy, not a view, when the features are interleaved."""
        return weight[:, self.cols].T if self.transposed else weight[self.cols]

    def write(self, weight: torch.Tensor, block: torch.Tensor) -> None:
        """Store an (out, in) block into `weight` where `weight_view` reads it."""
        if self.transposed:
            weight[:, self.cols] = block.T
        else:
            weight[self.cols] = block


@dataclass(frozen=True)
class Architecture:
    layers: nn.ModuleList
    sites: list[tuple[Projection, Projection]]  # (query, key) per layer
    final_norm: nn.Module  # what the base model applies after its last layer (Identity: nothing)

    @property
    def n_layers(self) -> int:
        return len(self.layers)


def architecture(model: nn.Module) -> Architecture:
    try:
        return _find_sites(model)
    except (AttributeError, IndexError, TypeError) as err:
        raise ModelError(f"unsupported architecture {type(model).__name__} "
                         f"({err}); supported: {SUPPORTED}") from None


def _find_sites(model: nn.Module) -> Architecture:
    base = model.base_model
    path = next((p for p in _LAYERS if isinstance(_get(base, p), nn.ModuleList)), None)
    model_type = getattr(model.config, "model_type", None)
    if path is None:
        raise ModelError(f"unsupported architecture {type(model).__name__}: no layer list "
                         f"found; supported: {SUPPORTED}")
    layers = _get(base, path)
    fused = _FUSED.get(model_type)
    sites = [fused(layer) if fused else _separate(layer) for layer in layers]
    if any(site is None for site in sites):
        raise ModelError(f"unsupported architecture {type(model).__name__} (model type "
                         f"'{model_type}'): no known attention layout; supported: {SUPPORTED}")
    owner = _get(base, path.rpartition(".")[0]) if "." in path else base
    final = [m for m in (getattr(owner, n, None) for n in _FINAL) if isinstance(m, nn.Module)]
    final_norm = final[0] if len(final) == 1 else nn.Sequential(*final) if final else nn.Identity()
    return Architecture(layers, sites, final_norm)


def _get(root: nn.Module, path: str):
    for part in path.split("."):
        root = getattr(root, part, None)
    return root


def _separate(layer: nn.Module) -> tuple[Projection, Projection] | None:
    """The first module inside `layer` (its self-attention) with a known pair of projections."""
    for module in layer.modules():
        for q, k in _SEPARATE:
            if isinstance(getattr(module, q, None), nn.Linear) and isinstance(
                    getattr(module, k, None), nn.Linear):
                return _linear(module, q, slice(None)), _linear(module, k, slice(None))
    return None


def _linear(parent: nn.Module, attr: str, cols: Cols) -> Projection:
    lin = getattr(parent, attr)
    out = lin.out_features if isinstance(cols, slice) and cols == slice(None) else _count(cols)
    return Projection(parent, attr, cols, lin.in_features, out, False)


def _count(cols: Cols) -> int:
    return cols.stop - cols.start if isinstance(cols, slice) else cols.numel()


def _blocks(groups: int, stride: int, offset: int, width: int, device) -> Cols:
    """Output features `g * stride + offset + [0, width)` for every group g: a slice when there
    is one group, an index tensor when heads interleave q, k and v."""
    if groups == 1:
        return slice(offset, offset + width)
    starts = torch.arange(groups, device=device)[:, None] * stride + offset
    return (starts + torch.arange(width, device=device)).reshape(-1)


def _gpt2(layer: nn.Module) -> tuple[Projection, Projection]:
    """GPT-2's c_attn, a Conv1D (in, 3H): output features [0:H] are q, [H:2H] are k."""
    conv = layer.attn.c_attn
    n_in, n_out = conv.weight.shape
    h = n_out // 3
    return (Projection(layer.attn, "c_attn", slice(0, h), n_in, h, True),
            Projection(layer.attn, "c_attn", slice(h, 2 * h), n_in, h, True))


def _phi3(layer: nn.Module) -> tuple[Projection, Projection]:
    """Phi-3's qkv_proj: q's heads, then k's (grouped-query), then v's."""
    attn = layer.self_attn
    n_q = attn.config.num_attention_heads * attn.head_dim
    n_k = attn.num_key_value_heads * attn.head_dim
    return (_linear(attn, "qkv_proj", slice(0, n_q)),
            _linear(attn, "qkv_proj", slice(n_q, n_q + n_k)))


def _gpt_neox(layer: nn.Module) -> tuple[Projection, Projection]:
    """GPT-NeoX/Pythia's query_key_value: per head, its q, k and v features in turn."""
    attn = layer.attention
    heads, size = attn.config.num_attention_heads, attn.head_size
    device = attn.query_key_value.weight.device
    return (_linear(attn, "query_key_value", _blocks(heads, 3 * size, 0, size, device)),
            _linear(attn, "query_key_value", _blocks(heads, 3 * size, size, size, device)))


def _falcon(layer: nn.Module) -> tuple[Projection, Projection]:
    """Falcon's query_key_value, in the three layouts of its `_split_heads`: the new decoder
    architecture (per key/value group: its query heads, one key, one value), multi-query (all
    query heads, one key, one value) and the original (per head: q, k, v)."""
    attn = layer.self_attention
    heads, size = attn.num_heads, attn.head_dim
    device = attn.query_key_value.weight.device
    if attn.new_decoder_architecture:
        groups, per = attn.num_kv_heads, attn.num_heads // attn.num_kv_heads
        q = _blocks(groups, (per + 2) * size, 0, per * size, device)
        k = _blocks(groups, (per + 2) * size, per * size, size, device)
    elif attn.multi_query:
        q, k = slice(0, heads * size), slice(heads * size, (heads + 1) * size)
    else:
        q = _blocks(heads, 3 * size, 0, size, device)
        k = _blocks(heads, 3 * size, size, size, device)
    return _linear(attn, "query_key_value", q), _linear(attn, "query_key_value", k)


# model type -> its fused q/k/v projection per layer; any other model type with a fused
# projection is refused (a wrong layout would put deltas on v, and no check could tell)
_FUSED: dict[str, Callable[[nn.Module], tuple[Projection, Projection]]] = {
    "gpt2": _gpt2, "phi3": _phi3, "gpt_neox": _gpt_neox, "falcon": _falcon}


def merge_delta(proj: Projection, pristine: torch.Tensor, a: torch.Tensor | None,
                b: torch.Tensor | None) -> None:
    """Write pristine + (A B)^T into the module's weight block (pristine alone when a is None)."""
    weight = proj.module.weight
    if a is None:
        proj.write(weight, pristine)
    else:  # sum in fp32 and round once (bf16 weights would otherwise round twice)
        proj.write(weight, (pristine.float() + (a.float() @ b.float()).T).to(weight.dtype))


def delta_hook(cols: Cols, a: torch.Tensor, b: torch.Tensor):
    """A forward hook that adds `x A B` to a real projection's output features `cols`: one
    candidate applied the plain way (workers/reference.py, workers/selfcheck.py)."""

    def hook(_module, args, output):
        output = output.clone()
        output[..., cols] += (args[0] @ a) @ b
        return output

    return hook


class StackedLowRank(nn.Module):
    """Wraps a projection so that each of C stacked candidates gets its own delta.

    The input is (C * B, T, in), candidate-major. Each part is (cols, A, B) with A (C, in, r) and
    B (C, r, out); the delta is a batched matmul per candidate, added to the output features
    `cols` (a block, or an index for fused projections whose heads interleave q, k and v).
    """

    def __init__(self, base: nn.Module, parts: list[tuple[Cols, torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.base, self.parts = base, parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        n_cand = self.parts[0][1].shape[0]
        xs = x.reshape(n_cand, -1, x.shape[-1])
        for cols, a, b in self.parts:
            delta = torch.bmm(torch.bmm(xs, a), b)
            y[..., cols] += delta.reshape(*y.shape[:-1], -1)
        return y


class installed:
    """Context manager: temporarily replace q/k modules of one layer with stacked wrappers."""

    def __init__(self, pair: tuple[Projection, Projection],
                 deltas: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]):
        q, k = pair
        a_q, b_q, a_k, b_k = deltas
        if q.attr == k.attr:  # fused: one module, two sets of output features
            self.wraps = [(q, [(q.cols, a_q, b_q), (k.cols, a_k, b_k)])]
        else:
            self.wraps = [(q, [(q.cols, a_q, b_q)]), (k, [(k.cols, a_k, b_k)])]

    def __enter__(self) -> installed:
        self.saved = [(p, p.module) for p, _ in self.wraps]
        for proj, parts in self.wraps:
            setattr(proj.parent, proj.attr, StackedLowRank(proj.module, parts))
        return self

    def __exit__(self, *exc) -> None:
        for proj, module in self.saved:
            setattr(proj.parent, proj.attr, module)
