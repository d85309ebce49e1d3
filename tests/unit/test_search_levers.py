"""The search knobs of docs/study.md on tiny random-weight models: word lists per class and the
B-only / A-only parametrisations (the schedule's select/recenter are in test_schedule.py)."""

import numpy as np
import pytest
import tiny
import torch

from common.config import RunConfig
from common.errors import ConfigError
from workers import fastpath
from workers.reference import reference_losses
from workers.worker import EvalWorker

LISTS = [["bad", "terrible", "dull"], ["great", "good", "brilliant"]]


def make_worker(family, task=None, adapter=None):
    cfg = {"task": {"template": "{text} it was {mask} ." if family in tiny.MASKED
                    else "{text} it was", "label_words": ["bad", "great"], "k": 4, **(task or {})},
           "adapter": adapter or {},
           "eval": {"batch_size": 3, "train_batch_size": 3, "max_stack_tokens": 100}}
    return EvalWorker(RunConfig.from_dict(cfg), loaded=tiny.model(family), splits=tiny.splits())


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_word_lists_average_the_words_logits(family):
    worker = make_worker(family, task={"label_words": LISTS})
    tok = worker.prompter.tokenizer
    assert [list(g) for g in worker.prompter.label_ids] == [
        tok.convert_tokens_to_ids(words) for words in LISTS]
    single = make_worker(family)  # same model, one word per class
    batch = worker.batches["dev"][0]
    inputs = fastpath.model_inputs(batch, worker.kind)
    with torch.no_grad():
        full = worker.model(**inputs).logits
        scored = fastpath.gather_positions(full, batch.positions)
    ids = [tok.convert_tokens_to_ids(words) for words in LISTS]
    expect = torch.stack([scored[:, i].mean(-1) for i in ids], -1)
    torch.testing.assert_close(worker.logits(batch), expect, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(single.logits(batch), worker.logits(batch))
    # the fast path's population losses equal the plain full-vocabulary reference
    z = np.random.default_rng(0).standard_normal((3, worker.dim))
    np.testing.assert_allclose(worker.evaluate(worker.n_layers - 1, z).losses,
                               reference_losses(worker, worker.n_layers - 1, z), rtol=1e-4)


def test_word_lists_mixed_with_single_words_and_bad_lists():
    cfg = RunConfig.from_dict({"task": {"label_words": [["bad", "terrible"], "great"]}})
    assert cfg.task.label_words == (("bad", "terrible"), "great")
    assert RunConfig.from_dict(cfg.to_dict()) == cfg  # config.yaml round trip
    with pytest.raises(ConfigError, match=r"task.label_words\[0\]\[1\] must be str, got 2"):
        RunConfig.from_dict({"task": {"label_words": [["bad", 2], "great"]}})
    with pytest.raises(ConfigError, match="map to the same token"):
        make_worker("llama", task={"label_words": [["bad", "great"], ["great"]]})


@pytest.mark.parametrize("param", ["b", "a"])
def test_one_factor_parametrisations_are_linear_in_z(param):
    worker = make_worker("llama", adapter={"param": param})
    layer, proj = 1, worker.projector
    z = torch.from_numpy(np.random.default_rng(1).standard_normal((2, worker.dim)))
    zero = proj.factors(layer, torch.zeros(1, worker.dim))
    fixed, searched = ((0, 2), (1, 3)) if param == "b" else ((1, 3), (0, 2))
    assert all(zero[c].abs().sum() == 0 for c in searched)  # the delta is 0 at z = 0
    assert all(zero[c].abs().sum() > 0 for c in fixed)
    both, one, two = proj.factors(layer, z.sum(0, keepdim=True)), *(
        proj.factors(layer, z[i:i + 1]) for i in range(2))
    for c in searched:  # linear: f(z1 + z2) = f(z1) + f(z2)
        torch.testing.assert_close(both[c], one[c] + two[c], rtol=1e-4, atol=1e-6)
    for c in fixed:
        assert torch.equal(one[c], two[c])
    # a typical candidate's factor entries have the spread of the `ab` parametrisation's
    ab = make_worker("llama").projector
    big = torch.from_numpy(np.random.default_rng(2).standard_normal((64, worker.dim)))
    for c in range(4):
        ratio = float(proj.factors(layer, big)[c].std() / ab.factors(layer, big)[c].std())
        assert 0.8 < ratio < 1.25, (c, ratio)


def test_one_factor_parametrisation_scores_like_the_reference():
    worker = make_worker("gpt2", adapter={"param": "b"})
    z = np.random.default_rng(0).standard_normal((3, worker.dim))
    np.testing.assert_allclose(worker.evaluate(1, z).losses, reference_losses(worker, 1, z),
                               rtol=1e-4)
    # z = 0 is the unadapted model: its loss is the zero adapter's training loss
    assert worker.evaluate(1, np.zeros((1, worker.dim))).losses[0] == pytest.approx(
        worker.score("train")["loss"], rel=1e-5)


@pytest.mark.parametrize("basis", ["input-pca", "input-energy"])
def test_data_basis_puts_a_in_the_inputs_principal_subspace(basis):
    worker = make_worker("llama", adapter={"basis": basis, "basis_rank": 3})
    plain = make_worker("llama")
    layer, proj = 1, worker.projector
    P = torch.tensor(worker.stats.bases[layer])  # (p, in), orthonormal rows
    assert P.shape == (3, proj.shapes[layer].q_in)
    torch.testing.assert_close(P @ P.T, torch.eye(3), rtol=0, atol=1e-5)
    z = torch.from_numpy(np.random.default_rng(3).standard_normal((64, worker.dim)))
    ours, random = proj.factors(layer, z), plain.projector.factors(layer, z)
    for c in (0, 2):  # A_Q and A_K: every column lies in P's span; the spread is kept
        residual = ours[c] - P.T @ (P @ ours[c])
        assert float(residual.abs().max()) < 1e-4 * float(ours[c].abs().max())
        assert 0.7 < float(ours[c].std() / random[c].std()) < 1.4
    for c in (1, 3):  # B_Q and B_K keep the random maps
        assert torch.equal(ours[c], random[c])
    if basis == "input-energy":  # ||x A|| per ||A|| on the training inputs beats random A's
        module = worker.arch.sites[layer][0].module
        x = torch.cat([fastpath.module_input(worker.arch, s, layer, module)[
            s.batch.attention_mask.bool()].float() for s in worker.states])

        def gain(a):
            return float((x @ a).norm() / a.norm())
        assert gain(ours[0][0]) > 1.5 * gain(random[0][0])
    # scores agree with the plain full-forward reference
    zz = np.random.default_rng(0).standard_normal((2, worker.dim))
    np.testing.assert_allclose(worker.evaluate(layer, zz).losses,
                               reference_losses(worker, layer, zz), rtol=1e-4)
    # a second worker given the first one's statistics holds bit-identical maps
    again = EvalWorker(worker.cfg, stats=worker.calibration_stats(), loaded=tiny.model("llama"),
                       splits=tiny.splits())
    assert all(torch.equal(a, b) for a, b in zip(again.projector.maps(layer), proj.maps(layer),
                                                  strict=True))


def test_principal_directions_find_the_dominant_axis():
    from workers.projection import principal_directions

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((500, 6)) * [5, 1, 1, 1, 1, 0.1] + [0, 0, 9, 0, 0, 0])
    centred = torch.tensor(principal_directions(x, 2, centred=True))
    energy = torch.tensor(principal_directions(x, 1, centred=False))
    assert centred[0].abs().argmax() == 0 and centred[0].max() > 0.99  # the widest spread
    assert energy[0].abs().argmax() == 2  # the mean dominates the uncentred second moment


def test_basis_settings_are_checked():
    with pytest.raises(ConfigError, match="adapter.basis_rank must be > 0"):
        RunConfig.from_dict({"adapter": {"basis": "input-pca", "basis_rank": 0}})
    with pytest.raises(ConfigError, match="adapter.basis"):
        RunConfig.from_dict({"adapter": {"basis": "pca"}})


def test_cma_diagonal_runs_separable_cma_es_and_survives_a_checkpoint():
    from orchestrator.methods import optimizer_options
    from orchestrator.optimizers.registry import make_optimizer, restore_optimizer
    from orchestrator.validation import validate_run

    cfg = RunConfig.from_dict({"optimizer": {"cma_diagonal": True, "popsize": 6},
                               "adapter": {"dim": 12}})
    validate_run(cfg)
    options = optimizer_options(cfg, "cma", 1)
    assert options["cma_options"] == {"CMA_diagonal": True}
    opt = make_optimizer("cma", 12, seed=3, **options)
    for _ in range(20):  # an ill-conditioned quadratic: the variances adapt per coordinate
        x = opt.ask(6)
        opt.tell(x, ((x - 1) ** 2 * np.arange(1, 13)).sum(1))
    assert opt._es.opts["CMA_diagonal"] is True
    scaling = np.asarray(opt._es.sigma_vec.scaling) * np.ones(12)
    assert scaling.std() > 0.05  # pycma keeps the learnt variances in its diagonal decoding
    twin = restore_optimizer(opt.state_dict())
    np.testing.assert_array_equal(twin.ask(6), opt.ask(6))
    plain = RunConfig.from_dict({"optimizer": {"popsize": 6}, "adapter": {"dim": 12}})
    assert "cma_options" not in optimizer_options(plain, "cma", 1)
    with pytest.raises(ConfigError, match="cma_diagonal applies to cma only"):
        validate_run(cfg.replace(**{"schedule.optimizers": ("fwa",)}))
