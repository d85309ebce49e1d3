"""PEFT export: the adapter files load with PEFT and give the worker's own predictions."""

import json

import numpy as np
import pytest
import tiny
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
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
        ev.commit(layer, scale * rng.standard_normal(ev.info.dim))
    return ev


@pytest.mark.parametrize("family", tiny.FAMILIES + tiny.MORE)
def test_peft_adapter_reproduces_the_workers_predictions(tmp_path, family):
    ev = committed_evaluator(family)
    ours, _ = ev.worker.predict("test")
    tensors, config = ev.adapter()
    folder = RunFolder(tmp_path).write_adapter(tensors, config)
    stored = json.loads((folder / "adapter_config.json").read_text())
    assert stored["r"] == (8 if family in tiny.FUSED else 4)  # fused q/k/v: rank 2r
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


@pytest.mark.parametrize("family", tiny.FAMILIES + tiny.MORE)
def test_merged_export_matches(tmp_path, family, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    ev = committed_evaluator(family)
    ours, _ = ev.worker.predict("test")
    (tmp_path / "run").mkdir()
    adapter = RunFolder(tmp_path / "run").write_adapter(*ev.adapter())
    monkeypatch.setattr("workers.models.load", lambda cfg: tiny.model(family))
    merge(ev.worker.cfg, adapter, tmp_path / "merged")
    auto = AutoModelForMaskedLM if family in tiny.MASKED else AutoModelForCausalLM
    merged = auto.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(label_logits(merged, ev.worker), ours, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", tiny.FUSED)
def test_fused_export_leaves_v_untouched(tmp_path, family):
    """PEFT's LoRA on a fused q/k/v module covers all of its output features: the exported
    delta is ours on q's and k's features and exactly zero on v's."""
    ev = committed_evaluator(family)
    folder = RunFolder(tmp_path).write_adapter(*ev.adapter())
    peft = PeftModel.from_pretrained(tiny.model(family).model, str(folder)).eval()
    lora = {name: m for name, m in peft.named_modules() if isinstance(m, LoraLayer)}
    for layer in (0, 2):
        q, k = ev.worker.arch.sites[layer]
        (name,) = [n for n in lora if n.endswith(f".{layer}.{'.'.join(_tail(ev, q))}")]
        delta = lora[name].get_delta_weight("default")  # (out, in) for Linear, (in, out) Conv1D
        width = q.module.weight.shape[1 if q.transposed else 0]
        delta = delta.T if q.transposed else delta
        assert delta.shape[0] == width  # the whole fused module
        a_q, b_q, a_k, b_k = (f[0] for f in ev.worker.projector.factors(
            layer, torch.from_numpy(ev.worker.committed[layer][None])))
        qk = torch.zeros(width, dtype=torch.bool)
        for proj, a, b in ((q, a_q, b_q), (k, a_k, b_k)):
            qk[proj.cols] = True
            torch.testing.assert_close(delta[proj.cols], (a @ b).T.float(), rtol=1e-5, atol=1e-6)
        assert int((~qk).sum()) > 0 and torch.equal(delta[~qk], torch.zeros_like(delta[~qk]))


def _tail(ev, proj) -> list[str]:
    """The path of `proj`'s module below its layer (e.g. ['self_attn', 'qkv_proj'])."""
    names = {id(m): n for n, m in ev.worker.model.named_modules()}
    return names[id(proj.module)].split(".")[-2:]
