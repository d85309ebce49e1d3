"""loss* is the committed model's own loss (eval.rescore_commits), and an out-of-memory halving of
the stack size is kept in the checkpoint (docs/design.md §8, §9).

On CPU with tiny models: bf16 matmuls exist here, and candidates scored unmerged (`Wx + (xA)B`)
already round apart from the merged model (`(W + AB)x`) in bf16, so the mechanism is tested
for real; tests/gpu/ repeats the numerics on a CUDA device.
"""

import json
from dataclasses import replace

import numpy as np
import pytest
import tiny
import torch
from harness import run
from layered import LayeredQuadratic

from common.config import RunConfig
from orchestrator.evaluation import EvaluatorInfo
from orchestrator.evaluation.local import LocalEvaluator
from workers.scoring import example_losses
from workers.worker import EvalWorker, rescores_commits

TINY = {"task": {"template": "{text} it was", "label_words": ["bad", "great"], "k": 4},
        "eval": {"batch_size": 3, "train_batch_size": 3, "max_stack_tokens": 100},
        "adapter": {"dim": 16}, "optimizer": {"popsize": 4, "sigma0": 1.0}, "budget": 40}
TIMING = {"seconds", "wall_seconds", "candidates_per_s", "candidates_per_s_per_actor"}


@pytest.fixture(autouse=True)
def _quiet():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on a shared 2-core box
    yield
    torch.set_num_threads(threads)


def loaded(family="gpt2", dtype=torch.bfloat16):
    lm = tiny.model(family)
    lm.model.to(dtype)
    return lm


def worker(family="gpt2", dtype=torch.bfloat16, **overrides) -> EvalWorker:
    cfg = RunConfig.from_dict(TINY).replace(**overrides)
    return EvalWorker(cfg, loaded=loaded(family, dtype), splits=tiny.splits())


def full_forward_loss(w: EvalWorker) -> float:
    """The committed model's own forward on every training batch, losses added as evaluate
    adds them."""
    total, n = 0.0, 0
    for batch in w.batches["train"]:
        losses = example_losses(w.logits(batch), batch.labels, w.cfg.eval.loss)
        total += float(losses.sum(-1).double())
        n += batch.labels.shape[0]
    return total / n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_committed_loss_is_the_merged_models_own_forward_bit_for_bit(family, dtype):
    w = worker(family, dtype)
    rng = np.random.default_rng(0)
    for layer in (0, 1):
        w.commit(layer, rng.standard_normal(w.dim))
    own = full_forward_loss(w)
    assert all(w.committed_loss(layer).losses[0] == own for layer in range(w.n_layers))
    # a zero candidate adds exactly nothing: at a layer whose committed vector is zero the fast
    # path scores the committed model itself
    w.commit(2, np.zeros(w.dim))
    assert w.evaluate(2, np.zeros((1, w.dim))).losses[0] == own


def test_in_bf16_a_candidates_score_is_not_its_merged_models():
    """Why rescoring exists: the same vector, scored unmerged and merged, rounds apart."""
    w = worker("gpt2")
    z = np.random.default_rng(0).standard_normal((1, w.dim))
    unmerged = w.evaluate(1, z).losses[0]
    w.commit(1, z[0])
    merged = w.committed_loss(1).losses[0]
    assert merged != unmerged and abs(merged - unmerged) < 1e-2


def test_rescoring_is_on_in_half_precision_only_by_default():
    assert not rescores_commits("auto", torch.float32)
    assert rescores_commits("auto", torch.bfloat16) and rescores_commits("auto", torch.float16)
    assert rescores_commits("on", torch.float32) and not rescores_commits("off", torch.bfloat16)
    assert RunConfig().eval.rescore_commits == "auto"


def untimed(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_bf16_run_records_the_committed_models_loss_and_resumes_identically(tmp_path):
    cfg = RunConfig.from_dict(TINY)
    ev = LocalEvaluator(cfg, loaded=loaded(), splits=tiny.splits())
    assert ev.info.rescores_commits
    full = run(cfg, tmp_path / "full", evaluator=ev)
    accepted = [r for r in full.metrics if r["accepted"]]
    assert accepted and all(r["loss_star"] == r["committed_loss"] for r in accepted)
    stars = [full.zero_shot["train_loss"]] + [r["loss_star"] for r in full.metrics]
    assert all(b <= a for a, b in zip(stars, stars[1:], strict=False))  # never increases
    for layer, z in full.vectors.items():  # the search's last state, merged
        ev.commit(layer, z)
    assert full_forward_loss(ev.worker) == stars[-1]
    part = tmp_path / "part"
    run(cfg, part, evaluator=LocalEvaluator(cfg, loaded=loaded(), splits=tiny.splits()),
        stop_after=4)
    resumed = run(None, part, evaluator=LocalEvaluator(cfg, loaded=loaded(),
                                                       splits=tiny.splits()), resume=True)
    assert untimed(resumed.metrics) == untimed(full.metrics)
    assert resumed.final == full.final


def test_fp32_runs_do_not_rescore(tmp_path):
    cfg = RunConfig.from_dict(TINY)
    ev = LocalEvaluator(cfg, loaded=loaded(dtype=torch.float32), splits=tiny.splits())
    assert not ev.info.rescores_commits
    result = run(cfg, tmp_path, evaluator=ev)
    assert any(r["accepted"] for r in result.metrics)
    assert not any("committed_loss" in r for r in result.metrics)


class Rounding(LayeredQuadratic):
    """The synthetic objective whose committed state, once anything is installed, scores
    `offset` above what its candidates scored."""

    def __init__(self, offset: float) -> None:
        super().__init__()
        self.offset, self.commits = offset, []

    @property
    def info(self) -> EvaluatorInfo:
        return replace(super().info, rescores_commits=True)

    def committed_loss(self, layer: int) -> float:
        offset = self.offset if self.z.any() else 0.0
        return float(self._loss(self.z.reshape(1, -1), "train")[0]) + offset

    def commit(self, layer, z):
        self.commits.append((layer, np.array(z)))
        super().commit(layer, z)


@pytest.mark.parametrize("accept", ["elitist", "mean", "xbest"])
def test_an_install_whose_own_loss_does_not_beat_loss_star_is_undone(tmp_path, accept):
    cfg = RunConfig.from_dict({"seed": 5, "budget": 60, "adapter": {"dim": 8},
                               "optimizer": {"popsize": 6, "sigma0": 0.5},
                               "schedule": {"accept": accept}})
    ev = Rounding(offset=1e9)  # no committed state ever beats the zero adapter's loss*
    result = run(cfg, tmp_path, evaluator=ev)
    installs = [r for r in result.metrics if "committed_loss" in r]
    assert installs
    if accept == "xbest":  # installs regardless; loss* is the committed state's own
        assert all(r["loss_star"] == r["committed_loss"] for r in installs)
        return
    assert all(r["undone"] and not r["accepted"] for r in installs)
    assert all(r["loss_star"] == result.zero_shot["train_loss"] for r in result.metrics)
    assert all(not v.any() for v in result.vectors.values())
    assert np.array_equal(ev.z, np.zeros_like(ev.z))  # every undo was committed back


def test_an_out_of_memory_halving_is_checkpointed_and_reapplied_on_resume(tmp_path,
                                                                           monkeypatch):
    cfg = RunConfig.from_dict(TINY)
    real = EvalWorker._stacked
    tight = {"on": True}

    def stacked(self, layer, state, z):  # the existing fault injection (test_robustness.py)
        if tight["on"] and z.shape[0] > 2:
            raise torch.OutOfMemoryError("simulated")
        return real(self, layer, state, z)

    monkeypatch.setattr(EvalWorker, "_stacked", stacked)

    def evaluator():  # llama: its fp32 losses depend on the stack size, gpt2's do not here
        return LocalEvaluator(cfg, loaded=loaded("llama", torch.float32), splits=tiny.splits())

    full = run(cfg, tmp_path / "full", evaluator=evaluator())
    part = tmp_path / "part"
    run(cfg, part, evaluator=evaluator(), stop_after=2)
    latest = int((part / "checkpoints" / "LATEST").read_text())
    stored = json.loads((part / "checkpoints" / f"ckpt-{latest:06d}.json").read_text())
    assert stored["setup"]["stack_cap"] == 2
    tight["on"] = False  # the resumed session would not run out of memory by itself
    ev = evaluator()
    assert ev.diagnostics().stack_cap is None
    resumed = run(None, part, evaluator=ev, resume=True)
    assert ev.diagnostics().stack_cap == 2
    assert untimed(resumed.metrics) == untimed(full.metrics)
    assert resumed.final == full.final


def test_the_actor_shell_reports_and_applies_both():
    """What RayEvaluator calls (workers/actor.py), without starting Ray."""
    from workers.actor import ActorShell

    shell = ActorShell(RunConfig.from_dict(TINY).to_dict(), loaded=loaded(),
                       splits=tiny.splits())
    assert shell.info()["rescore"] and shell.diagnostics().stack_cap is None
    shell.limit_stack(3)
    assert shell.diagnostics().stack_cap == 3 == shell.worker._stack_cap
    shell.commit(1, np.ones(16))
    assert shell.committed_loss(1) == full_forward_loss(shell.worker)
