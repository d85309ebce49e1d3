"""bf16 on a CUDA device: stacking, merging, loss* = the committed model's own loss, and a real
out-of-memory halving (docs/design.md §7-§9). Skipped without CUDA; run them with

    .venv/bin/python -m pytest tests/gpu -m gpu -s

(-s prints the measured differences; docs/benchmarks.md records the results).
"""

import numpy as np
import pytest
import tiny
import torch
from harness import run
from transformers import AutoModelForCausalLM, LlamaConfig

from common.config import RunConfig
from orchestrator.evaluation.local import LocalEvaluator
from workers.models import LoadedModel, prepare
from workers.scoring import example_losses
from workers.worker import EvalWorker

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")
TINY = {"model": {"device": "cuda", "dtype": "bfloat16"},
        "task": {"template": "{text} it was", "label_words": ["bad", "great"], "k": 4},
        "eval": {"batch_size": 3, "train_batch_size": 3, "max_stack_tokens": 100000},
        "adapter": {"dim": 16}, "optimizer": {"popsize": 8, "sigma0": 1.0}, "budget": 64}


def on_cuda(family: str = "gpt2") -> LoadedModel:
    lm = tiny.model(family)
    return LoadedModel(prepare(lm.model.to(torch.bfloat16), CUDA), lm.tokenizer, lm.kind, CUDA)


def wide_llama(layers: int = 4) -> LoadedModel:
    """Random weights at a real model's width (hidden 1024), the tiny tokenizer."""
    torch.manual_seed(0)
    tok = tiny.tokenizer()
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=4, vocab_size=len(tok),
                      max_position_embeddings=64, pad_token_id=0)
    net = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    return LoadedModel(prepare(net, CUDA), tok, "causal", CUDA)


def worker(lm: LoadedModel, **overrides) -> EvalWorker:
    return EvalWorker(RunConfig.from_dict(TINY).replace(**overrides), loaded=lm,
                      splits=tiny.splits())


def full_forward_loss(w: EvalWorker) -> float:
    total, n = 0.0, 0
    for batch in w.batches["train"]:
        losses = example_losses(w.logits(batch), batch.labels, w.cfg.eval.loss)
        total += float(losses.sum(-1).double())
        n += batch.labels.shape[0]
    return total / n


@pytest.mark.parametrize("make", [on_cuda, wide_llama], ids=["gpt2", "wide-llama"])
def test_bf16_stacked_against_one_at_a_time(make):
    w = worker(make())
    z = np.random.default_rng(0).standard_normal((16, w.dim))
    stacked = w.evaluate(1, z).losses
    single = np.array([w.evaluate(1, z[i:i + 1]).losses[0] for i in range(len(z))])
    again = w.evaluate(1, z).losses
    print(f"\nstacked vs one at a time, max |diff| = {np.abs(stacked - single).max():.3g}")
    assert np.array_equal(stacked, again)  # deterministic at a fixed stack size
    np.testing.assert_allclose(stacked, single, atol=5e-2)


def test_bf16_merge_rounds_once_on_cuda():
    w = worker(on_cuda())
    z = np.random.default_rng(1).standard_normal(w.dim)
    w.commit(0, z)
    a_q, b_q, _, _ = (f[0] for f in w.projector.factors(0, torch.from_numpy(z[None])))
    q = w.arch.sites[0][0]
    expected = (w.pristine[0][0].float() + (a_q @ b_q).T).to(torch.bfloat16)
    assert torch.equal(q.weight_view(q.module.weight), expected)


@pytest.mark.parametrize("make", [on_cuda, wide_llama], ids=["gpt2", "wide-llama"])
def test_committed_loss_is_the_merged_models_own_bit_for_bit(make):
    w = worker(make())
    assert w.rescore  # auto: bf16
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, w.dim))
    unmerged = w.evaluate(1, z[:1]).losses[0]
    w.commit(0, z[1])
    w.commit(1, z[0])
    own = full_forward_loss(w)
    assert all(w.committed_loss(layer).losses[0] == own for layer in range(w.n_layers))
    print(f"\nunmerged candidate vs merged model: {abs(unmerged - own):.3g} (layer 0 moved too)")


def test_a_zero_candidate_scores_the_committed_model():
    """The fast path adds nothing for a zero vector; it also applies the final norm to the
    gathered positions only, where the full forward normalises every position: equal on CPU
    (tests/unit/test_exact_commits.py), not promised by CUDA's reduction kernels. Loss* does
    not rely on it (the driver scores the start with `committed_loss` too)."""
    w = worker(on_cuda())
    w.commit(0, np.random.default_rng(0).standard_normal(w.dim))
    assert w.evaluate(1, np.zeros((1, w.dim))).losses[0] == full_forward_loss(w)


def test_bf16_run_on_cuda_records_the_committed_models_loss(tmp_path):
    cfg = RunConfig.from_dict(TINY)
    ev = LocalEvaluator(cfg, loaded=on_cuda(), splits=tiny.splits())
    full = run(cfg, tmp_path / "full", evaluator=ev)
    accepted = [r for r in full.metrics if r["accepted"]]
    assert accepted and all(r["loss_star"] == r["committed_loss"] for r in accepted)
    for layer, vector in full.vectors.items():
        ev.commit(layer, vector)
    assert full_forward_loss(ev.worker) == full.metrics[-1]["loss_star"]
    part = tmp_path / "part"
    run(cfg, part, evaluator=LocalEvaluator(cfg, loaded=on_cuda(), splits=tiny.splits()),
        stop_after=3)
    resumed = run(None, part, resume=True,
                  evaluator=LocalEvaluator(cfg, loaded=on_cuda(), splits=tiny.splits()))
    timing = {"seconds", "wall_seconds", "candidates_per_s", "candidates_per_s_per_actor"}
    strip = [[{k: v for k, v in r.items() if k not in timing} for r in m]
             for m in (resumed.metrics, full.metrics)]
    assert strip[0] == strip[1] and resumed.final == full.final


def test_a_real_out_of_memory_error_halves_the_stack():
    w = worker(wide_llama(), **{"eval.max_stack_tokens": 10**8})
    z = np.random.default_rng(2).standard_normal((1024, w.dim))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    w.limit_stack(16)
    w.evaluate(1, z[:16])
    per16 = torch.cuda.max_memory_allocated() - base
    w._stack_cap = 1 << 30  # back to unlimited: the next pass tries all 1024 at once
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    hog = torch.empty(max(0, free - 4 * per16 - (256 << 20)), dtype=torch.uint8, device=CUDA)
    try:
        losses = w.evaluate(1, z).losses
    finally:
        del hog
        torch.cuda.empty_cache()
    cap = w.stack_cap
    print(f"\n16 candidates take {per16 / 2**20:.0f} MB; after halving the stack is {cap}")
    assert cap is not None and 1 <= cap < 1024 and np.isfinite(losses).all()
    again = worker(wide_llama(), **{"eval.max_stack_tokens": 10**8})
    again.limit_stack(cap)
    assert np.array_equal(again.evaluate(1, z).losses, losses)  # the cap, re-applied: same bits
