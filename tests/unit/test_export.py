"""PEFT export: the adapter files load with PEFT and give the worker's own predictions."""

import json

import numpy as np
import pytest
import tiny
from peft import PeftModel
from peft_check import label_logits
from safetensors.numpy import load_file

from common.config import RunConfig
from orchestrator.evaluation.local import LocalEvaluator
from orchestrator.evaluation.local import merge_adapter as merge
from orchestrator.runfolder import RunFolder

CFG = {"task": {"k": 4}, "adapter": {"dim": 16}}


def committed_evaluator(family: str, layers=(0, 2), scale=3.0):
    template = "{text} it was {mask} ." if family in tiny.MASKED else "{text} it was"
    cfg = RunConfig.from_dict({**CFG, "task": {"k": 4, "template": template,
                                               "label_words": ["bad", "great"]}})
    ev = LocalEvaluator(cfg, loaded=tiny.model(family), splits=tiny.splits())
    rng = np.random.default_rng(1)
    for layer in layers:
        ev.commit(layer, scale * rng.standard_normal(ev.dim))
    return ev


@pytest.mark.parametrize("family", tiny.FAMILIES + tiny.MORE)
def test_peft_adapter_reproduces_the_workers_predictions(tmp_path, family):
    ev = committed_evaluator(family)
    ours, _ = ev.worker.predict("test")
    tensors, config = ev.adapter()
    folder = RunFolder(tmp_path).write_adapter(tensors, config)
    stored = json.loads((folder / "adapter_config.json").read_text())
    assert stored["r"] == (8 if family == "gpt2" else 4)  # fused c_attn: rank 2r
    assert set(load_file(str(folder / "adapter_model.safetensors"))) == set(tensors)

    base = tiny.model(family).model  # a fresh, pristine copy (same seed)
    before = label_logits(base, ev.worker)
    peft = PeftModel.from_pretrained(base, str(folder)).eval()
    after = label_logits(peft, ev.worker)
    assert np.abs(before - ours).max() > 1e-4  # the adapter does change the predictions
    np.testing.assert_allclose(after, ours, rtol=1e-4, atol=1e-5)
    assert (after.argmax(-1) == ours.argmax(-1)).all()


def test_zero_vectors_export_a_no_op_adapter(tmp_path):
    ev = committed_evaluator("llama", scale=0.0)
    folder = RunFolder(tmp_path).write_adapter(*ev.adapter())
    base = tiny.model("llama").model
    plain = label_logits(base, ev.worker)
    peft = PeftModel.from_pretrained(base, str(folder)).eval()
    np.testing.assert_allclose(label_logits(peft, ev.worker), plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "roberta"])
def test_merged_export_matches(tmp_path, family, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    ev = committed_evaluator(family)
    ours, _ = ev.worker.predict("test")
    (tmp_path / "run").mkdir()
    adapter = RunFolder(tmp_path / "run").write_adapter(*ev.adapter())
    monkeypatch.setattr("workers.models.load", lambda cfg: tiny.model(family))
    merge(ev.worker.cfg, adapter, tmp_path / "merged")
    auto = AutoModelForCausalLM if family == "gpt2" else AutoModelForMaskedLM
    merged = auto.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(label_logits(merged, ev.worker), ours, rtol=1e-4, atol=1e-5)
