"""The model's own output path and the start-up self-check (docs/design.md §7) on tiny models."""

import numpy as np
import pytest
import tiny
import torch
from test_worker_families import config, make_worker, population
from transformers import LlamaForCausalLM

from common.errors import ModelError
from workers.head import LabelHead
from workers.models import LoadedModel, prepare
from workers.reference import reference_losses
from workers.worker import EvalWorker


@pytest.mark.parametrize("family", tiny.FAMILIES + tiny.MORE)
def test_fast_path_equals_the_models_own_forward(family):
    worker = make_worker(family)
    assert worker.self_check.error < 1e-5  # it ran, and passed by far
    for layer in (0, worker.n_layers - 1):
        z = population(3, seed=layer)
        np.testing.assert_allclose(worker.evaluate(layer, z).losses,
                                   reference_losses(worker, layer, z), rtol=1e-5)


def old_head(model, label_ids):
    """The label-only head before issue 13: the output embedding's label rows alone."""
    out = model.get_output_embeddings()
    rows, bias = out.weight[label_ids], out.bias[label_ids] if out.bias is not None else 0
    return lambda hidden: hidden @ rows.T + bias


@pytest.mark.parametrize("family", ["electra", "gemma2", "gemma3"])
def test_the_head_applies_what_the_model_applies_after_its_base(family):
    model = tiny.model(family).model
    ids = [9, 11, 30]
    hidden = torch.randn(5, 32)
    with torch.no_grad():
        if family == "electra":  # the generator's dense + gelu + LayerNorm come first
            full = model.generator_lm_head(model.generator_predictions(hidden))
        else:  # final-logit soft-capping
            full = torch.tanh(model.lm_head(hidden) / tiny.SOFTCAP) * tiny.SOFTCAP
        torch.testing.assert_close(LabelHead(model, ids)(hidden), full[:, ids])
        assert (old_head(model, ids)(hidden) - full[:, ids]).abs().max() > 1e-2


def test_word_lists_average_the_capped_logits():
    model = tiny.model("gemma2").model
    hidden = torch.randn(4, 32)
    with torch.no_grad():
        full = torch.tanh(model.lm_head(hidden) / tiny.SOFTCAP) * tiny.SOFTCAP
        got = LabelHead(model, [[9, 12], 11])(hidden)
    torch.testing.assert_close(got, torch.stack([full[:, [9, 12]].mean(-1), full[:, 11]], -1))


class Rescaled(LlamaForCausalLM):
    """A model whose forward multiplies its logits by a constant (Cohere, Granite do so)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 3.0
        return out


class VocabNormed(LlamaForCausalLM):
    """A model whose forward rescales each row of logits by its norm over the vocabulary: a
    label-only head cannot reproduce that."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits / out.logits.norm(dim=-1, keepdim=True)
        return out


def subclassed(cls) -> LoadedModel:
    plain = tiny.model("llama")
    net = cls(plain.model.config)
    net.load_state_dict(plain.model.state_dict())
    return LoadedModel(prepare(net, plain.device), plain.tokenizer, plain.kind, plain.device)


def test_a_head_that_rescales_logits_is_followed():
    worker = EvalWorker(config("llama"), loaded=subclassed(Rescaled), splits=tiny.splits())
    z = population(3)
    np.testing.assert_allclose(worker.evaluate(1, z).losses, reference_losses(worker, 1, z),
                               rtol=1e-5)
    plain = make_worker("llama")
    assert not np.allclose(worker.evaluate(1, z).losses, plain.evaluate(1, z).losses)


def test_self_check_refuses_a_head_the_fast_path_gets_wrong():
    with pytest.raises(ModelError) as err:
        EvalWorker(config("llama"), loaded=subclassed(VocabNormed), splits=tiny.splits())
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("model type 'llama' (VocabNormed) failed the start-up self-check")


@pytest.mark.parametrize("family", ["electra", "gemma2"])
def test_self_check_refuses_the_old_label_head(family, monkeypatch):
    """The bug of issue 13: a head without ELECTRA's prediction head or Gemma's soft-capping."""
    monkeypatch.setattr("workers.scorer.LabelHead", old_head)  # where EvalWorker builds it
    with pytest.raises(ModelError, match=f"model type '{family}'.*self-check"):
        make_worker(family)


def test_self_check_of_a_frozen_prefix_worker_leaves_the_models_own_weights(tmp_path):
    loaded = tiny.model("llama", layers=4)
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    worker = EvalWorker(config("llama", **{"model.name": str(tmp_path), "schedule.layers": [3]}),
                        splits=tiny.splits())
    assert worker._files is not None and worker._files.fallbacks == []
    assert worker.self_check.error < 1e-5
    assert all(isinstance(p, torch.nn.Parameter) for p in worker.model.parameters())
