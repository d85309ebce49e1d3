"""The q and k features adapters.py finds in fused q/k/v projections are q's and k's, and only
theirs, as the model's own attention reads them (docs/design.md §1).

Two properties of attention that need no knowledge of the layout:

* with one token, attention weights are all 1 whatever q and k are: changing the q and k
  features leaves the output alone, while changing any other feature (v's) moves it;
* attention reads q and k only through q·k (rotary embeddings are linear): doubling the q
  features and halving the k features leaves the output alone, doubling q alone does not.
"""

import pytest
import tiny
import torch
from transformers import AutoModelForCausalLM

from workers.adapters import Projection, architecture

# Falcon's other two layouts: Falcon-7B's multi-query and the original one (per head q, k, v)
VARIANTS = {"falcon-7b": dict(new_decoder_architecture=False, multi_query=True),
            "falcon-rw": dict(new_decoder_architecture=False, multi_query=False, num_kv_heads=4)}


def fused_model(name: str):
    family = "falcon" if name in VARIANTS else name
    cfg = tiny.config(family, 2, len(tiny.tokenizer()))
    for key, value in VARIANTS.get(name, {}).items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False)
    for p in model.parameters():  # biases too, so that they are checked as well
        p.copy_(torch.randn_like(p) * 0.2)
    return model


def scale(proj: Projection, factor: float) -> None:
    module = proj.module
    proj.write(module.weight, proj.weight_view(module.weight) * factor)
    if getattr(module, "bias", None) is not None:
        module.bias[proj.cols] *= factor


def logits(model, ids) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids]), use_cache=False).logits


@pytest.mark.parametrize("name", tiny.FUSED + tuple(VARIANTS))
def test_one_token_reads_v_features_only(name):
    model = fused_model(name)
    q, k = architecture(model).sites[1]
    assert q.module is k.module
    before = logits(model, [7])
    scale(q, 3.0)
    scale(k, -2.0)
    torch.testing.assert_close(logits(model, [7]), before, rtol=1e-6, atol=1e-6)
    weight = q.module.weight
    width = weight.shape[1 if q.transposed else 0]
    qk = torch.zeros(width, dtype=torch.bool)
    qk[q.cols] = True
    qk[k.cols] = True
    assert int(qk.sum()) == q.out_features + k.out_features
    for feature in torch.nonzero(~qk).flatten().tolist():  # every other feature is read
        column = weight[:, feature] if q.transposed else weight[feature]
        saved = column.clone()
        column += 1.0
        assert (logits(model, [7]) - before).abs().max() > 1e-4, feature
        column.copy_(saved)


@pytest.mark.parametrize("name", tiny.FUSED + tuple(VARIANTS))
def test_attention_reads_q_and_k_through_their_product(name):
    model = fused_model(name)
    q, k = architecture(model).sites[1]
    ids = [5, 9, 12, 7, 20, 6]
    before = logits(model, ids)
    scale(q, 2.0)
    scale(k, 0.5)
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)
    scale(k, 2.0)  # q doubled alone
    assert (logits(model, ids) - before).abs().max() > 1e-4
