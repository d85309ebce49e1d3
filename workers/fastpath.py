"""Layer-by-layer execution for fast population scoring (docs/design.md §7).

* `capture` runs the frozen model once on a batch and records, for every layer, the hidden state
  entering it and the other arguments the model passed to it (masks, rotary embeddings, ...). Those
  arguments do not depend on the adapter, so they are reused for the life of the worker.
* `run_layers` advances a hidden state through a range of layers with the recorded arguments, so
  hidden states entering layer l are recomputed only when a layer below l is committed.
* `frozen_prefix` computes the hidden states entering a layer for many batches without a full
  forward: it records every layer's arguments in a pass that runs no layer (`record_calls`), then
  runs the frozen layers below one at a time on every batch, each with parameters the caller
  reads afresh and drops after (workers/models.py `WeightFiles`), so at most one of those layers
  is resident at a time. `layers_from` runs the model's own forward with those layers read the
  same way.
* `suffix_logits` starts C stacked copies of a batch at layer l (tensors whose first dim is the
  batch are tiled candidate-major) and returns label-word logits at the scored positions only,
  through the model's own output path (workers/head.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


def capture(model: nn.Module, arch: Architecture, batch: Batch, kind: str,
            first: int = 0) -> BatchState:
    """One full forward; the hidden states entering layers >= `first` and every layer's call."""
    state = BatchState(batch, [None] * arch.n_layers, [None] * arch.n_layers)
    keep = {i: True for i in range(first, arch.n_layers)}  # True: a copy of the hidden state
    with _recording(arch, state, keep):
        model(**model_inputs(batch, kind))
    return state


@contextmanager
def _recording(arch: Architecture, state: BatchState, keep: dict[int, bool]) -> Iterator[None]:
    """Hooks that record every layer's call arguments into `state`, and the hidden state entering
    each layer in `keep` (cloned where its value is True); the pass stops after the last layer."""

    def pre_hook(index):
        def hook(_module, args, kwargs):
            if index in keep:
                state.hidden[index] = args[0].clone() if keep[index] else args[0]
            state.calls[index] = LayerCall(tuple(args[1:]), dict(kwargs))

        return hook

    def stop(_module, _args, _output):
        raise _Stop

    handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True)
               for i, layer in enumerate(arch.layers)]
    handles.append(arch.layers[-1].register_forward_hook(stop))
    try:
        yield
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()


def _identity(hidden, *_args, **_kwargs):
    return hidden


@torch.no_grad()
def record_calls(arch: Architecture, batch: Batch, kind: str, base: nn.Module,
                 params: dict[str, torch.Tensor]) -> BatchState:
    """The hidden state entering layer 0 (in `hidden[0]`) and every layer's call arguments.

    No layer runs: each layer's forward is the identity for this pass (the arguments a model
    passes its layers are computed before its layer loop and do not depend on their outputs). The
    base model runs with `params` substituted (torch.func.functional_call), so the embedding
    tables can come from `WeightFiles` rather than the model's own resident copies.
    """
    state = BatchState(batch, [None] * arch.n_layers, [None] * arch.n_layers)
    saved = [layer.__dict__.get("forward") for layer in arch.layers]  # e.g. accelerate's
    for layer in arch.layers:
        layer.forward = _identity  # an instance attribute: the class's forward is untouched
    try:
        with _recording(arch, state, {0: False}):
            torch.func.functional_call(base, params, (), model_inputs(batch, kind))
    finally:
        for layer, forward in zip(arch.layers, saved, strict=True):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
    if state.hidden[0] is None or any(call is None for call in state.calls):
        raise RuntimeError("record_calls: the model did not call every layer")
    return state


@torch.no_grad()
def frozen_prefix(arch: Architecture, states: list[BatchState], stop: int,
                  layer_params: Callable[[int], dict[str, torch.Tensor]]) -> None:
    """Advance every state's `hidden[0]` to `hidden[stop]` through layers [0, stop), layer-major.

    `layer_params(i)` gives layer i's parameters; they are dropped before layer i + 1 is read,
    and each batch's previous hidden state as soon as its next one exists.
    """
    for i in range(stop):
        params = layer_params(i)
        for state in states:
            call = state.calls[i]
            out = torch.func.functional_call(arch.layers[i], params,
                                             (state.hidden[i], *call.args), call.kwargs)
            state.hidden[i + 1] = out[0] if isinstance(out, tuple) else out
            state.hidden[i] = None
        del params


@contextmanager
def layers_from(arch: Architecture, stop: int,
                layer_params: Callable[[int], dict[str, torch.Tensor]]) -> Iterator[None]:
    """While open, layers [0, stop) run on `layer_params(i)` instead of their own parameters,
    read as layer i starts and dropped as it ends: the model's own full forward with at most one
    of those layers resident (the self-check's, workers/selfcheck.py)."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []

    def restore(*_ignored) -> None:
        while swapped:
            module, leaf, own = swapped.pop()
            module._parameters[leaf] = own

    def swap_in(index):
        def hook(layer, _args):
            restore()
            for name, tensor in layer_params(index).items():
                owner, _, leaf = name.rpartition(".")
                module = layer.get_submodule(owner)
                swapped.append((module, leaf, module._parameters[leaf]))
                module._parameters[leaf] = tensor

        return hook

    handles = []
    for i in range(stop):
        handles.append(arch.layers[i].register_forward_pre_hook(swap_in(i)))
        handles.append(arch.layers[i].register_forward_hook(restore))
    try:
        yield
    finally:
        restore()
        for handle in handles:
            handle.remove()


@torch.no_grad()
def module_input(arch: Architecture, state: BatchState, layer: int,
                 module: nn.Module) -> torch.Tensor:
    """What `module` (inside `layer`) receives when `layer` runs on `state.hidden[layer]`; the
    rest of the layer is skipped."""
    seen: list[torch.Tensor] = []

    def hook(_module, args):
        seen.append(args[0])
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        run_layers(arch, state, layer, layer + 1, state.hidden[layer])
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"module_input: layer {layer} did not call the module")
    return seen[0]


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
