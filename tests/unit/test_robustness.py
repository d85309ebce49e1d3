"""Edge cases: model limits, memory pressure, unsupported models, malformed templates/configs."""

import numpy as np
import pytest
import tiny
import torch
from transformers import AutoModelForCausalLM, BloomConfig, CodeGenConfig

from common.config import RunConfig
from common.data import Example, Splits
from common.errors import ConfigError, ModelError
from common.loaders import load_splits
from workers.adapters import architecture
from workers.worker import EvalWorker


def gpt2_worker(**eval_cfg):
    cfg = RunConfig.from_dict({"model": {"max_length": 512},
                               "task": {"template": "{text} it was", "k": 4,
                                        "label_words": ["bad", "great"]},
                               "eval": {"train_batch_size": 4, **eval_cfg}})
    return cfg


def test_max_length_is_capped_by_the_models_position_table():
    long_text = " ".join(["the movie was great fun"] * 40)  # ~200 tokens > 64 positions
    base = tiny.splits()
    splits = Splits(base.train, base.dev, [Example((long_text,), 1)] + base.test)
    worker = EvalWorker(gpt2_worker(), loaded=tiny.model("gpt2"), splits=splits)
    assert worker.prompter.max_length == 64
    assert worker.score("test")["n"] == len(splits.test)


def test_out_of_memory_halves_the_stack_and_gives_the_same_losses(monkeypatch):
    worker = EvalWorker(gpt2_worker(max_stack_tokens=100000), loaded=tiny.model("gpt2"),
                        splits=tiny.splits())
    z = np.random.default_rng(0).standard_normal((8, worker.dim))
    expected = worker.evaluate(1, z).losses
    real = worker._stacked

    def tight(layer, state, chunk):
        if chunk.shape[0] > 3:
            raise torch.OutOfMemoryError("simulated")
        return real(layer, state, chunk)

    monkeypatch.setattr(worker, "_stacked", tight)
    np.testing.assert_allclose(worker.evaluate(1, z).losses, expected, rtol=1e-5)
    assert worker._stack_cap <= 3


@pytest.mark.parametrize("cfg", [
    BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=50),  # fused, not known
    CodeGenConfig(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, vocab_size=50),  # qkv_proj too
], ids=lambda cfg: cfg.model_type)
def test_unsupported_architecture_is_a_model_error(cfg):
    with pytest.raises(ModelError, match="unsupported architecture") as err:
        architecture(AutoModelForCausalLM.from_config(cfg))
    message = str(err.value)
    assert "\n" not in message and f"'{cfg.model_type}'" in message
    assert "supported: " in message and "phi3, gpt_neox and falcon" in message


def test_bf16_merge_rounds_once():
    worker = EvalWorker(gpt2_worker(), loaded=tiny.model("gpt2"), splits=tiny.splits())
    worker.model.to(torch.bfloat16)
    worker.pristine = [tuple(w.to(torch.bfloat16) for w in pair) for pair in worker.pristine]
    z = np.random.default_rng(1).standard_normal(worker.dim)
    worker.commit(0, z)
    a_q, b_q, _, _ = (f[0] for f in worker.projector.factors(0, torch.from_numpy(z[None])))
    q = worker.arch.sites[0][0]
    merged = q.weight_view(q.module.weight)
    expected = (worker.pristine[0][0].float() + (a_q @ b_q).T).to(torch.bfloat16)
    assert torch.equal(merged, expected)


@pytest.mark.parametrize("template", ["{text} it was }", "{text} it was {"])
def test_malformed_template_is_a_config_error(template):
    cfg = gpt2_worker().replace(**{"task.template": template})
    with pytest.raises(ConfigError, match="task.template"):
        EvalWorker(cfg, loaded=tiny.model("gpt2"), splits=tiny.splits())


def test_test_file_without_train_file_is_refused():
    cfg = RunConfig.from_dict({"task": {"test_file": "test.csv"}})
    with pytest.raises(ConfigError, match="need task.train_file"):
        load_splits(cfg.task, cfg.seed)
