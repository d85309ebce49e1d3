"""Where the low-rank deltas go: the query and key projections of every attention layer.

We wrap the model's own modules and never fork modelling code (PEFT's `inject_adapter` idea).
Supported: Llama-style `q_proj`/`k_proj` (grouped-query attention included), GPT-2's fused
`c_attn` (a Conv1D whose output columns [0:H] are q and [H:2H] are k) and BERT/RoBERTa
`query`/`key`. A delta is `x A B` with `A` (in, r) and `B` (r, out): no alpha/r scaling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from common.errors import ModelError

_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm")


@dataclass(frozen=True)
class Projection:
    """One of a layer's q or k projections: a module and the output columns that are q (or k)."""

    parent: nn.Module
    attr: str
    cols: slice
    in_features: int
    out_features: int
    transposed: bool  # GPT-2 Conv1D stores its weight as (in, out)

    @property
    def module(self) -> nn.Module:
        return getattr(self.parent, self.attr)

    def weight_view(self, weight: torch.Tensor) -> torch.Tensor:
        """The (out, in) block of `weight` (the module's weight or a copy of it) for q or k."""
        return weight[:, self.cols].T if self.transposed else weight[self.cols]


@dataclass(frozen=True)
class Architecture:
    layers: nn.ModuleList
    sites: list[tuple[Projection, Projection]]  # (query, key) per layer
    final_norm: nn.Module  # Identity for post-norm encoders
    pre_norm: bool

    @property
    def n_layers(self) -> int:
        return len(self.layers)


def inspect(model: nn.Module) -> Architecture:
    try:
        return _inspect(model)
    except (AttributeError, IndexError, TypeError) as err:
        raise ModelError(f"unsupported architecture {type(model).__name__}: no known attention "
                         f"layout ({err})") from None


def _inspect(model: nn.Module) -> Architecture:
    base = model.base_model
    if hasattr(base, "layers"):  # Llama, Mistral, Qwen, SmolLM, ...
        layers, pre_norm = base.layers, True
        sites = [_separate(layer.self_attn, "q_proj", "k_proj") for layer in layers]
    elif hasattr(base, "h") and hasattr(base.h[0], "attn"):  # GPT-2
        layers, pre_norm = base.h, True
        sites = [_fused(block.attn) for block in layers]
    elif hasattr(base, "encoder") and hasattr(base.encoder, "layer"):  # BERT, RoBERTa
        layers, pre_norm = base.encoder.layer, False
        sites = [_separate(layer.attention.self, "query", "key") for layer in layers]
    else:
        raise ModelError(f"unsupported architecture {type(model).__name__}: no known attention "
                         "layout (Llama-style q_proj/k_proj, GPT-2 c_attn, BERT query/key)")
    final = next((getattr(base, n) for n in _NORM_NAMES if hasattr(base, n)), None)
    if pre_norm and final is None:
        raise ModelError(f"{type(model).__name__}: pre-norm model without a known final norm "
                         f"({', '.join(_NORM_NAMES)})")
    return Architecture(layers, sites, final if pre_norm else nn.Identity(), pre_norm)


def _separate(attn: nn.Module, q: str, k: str) -> tuple[Projection, Projection]:
    def proj(attr: str) -> Projection:
        lin = getattr(attn, attr)
        return Projection(attn, attr, slice(None), lin.in_features, lin.out_features, False)

    return proj(q), proj(k)


def _fused(attn: nn.Module) -> tuple[Projection, Projection]:
    conv = attn.c_attn
    n_in, n_out = conv.weight.shape  # Conv1D: (in, 3 * hidden)
    h = n_out // 3
    return (Projection(attn, "c_attn", slice(0, h), n_in, h, True),
            Projection(attn, "c_attn", slice(h, 2 * h), n_in, h, True))


def merge_delta(proj: Projection, pristine: torch.Tensor, a: torch.Tensor | None,
                b: torch.Tensor | None) -> None:
    """Write pristine + (A B)^T into the module's weight block (pristine alone when a is None)."""
    block = proj.weight_view(proj.module.weight)
    if a is None:
        block.copy_(pristine)
    else:  # sum in fp32 and round once (bf16 weights would otherwise round twice)
        block.copy_((pristine.float() + (a.float() @ b.float()).T).to(block.dtype))


def delta_hook(cols: slice, a: torch.Tensor, b: torch.Tensor):
    """A forward hook that adds `x A B` to a real projection's output columns `cols`: one
    candidate applied the plain way (workers/reference.py, workers/selfcheck.py)."""

    def hook(_module, args, output):
        output = output.clone()
        output[..., cols] += (args[0] @ a) @ b
        return output

    return hook


class StackedLowRank(nn.Module):
    """Wraps a projection so that each of C stacked candidates gets its own delta.

    The input is (C * B, T, in), candidate-major. Each part is (cols, A, B) with A (C, in, r) and
    B (C, r, out); the delta is a batched matmul per candidate, added to the output columns `cols`.
    """

    def __init__(self, base: nn.Module, parts: list[tuple[slice, torch.Tensor, torch.Tensor]]):
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
        if q.attr == k.attr:  # fused: one module, two column blocks
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
