"""The model's own output path, restricted to the label words (docs/design.md §7, "output path").

Whatever a model does between its base model's last hidden state and its logits (a prediction
head's dense + activation + norm, ELECTRA's generator head, Gemma's final-logit soft-capping,
Cohere's `logit_scale`, Granite's `logits_scaling`, ...) lives in its top-level `forward`, after
the call to its base model. `LabelHead` runs that very forward, on a shallow copy of the model in
which

* the base model is a stand-in that returns the hidden state it is given, and
* the output embedding (`get_output_embeddings()`, wherever it sits) is a Linear holding only the
  label words' rows,

so every transform and post-processing the model applies is applied, by the model's own code,
to the label words' logits only. That is exact when the post-processing acts on each vocabulary
entry alone (true of every family above); a head that mixes entries would be wrong, and the
worker's start-up self-check (workers/selfcheck.py) refuses it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast

from common.errors import ModelError


class _Output(BaseModelOutputWithPast):
    """The stand-in's output: the hidden state, and None for any other field a forward reads
    (`cross_attentions`, `pooler_output`, ...)."""

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return None


class _Given(nn.Module):
    """Stands in for the base model: returns `hidden` (set before each call) as its output.

    It also stands in for the pretrained models inside the base model (`aliases`): OPT's forward
    calls `self.model.decoder` rather than `self.model`."""

    def __init__(self):
        super().__init__()
        self.hidden: torch.Tensor | None = None
        self.aliases: frozenset[str] = frozenset()

    def __getattr__(self, name: str):
        if name in self.__dict__.get("aliases", ()):
            return self
        return super().__getattr__(name)

    def forward(self, *_args, **_kwargs) -> _Output:
        return _Output(last_hidden_state=self.hidden)


class LabelHead(nn.Module):
    """(N, H) hidden states after the final norm -> (N, n_labels) label logits.

    A class given a list of words gets the mean of their logits (after the model's
    post-processing, so a soft-capped model averages capped logits, as the full forward does).
    """

    def __init__(self, model: nn.Module, label_ids: list):
        super().__init__()
        words = list(dict.fromkeys(i for entry in label_ids for i in _ids(entry)))
        self.groups = [[words.index(i) for i in _ids(entry)] for entry in label_ids]
        # one word per class: the rows are the classes' own, in order (no gather, no mean)
        self.single = self.groups == [[c] for c in range(len(label_ids))]
        self.given = _Given()
        self._top = [_restricted(model, words, self.given)]  # a list: not a submodule

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.given.hidden = hidden[:, None, :]  # one position per row
        try:
            logits = self._top[0]().logits[:, 0]
        finally:
            self.given.hidden = None
        if self.single:
            return logits
        return torch.stack([logits[:, g].double().mean(-1).to(logits.dtype)
                            for g in self.groups], -1)


def _ids(entry) -> list[int]:
    return [entry] if isinstance(entry, int) else list(entry)


def _restricted(model: nn.Module, words: list[int], given: nn.Module) -> nn.Module:
    """A shallow copy of `model` whose base model is `given` and whose output embedding holds the
    rows `words` only; every other module and parameter is the model's own, shared."""
    name = type(model).__name__
    out = model.get_output_embeddings()
    base = getattr(model, "base_model", model)
    base_path = _path(model, base)
    out_path = _path(model, out) if out is not None else None
    if base is model or out_path is None or not isinstance(out, nn.Linear):
        raise ModelError(f"{name}: no base model and Linear output embedding to score label "
                         "words with (a model with a language-modelling head is needed)")
    if out_path[:len(base_path)] == base_path:
        raise ModelError(f"{name}: its output embedding is inside its base model")
    small = nn.Linear(out.in_features, len(words), bias=out.bias is not None,
                      device=out.weight.device, dtype=out.weight.dtype)
    index = torch.tensor(words, device=out.weight.device)
    small.weight = nn.Parameter(out.weight.detach()[index].clone(), requires_grad=False)
    if out.bias is not None:
        small.bias = nn.Parameter(out.bias.detach()[index].clone(), requires_grad=False)
    given.aliases = frozenset(n for n, m in base.named_children() if isinstance(m, PreTrainedModel))
    top = copy.copy(model)
    _replace(top, base_path, given)
    _replace(top, out_path, small)
    return top


def _path(root: nn.Module, module: nn.Module) -> list[str]:
    return next(name for name, m in root.named_modules() if m is module).split(".")


def _replace(root: nn.Module, path: list[str], new: nn.Module) -> None:
    """Put `new` at `path` below the shallow copy `root`, copying (shallowly) the modules on the
    way so that the original model is untouched."""
    node = root
    node._modules = dict(node._modules)
    for part in path[:-1]:
        node._modules[part] = copy.copy(node._modules[part])
        node = node._modules[part]
        node._modules = dict(node._modules)
    node._modules[path[-1]] = new


def label_rows(table: torch.Tensor, label_ids: list) -> torch.Tensor:
    """Rows of `table` (vocab, ...) per class: a word's row, or the mean row of a word list.

    Used on full-vocabulary logits (transposed) by the plain scorers (workers/reference.py,
    workers/selfcheck.py): a class's logit is the mean of its words' logits, as `LabelHead`
    gives it. Its class cross-entropy equals averaging the words' log-probabilities (BBT-RGB's
    verbalisers), since the full-vocabulary normaliser is shared by every class.
    """
    rows = []
    for entry in label_ids:
        ids = torch.tensor(_ids(entry), device=table.device)
        rows.append(table[ids].double().mean(0).to(table.dtype) if len(ids) > 1 else table[ids[0]])
    return torch.stack(rows).clone()
