"""Layer-by-layer execution for fast population scoring (docs/design.md §7).

* `capture` runs the frozen model once on a batch and records, for every layer, the hidden state
  entering it and the other arguments the model passed to it (masks, rotary embeddings, ...). Those
  arguments do not depend on the adapter, so they are reused for the life of the worker.
* `run_layers` advances a hidden state through a range of layers with the recorded arguments, so
  hidden states entering layer l are recomputed only when a layer below l is committed.
* `suffix_logits` starts C stacked copies of a batch at layer l (tensors whose first dim is the
  batch are tiled candidate-major) and returns label-word logits at the scored positions only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from workers.adapters import Architecture
from workers.batches import Batch


class _Stop(Exception):
    """Raised by a hook after the last layer: the head is not needed during capture."""


@dataclass
class LayerCall:
    args: tuple  # positional arguments after the hidden state
    kwargs: dict


@dataclass
class BatchState:
    """One batch of training examples with its per-layer calls and cached hidden states."""

    batch: Batch
    calls: list[LayerCall]
    hidden: list[torch.Tensor | None] = field(default_factory=list)  # entering each layer


def model_inputs(batch: Batch, kind: str) -> dict:
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if kind == "causal":
        inputs["use_cache"] = False
    return inputs


def capture(model: nn.Module, arch: Architecture, batch: Batch, kind: str) -> BatchState:
    state = BatchState(batch, [None] * arch.n_layers, [None] * arch.n_layers)

    def pre_hook(index):
        def hook(_module, args, kwargs):
            state.hidden[index] = args[0].clone()
            state.calls[index] = LayerCall(tuple(args[1:]), dict(kwargs))

        return hook

    def stop(_module, _args, _output):
        raise _Stop

    handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True)
               for i, layer in enumerate(arch.layers)]
    handles.append(arch.layers[-1].register_forward_hook(stop))
    try:
        model(**model_inputs(batch, kind))
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return state


def run_layers(arch: Architecture, state: BatchState, start: int, stop: int,
               hidden: torch.Tensor, n_cand: int = 1) -> torch.Tensor:
    """Hidden state after layers [start, stop), for `n_cand` stacked copies of the batch."""
    rows = state.batch.input_ids.shape[0]
    memo: dict[int, object] = {}
    for i in range(start, stop):
        call = state.calls[i]
        args = _tile(call.args, n_cand, rows, memo)
        kwargs = _tile(call.kwargs, n_cand, rows, memo)
        out = arch.layers[i](hidden, *args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def _tile(obj, n: int, rows: int, memo: dict):
    """Repeat every batch-first tensor n times along dim 0 (candidate-major), recursively.

    Batch-first means at least 2-D with first dim == batch rows; 1-D tensors such as
    cache positions and broadcast tensors with first dim 1 are left alone.
    """
    if n == 1:
        return obj
    if isinstance(obj, torch.Tensor):
        if obj.dim() >= 2 and obj.shape[0] == rows:
            if id(obj) not in memo:
                memo[id(obj)] = obj.repeat(n, *([1] * (obj.dim() - 1)))
            return memo[id(obj)]
        return obj
    if isinstance(obj, tuple):
        return tuple(_tile(v, n, rows, memo) for v in obj)
    if isinstance(obj, list):
        return [_tile(v, n, rows, memo) for v in obj]
    if isinstance(obj, dict):
        return {k: _tile(v, n, rows, memo) for k, v in obj.items()}
    return obj


def gather_positions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """hidden (N, T, H) -> (N, H) at one position per row."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), positions]


def label_head(model: nn.Module, label_ids: list[int]) -> nn.Module:
    """The model's output head restricted to the label words' rows (logits only where needed).

    For causal LMs that is a small Linear with the label rows of `lm_head`. For masked LMs the head
    has a transform before its decoder (RoBERTa `lm_head`, BERT `cls`): we return a shallow copy
    whose decoder is swapped for the small Linear, sharing every other parameter.
    """
    out = model.get_output_embeddings()
    small = nn.Linear(out.in_features, len(label_ids), bias=out.bias is not None,
                      device=out.weight.device, dtype=out.weight.dtype)
    small.weight = nn.Parameter(label_rows(out.weight.detach(), label_ids), requires_grad=False)
    if out.bias is not None:
        small.bias = nn.Parameter(label_rows(out.bias.detach(), label_ids), requires_grad=False)
    path = next(name for name, mod in model.named_modules() if mod is out).split(".")
    if len(path) == 1:
        return small
    top = copy.copy(getattr(model, path[0]))
    node = top
    for part in path[1:-1]:
        node._modules = dict(node._modules)
        node._modules[part] = copy.copy(node._modules[part])
        node = node._modules[part]
    node._modules = dict(node._modules)
    node._modules[path[-1]] = small
    return top


def label_rows(table: torch.Tensor, label_ids: list) -> torch.Tensor:
    """Rows of `table` (vocab, ...) per class: a word's row, or the mean row of a word list.

    The decoder is linear, so a mean row gives the mean of the words' logits, which is also the
    mean of their full-vocabulary log-probabilities up to a constant shared by every class: the
    class cross-entropy is the same as averaging log-probabilities (BBT-RGB's verbalisers).
    """
    rows = []
    for entry in label_ids:
        ids = torch.tensor([entry] if isinstance(entry, int) else list(entry),
                           device=table.device)
        rows.append(table[ids].double().mean(0).to(table.dtype) if len(ids) > 1 else table[ids[0]])
    return torch.stack(rows).clone()


def suffix_logits(arch: Architecture, head: nn.Module, state: BatchState, layer: int,
                  n_cand: int) -> torch.Tensor:
    """Label logits (n_cand * B, n_labels) starting `n_cand` stacked copies at `layer`."""
    rows = state.batch.input_ids.shape[0]
    hidden = state.hidden[layer]
    if n_cand > 1:
        hidden = hidden.repeat(n_cand, 1, 1)
    hidden = run_layers(arch, state, layer, arch.n_layers, hidden, n_cand)
    positions = state.batch.positions.repeat(n_cand)
    assert hidden.shape[0] == rows * n_cand
    return head(arch.final_norm(gather_positions(hidden, positions)))
