"""The alternating per-layer state machine on a synthetic layered objective (docs/design.md §5).

Budget, layer order and subsets, alternation by round and by layer, re-centring on a method
switch, the accept rules, dev selection, the NaN policy and stopped optimisers, through the
driver with the pure-numpy evaluator of layered.py (milliseconds per run).
"""

import numpy as np
import pytest
from harness import run
from layered import LayeredQuadratic

from common.config import RunConfig
from common.seeding import derive_seed
from orchestrator.optimizers.fireworks import BareBonesFireworks
from orchestrator.schedule import Schedule

POPSIZE = 6
METHODS = ["cma", "fwa"]


def config(budget=100, **schedule) -> RunConfig:
    return RunConfig.from_dict({"seed": 3, "budget": budget, "adapter": {"dim": 8},
                                "optimizer": {"popsize": POPSIZE, "sigma0": 0.5},
                                "schedule": {"optimizers": METHODS, **schedule}})


def drive(schedule: Schedule, ev: LayeredQuadratic, check=None) -> None:
    """The driver's loop without checkpoints; `check(schedule, gen)` runs after every ask."""
    z0 = np.zeros((1, ev.dim))
    schedule.start(ev.evaluate(schedule.order[0], z0).losses[0], ev.score("dev"))
    while schedule.state.phase != "final":
        if schedule.state.phase == "dev":
            schedule.record_dev(ev.score("dev"))
            continue
        gen = schedule.ask()
        if gen is None:
            continue
        if check:
            check(schedule, gen)
        _, commit = schedule.tell(gen, ev.evaluate(gen.layer, gen.Z))
        if commit is not None:
            ev.commit(gen.layer, commit)


@pytest.mark.parametrize("layers", [None, [3, 0, 2]], ids=["all", "subset"])
@pytest.mark.parametrize("alternate", ["round", "layer"])
@pytest.mark.parametrize("accept", ["elitist", "xbest"])
def test_schedule_follows_the_specification(tmp_path, accept, alternate, layers):
    ev = LayeredQuadratic()
    true_loss = []  # the committed state's training loss after each generation

    def reporter(record):
        if record["event"] == "generation":
            true_loss.append(ev.score("train")["loss"])

    result = run(config(alternate=alternate, accept=accept, layers=layers), tmp_path,
                 evaluator=ev, reporter=reporter)
    m, order = result.metrics, layers or [0, 1, 2, 3]
    # the budget: never exceeded, and stopped only because one more generation would exceed it
    assert result.stop_reason == "budget" and result.finished
    assert result.evaluations == sum(len(r["losses"]) for r in m) == POPSIZE * len(m)
    assert result.evaluations <= 100 < result.evaluations + POPSIZE
    assert [r["evaluations"] for r in m] == [POPSIZE * (i + 1) for i in range(len(m))]
    # order and subset: layers outside the subset are never evaluated nor changed
    assert [r["layer"] for r in m] == [order[i % len(order)] for i in range(len(m))]
    assert [r["round"] for r in m] == [i // len(order) for i in range(len(m))]
    assert {c["layer"] for c in ev.calls} == set(order)
    assert all(not c["committed"][k].any() for c in ev.calls for k in set(range(4)) - set(order))
    # alternation: by round, or by layer index
    for r in m:
        assert r["method"] == METHODS[(r["round"] if alternate == "round" else r["layer"]) % 2]
    assert {r["method"] for r in m} == set(METHODS)
    # one dev evaluation per round, plus one for a round the budget cut short
    rounds = -(-len(m) // len(order))
    assert [d["round"] for d in result.dev_history] == list(range(rounds))
    stars = [result.zero_shot["train_loss"]] + [r["loss_star"] for r in m]
    if accept == "elitist":  # loss* never increases, is exact, and moves on improvements only
        assert all(b <= a for a, b in zip(stars, stars[1:], strict=False))
        np.testing.assert_allclose(stars[1:], true_loss, rtol=1e-12)
        for prev, r in zip(stars, m, strict=False):
            assert r["accepted"] == (r["best_loss"] < prev)
        assert stars[-1] < 0.8 * stars[0]
    assert any(r["accepted"] for r in m)


def test_metrics_records_carry_the_promised_fields(tmp_path):
    result = run(config(budget=30), tmp_path, evaluator=LayeredQuadratic())
    for r in result.metrics:
        assert {"round", "layer", "method", "generation", "best_loss", "median_loss", "loss_star",
                "step_size", "evaluations", "n_nonfinite", "seconds", "losses"} <= set(r)
        assert r["best_loss"] == min(r["losses"]) and r["step_size"] > 0
    assert [r["generation"] for r in result.metrics] == list(range(5))


def test_xbest_installs_the_optimisers_best_ever_vector():
    cfg, ev = config(budget=150, accept="xbest"), LayeredQuadratic()
    schedule = Schedule(cfg, ev.n_layers, ev.dim)
    seen = []

    def check(sched, gen):  # before each ask: every visited layer holds its optimiser's best
        for (layer, method), opt in sched.optimizers.items():
            if sched.state.last_method.get(layer) == method and np.isfinite(opt.best.f) \
                    and (layer, method) != (gen.layer, gen.method):
                seen.append(np.array_equal(sched.state.vectors[layer], opt.best.x))

    drive(schedule, ev, check)
    assert seen and all(seen)


def test_a_layer_switching_method_restarts_from_its_current_vector():
    # fwa and fwa-dyn evaluate their firework first after a re-centre, so the first row of the
    # population shows the centre; CMA-ES's mean is read from pycma.
    ev = LayeredQuadratic()
    visits = []
    schedule = Schedule(config(budget=200, optimizers=["fwa", "fwa-dyn"]), 4, ev.dim)
    drive(schedule, ev, lambda s, gen: visits.append(
        (gen.round, s.state.vectors[gen.layer].copy(), gen.Z[0].copy())))
    assert all(np.array_equal(v, z0) for _, v, z0 in visits)
    assert sum(r >= 1 and v.any() for r, v, _ in visits) >= 4  # non-trivial centres

    ev = LayeredQuadratic()
    means = []

    def cma_mean(s, gen):
        if gen.method == "cma" and gen.round >= 2:
            es = s.optimizers[(gen.layer, "cma")]._es
            means.append((s.state.vectors[gen.layer].copy(), np.array(es.mean)))

    drive(Schedule(config(budget=200), 4, ev.dim), ev, cma_mean)
    assert means and all(np.array_equal(v, mean) for v, mean in means)


def test_rounds_and_generations_per_visit(tmp_path):
    result = run(config(budget=1000, rounds=2, layers=[1, 0], generations_per_visit=3),
                 tmp_path, evaluator=LayeredQuadratic())
    assert result.stop_reason == "rounds"
    assert [r["layer"] for r in result.metrics] == [1, 1, 1, 0, 0, 0] * 2
    assert [d["round"] for d in result.dev_history] == [0, 1]
    assert all(d["complete"] for d in result.dev_history)


def test_dev_selection_keeps_the_best_and_the_earlier_of_ties(tmp_path):
    ev = LayeredQuadratic(dev_shift=0.1)
    result = run(config(budget=200), tmp_path / "a", evaluator=ev)
    accs = [result.zero_shot["dev"]["accuracy"]] + [d["dev"]["accuracy"]
                                                     for d in result.dev_history]
    first_best = accs.index(max(accs))
    assert first_best > 0 and result.best_dev["round"] == first_best - 1
    assert result.final["dev"] == result.best_dev["dev"]  # the snapshot's vectors were scored
    assert ev.score("dev") == result.best_dev["dev"]

    # a dev set the training target does not predict: every dev accuracy rounds to 0, so all
    # tie with the zero adapter, which is scored first and stays the final adapter
    ev = LayeredQuadratic(dev_shift=5.0)
    result = run(config(budget=60), tmp_path / "b", evaluator=ev)
    assert {d["dev"]["accuracy"] for d in result.dev_history} == {0.0}
    assert result.best_dev["round"] is None
    assert all(not v.any() for v in result.best_vectors.values())
    assert any(v.any() for v in result.vectors.values())
    assert result.final["dev"] == result.zero_shot["dev"]


def test_nonfinite_losses_are_counted_and_never_installed(tmp_path):
    ev = LayeredQuadratic(nan_rows=(1, 4))
    result = run(config(budget=120, accept="elitist"), tmp_path, evaluator=ev)
    assert all(r["n_nonfinite"] == 2 for r in result.metrics)
    assert all(r["losses"][1] is None and r["losses"][4] is None for r in result.metrics)
    assert result.metrics[-1]["loss_star"] < result.zero_shot["train_loss"]
    assert np.isfinite(result.zero_shot["train_loss"])
    nan_rows = [call["Z"][row] for call in ev.calls[1:] for row in (1, 4)]
    for call in ev.calls:
        assert not any(np.array_equal(z, x) for z in call["committed"] if z.any()
                       for x in nan_rows)


def test_stopped_optimisers_are_skipped(tmp_path, monkeypatch):
    cfg = config(budget=60, optimizers=["fwa"])
    stopped = derive_seed(cfg.seed, "opt", 1, "fwa")
    monkeypatch.setattr(BareBonesFireworks, "_stop",
                        lambda self: {"test": 1} if self.seed == stopped else {})
    result = run(cfg, tmp_path / "one", evaluator=LayeredQuadratic())
    assert [r["layer"] for r in result.metrics][:6] == [0, 2, 3, 0, 2, 3]
    assert result.stop_reason == "budget"

    monkeypatch.setattr(BareBonesFireworks, "_stop", lambda self: {"test": 1})
    result = run(cfg, tmp_path / "all", evaluator=LayeredQuadratic())
    assert result.stop_reason == "every optimiser has stopped" and result.finished
    assert result.metrics == [] and result.best_dev["round"] is None


def test_select_loss_keeps_the_lowest_dev_loss(tmp_path):
    result = run(config(budget=200, select="loss"), tmp_path, evaluator=LayeredQuadratic(
        dev_shift=0.1))
    losses = [result.zero_shot["dev"]["loss"]] + [d["dev"]["loss"] for d in result.dev_history]
    first_best = losses.index(min(losses))
    assert result.best_dev["round"] == (None if first_best == 0 else first_best - 1)
    assert result.final["dev"]["loss"] == min(losses)


def test_recenter_visit_starts_every_visit_at_the_committed_vector():
    # one method per layer: only `recenter: visit` moves CMA-ES's mean back to loss*'s vector
    def means(recenter):
        ev, seen = LayeredQuadratic(), []

        def check(s, gen):
            if gen.round >= 1 and s.state.visit_generation == 0:
                es = s.optimizers[(gen.layer, "cma")]._es
                seen.append(np.array_equal(s.state.vectors[gen.layer], np.array(es.mean)))

        drive(Schedule(config(budget=300, optimizers=["cma"], recenter=recenter), 4, ev.dim),
              ev, check)
        return seen

    assert means("visit") and all(means("visit"))
    assert not all(means("switch"))


def test_l2_pull_adds_to_the_objective_and_shrinks_the_vectors(tmp_path):
    plain = run(config(budget=300), tmp_path / "a", evaluator=LayeredQuadratic())
    pulled = run(config(budget=300, l2=5.0), tmp_path / "b", evaluator=LayeredQuadratic())
    ev = LayeredQuadratic()
    schedule = Schedule(config(budget=300, l2=5.0), ev.n_layers, ev.dim)
    schedule.start(1.0, ev.score("dev"))
    gen = schedule.ask()
    raw = ev.evaluate(gen.layer, gen.Z)
    record, _ = schedule.tell(gen, raw)
    np.testing.assert_allclose(record["losses"], raw.losses + 5.0 * np.mean(gen.Z ** 2, axis=1))
    norm = sum(float(np.sum(v ** 2)) for v in pulled.vectors.values())
    assert norm < sum(float(np.sum(v ** 2)) for v in plain.vectors.values())
    with pytest.raises(Exception, match="schedule.l2 must be >= 0"):
        config(l2=-1.0)


def test_mean_installs_only_the_optimisers_centre_and_counts_its_evaluation():
    ev = LayeredQuadratic()
    schedule = Schedule(config(budget=200, accept="mean", optimizers=["cma"]), 4, ev.dim)
    z0 = np.zeros((1, ev.dim))
    schedule.start(ev.evaluate(0, z0).losses[0], ev.score("dev"))
    centres, installed, records, loss_star = [], 0, [], schedule.state.loss_star
    while schedule.state.phase != "final":
        if schedule.state.phase == "dev":
            schedule.record_dev(ev.score("dev"))
            continue
        gen = schedule.ask()
        before = schedule.state.evaluations

        def score(z, gen=gen):
            centres.append(z.copy())
            return float(ev.evaluate(gen.layer, z[None]).losses[0])

        record, commit = schedule.tell(gen, ev.evaluate(gen.layer, gen.Z), score)
        assert schedule.state.evaluations - before == POPSIZE + (record["centre_loss"] is not None)
        assert schedule.state.loss_star <= loss_star  # elitist on the centre
        loss_star = schedule.state.loss_star
        if commit is not None:
            installed += 1
            assert np.array_equal(commit, centres[-1])  # the centre, never a sample
            assert not any(np.array_equal(commit, z) for z in gen.Z)
            assert record["loss_star"] == record["centre_loss"]
            ev.commit(gen.layer, commit)
        records.append(record)
    assert installed >= 3 and schedule.state.evaluations <= 200
    assert schedule.state.loss_star < records[0]["loss_star"] + 1e-12


def test_mean_through_the_driver_resumes_identically(tmp_path):
    cfg = config(budget=120, accept="mean")
    whole = run(cfg, tmp_path / "whole", evaluator=LayeredQuadratic())
    assert all("centre_loss" in r for r in whole.metrics)
    assert whole.evaluations <= 120
    run(cfg, tmp_path / "cut", evaluator=LayeredQuadratic(), stop_after=3)
    resumed = run(None, tmp_path / "cut", evaluator=LayeredQuadratic(), resume=True)
    assert [(r["losses"], r["centre_loss"]) for r in resumed.metrics] == [
        (r["losses"], r["centre_loss"]) for r in whole.metrics]
    assert all(np.array_equal(resumed.vectors[k], v) for k, v in whole.vectors.items())
