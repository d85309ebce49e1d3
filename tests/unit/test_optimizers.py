"""Optimisers on toy objectives, parametrised over the registry (the fast test layer).

Budgets and reduction factors below were measured on seeds 0-3 and leave a margin of 2x or more
over the worst seed; every test uses fixed seeds, so a failure means a change in behaviour.
"""

import json
import math
import pickle

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from orchestrator.optimizers import (
    OPTIMIZERS,
    OptimizerError,
    available_optimizers,
    make_optimizer,
    restore_optimizer,
    validate_optimizer_name,
    validate_settings,
)
from orchestrator.optimizers.base import penalise_nonfinite

DIM = 50
SHIFT = np.random.default_rng(1).uniform(-1.0, 1.0, DIM)
WEIGHTS = 10.0 ** (3.0 * np.arange(DIM) / (DIM - 1))  # ellipsoid with condition number 1e3


def sphere(X):
    return ((X - SHIFT) ** 2).sum(axis=1)


def ellipsoid(X):
    return (WEIGHTS * (X - SHIFT) ** 2).sum(axis=1)


def run(opt, f, evaluations):
    while opt.evaluations < evaluations:
        X = opt.ask()
        opt.tell(X, f(X))
    return opt


# Every registry entry plus Nevergrad ones of different families (DE, (1+1), CMA inside
# Nevergrad, and NGOpt, which picks an algorithm from its budget and needs one; with budget 2000
# in 6 dimensions it picks CMA: its MetaModel choice for smaller budgets fails with NumPy 2.4).
KINDS = {
    "cma": {},
    "fwa": {},
    "fwa-dyn": {},
    "nevergrad:NGOpt": {"budget": 2000},
    "nevergrad:TwoPointsDE": {},
    "nevergrad:OnePlusOne": {},
    "nevergrad:CMA": {},
}


def small(name, seed=0, dim=6, **kw):
    return make_optimizer(name, dim, sigma0=0.5, popsize=8, seed=seed, **KINDS[name], **kw)


def quadratic(X):
    return ((X - 0.3) ** 2).sum(axis=1)


# --- convergence ------------------------------------------------------------------------------

# (name, extra options, sigma0, evaluations, required final/initial loss ratio)
CONVERGENCE = [
    ("cma", {}, 0.5, 2000, 0.1),
    ("fwa", {}, 0.5, 4000, 0.1),
    ("fwa-dyn", {}, 0.5, 4000, 0.1),
    ("nevergrad:NGOpt", {"budget": 1200}, 0.5, 1200, 0.2),
    ("nevergrad:TwoPointsDE", {}, 0.3, 3000, 0.5),
]


@pytest.mark.parametrize("objective", [sphere, ellipsoid], ids=["sphere", "ellipsoid"])
@pytest.mark.parametrize(("name", "extra", "sigma0", "evaluations", "factor"), CONVERGENCE,
                         ids=[c[0] for c in CONVERGENCE])
def test_reduces_50d_objectives(name, extra, sigma0, evaluations, factor, objective):
    opt = make_optimizer(name, DIM, sigma0=sigma0, popsize=20, seed=0, **extra)
    initial = objective(np.zeros((1, DIM)))[0]
    run(opt, objective, evaluations)
    assert opt.evaluations == evaluations
    assert opt.best.f < factor * initial, (opt.best.f, initial)
    assert math.isclose(objective(opt.best.x[None])[0], opt.best.f)


def test_cma_reaches_1e8_on_50d_sphere():
    opt = make_optimizer("cma", DIM, sigma0=0.5, popsize=20, seed=0)
    while opt.best.f > 1e-8 and opt.evaluations < 12000:
        X = opt.ask()
        opt.tell(X, sphere(X))
    assert opt.best.f <= 1e-8, (opt.best.f, opt.evaluations)


# --- reproducibility ----------------------------------------------------------------------------


def trajectory(opt, generations, f=quadratic):
    asks = []
    for _ in range(generations):
        X = opt.ask()
        asks.append(X)
        opt.tell(X, f(X))
    return asks


def assert_same_asks(a, b):
    assert len(a) == len(b)
    for Xa, Xb in zip(a, b, strict=True):
        assert np.array_equal(Xa, Xb)


@pytest.mark.parametrize("name", KINDS)
def test_same_seed_same_trajectory_other_seed_differs(name):
    assert_same_asks(trajectory(small(name), 3), trajectory(small(name), 3))
    assert not np.array_equal(trajectory(small(name), 2)[-1], trajectory(small(name, 1), 2)[-1])


def serialise(state, how):
    if how == "json":
        return json.loads(json.dumps(state))
    return pickle.loads(pickle.dumps(state))


@pytest.mark.parametrize("pending", [False, True], ids=["between", "pending"])
@pytest.mark.parametrize("name", KINDS)
def test_state_dict_round_trip_is_bit_identical(name, pending):
    kw = {"bounds": (-1.0, 1.0)} if name == "fwa-dyn" else {}
    opt = small(name, **kw)
    trajectory(opt, 3)
    X = opt.ask() if pending else None
    # Fireworks keep plain data only, so their state also survives JSON.
    how = "json" if name.startswith("fwa") else "pickle"
    state = serialise(opt.state_dict(), how)
    twin = restore_optimizer(state)
    fresh = small(name, **kw)
    fresh.load_state_dict(serialise(opt.state_dict(), how))
    if pending:
        for o in (opt, twin, fresh):
            o.tell(X, quadratic(X))
    a, b, c = trajectory(opt, 3), trajectory(twin, 3), trajectory(fresh, 3)
    assert_same_asks(a, b)
    assert_same_asks(a, c)
    assert (twin.generations, twin.evaluations) == (opt.generations, opt.evaluations)
    assert twin.best.f == opt.best.f and np.array_equal(twin.best.x, opt.best.x)


@pytest.mark.parametrize("name", KINDS)
def test_interleaved_instances_are_independent(name):
    alone_a, alone_b = trajectory(small(name, 1), 4), trajectory(small(name, 2), 4)
    a, b = small(name, 1), small(name, 2)
    asks_a, asks_b = [], []
    for _ in range(4):
        Xa = a.ask()
        np.random.rand(7)  # other code drawing from numpy's global RNG must not matter
        Xb = b.ask()
        b.tell(Xb, quadratic(Xb))
        a.tell(Xa, quadratic(Xa))
        asks_a.append(Xa)
        asks_b.append(Xb)
    assert_same_asks(asks_a, alone_a)
    assert_same_asks(asks_b, alone_b)


@pytest.mark.parametrize("name", KINDS)
def test_global_numpy_rng_is_left_alone(name):
    np.random.seed(123)
    before = np.random.get_state()
    trajectory(small(name), 2)
    after = np.random.get_state()
    assert before[0] == after[0] and np.array_equal(before[1], after[1])
    assert before[2:] == after[2:]


# --- behaviour shared by every optimiser --------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Bounds are .* sigma away")  # Nevergrad: tight on purpose
@pytest.mark.parametrize("name", KINDS)
def test_bounds_are_respected(name):
    opt = small(name, bounds=(-0.2, 0.2))
    for X in trajectory(opt, 5, f=lambda X: ((X - 5.0) ** 2).sum(axis=1)):
        assert X.min() >= -0.2 and X.max() <= 0.2


@pytest.mark.parametrize("name", KINDS)
def test_recenter_moves_the_search_and_keeps_step_size(name):
    opt = small(name)
    trajectory(opt, 3)
    step = opt.step_size
    target = np.full(opt.dim, 20.0)
    opt.recenter(target)
    assert opt.step_size == step or (math.isnan(step) and math.isnan(opt.step_size))
    X = opt.ask()
    assert np.all(np.linalg.norm(X - target, axis=1) < np.linalg.norm(X, axis=1))


def test_fwa_evaluates_its_firework_after_start_and_recenter():
    opt = small("fwa", x0=np.full(6, 0.1))
    assert np.array_equal(opt.ask()[0], np.full(6, 0.1))
    opt.tell(opt._pending, quadratic(opt._pending))
    opt.recenter(np.full(6, -0.4))
    assert np.array_equal(opt.ask()[0], np.full(6, -0.4))


def test_fwa_amplitude_rule_and_stop():
    opt = make_optimizer("fwa", 3, sigma0=1.0, popsize=4, seed=0)
    run(opt, lambda X: np.zeros(len(X)), 4)  # first batch: the firework never beats itself
    assert opt.step_size == pytest.approx(0.9)
    opt = make_optimizer("fwa", 3, sigma0=1.0, popsize=4, seed=0)
    run(opt, lambda X: -np.arange(len(X), dtype=float), 4)  # the last spark always improves
    assert opt.step_size == pytest.approx(1.2)
    run(opt, lambda X: np.zeros(len(X)), 4 * 300)  # flat: the box shrinks to nothing
    assert "amplitude" in opt.stop()


def test_cma_step_size_and_stop_report():
    opt = small("cma")
    assert opt.step_size == 0.5 and opt.stop() == {}
    assert math.isnan(small("nevergrad:TwoPointsDE").step_size)


# --- the NaN/inf policy -------------------------------------------------------------------------


@given(arrays(np.float64, st.integers(1, 12),
              elements=st.floats(allow_nan=True, allow_infinity=True, width=64)))
def test_penalty_is_finite_and_worse_than_every_finite_loss(losses):
    seen, finite, penalty = penalise_nonfinite(losses)
    assert np.isfinite(seen).all()
    assert np.array_equal(seen[finite], losses[finite])
    if not finite.all():
        assert np.all(seen[~finite] == penalty)
        assert not finite.any() or penalty > losses[finite].max() or penalty == np.finfo(float).max


@pytest.mark.filterwarnings("ignore:Clipping very high value")  # Nevergrad clips our penalty
@pytest.mark.parametrize("name", KINDS)
def test_nonfinite_losses_never_best_and_counted(name):
    opt = small(name)
    X = opt.ask()
    opt.tell(X, np.full(len(X), np.nan))
    assert opt.best.f == math.inf and opt.n_nonfinite == len(X)
    for _ in range(3):
        X = opt.ask()
        f = quadratic(X)
        f[::2] = [np.nan, np.inf, -np.inf, np.nan][: len(f[::2])]
        opt.tell(X, f)
        assert opt.last_tell_info["n_nonfinite"] == len(f[::2])
        assert opt.last_tell_info["penalty"] > np.nanmax(f[1::2])
    assert opt.n_nonfinite == len(X) + 3 * len(f[::2])
    assert math.isfinite(opt.best.f) and opt.best.f == pytest.approx(quadratic(opt.best.x[None])[0])


# --- errors at the boundary ---------------------------------------------------------------------


def test_call_sequence_errors():
    opt = small("fwa")
    with pytest.raises(OptimizerError, match="ask\\(\\) has not been called"):
        opt.tell(np.zeros((8, 6)), np.zeros(8))
    X = opt.ask()
    with pytest.raises(OptimizerError, match="pending"):
        opt.ask()
    with pytest.raises(OptimizerError, match=r"shape \(7, 6\).*\(8, 6\)"):
        opt.tell(X[:7], np.zeros(7))
    with pytest.raises(OptimizerError, match=r"losses of shape \(9,\) for a batch of 8"):
        opt.tell(X, np.zeros(9))
    with pytest.raises(OptimizerError, match="differing row 2"):
        opt.tell(np.where(np.arange(8)[:, None] == 2, X + 1, X), np.zeros(8))
    opt.tell(X, np.zeros(8))
    with pytest.raises(OptimizerError, match="second tell"):
        opt.tell(X, np.zeros(8))


def test_cma_requires_whole_populations():
    with pytest.raises(OptimizerError, match="popsize=8, got n=5"):
        small("cma").ask(5)


def test_nevergrad_failures_become_optimizer_errors():
    opt = make_optimizer("nevergrad:NGOpt", 4)  # NGOpt chooses its algorithm from the budget
    with pytest.raises(OptimizerError, match="nevergrad:NGOpt.*pass budget="):
        opt.ask()


def test_unknown_names():
    with pytest.raises(OptimizerError, match="unknown optimiser 'cmaes'.*fwa-dyn"):
        validate_optimizer_name("cmaes")
    with pytest.raises(OptimizerError, match="'NGopt'.*nevergrad:NGOpt"):
        make_optimizer("nevergrad:NGopt", 4)
    assert validate_optimizer_name("nevergrad:TwoPointsDE") == "nevergrad:TwoPointsDE"
    assert set(OPTIMIZERS) <= set(available_optimizers())


@pytest.mark.parametrize(("popsize", "sigma0", "message"), [
    (1, 1.0, "popsize must be an integer >= 2, got 1"),
    (2.5, 1.0, "popsize must be an integer >= 2, got 2.5"),
    (20, 0.0, "sigma0 must be a finite number > 0, got 0.0"),
    (20, -1.0, "got -1.0"),
    (20, math.nan, "got nan"),
])
def test_bad_settings(popsize, sigma0, message):
    with pytest.raises(OptimizerError, match=message):
        validate_settings("cma", popsize, sigma0)
    with pytest.raises(OptimizerError, match=message):
        make_optimizer("fwa", 3, popsize=popsize, sigma0=sigma0)


def test_bad_vectors_options_and_states():
    with pytest.raises(OptimizerError, match=r"x0 must have shape \(3,\), got \(4,\)"):
        make_optimizer("cma", 3, x0=np.zeros(4))
    with pytest.raises(OptimizerError, match="outside bounds"):
        make_optimizer("fwa", 3, x0=np.full(3, 2.0), bounds=(-1, 1))
    with pytest.raises(OptimizerError, match="no option.*'n_fireworks'"):
        make_optimizer("fwa", 3, n_fireworks=2)
    with pytest.raises(OptimizerError, match="may not set 'popsize'"):
        make_optimizer("cma", 3, cma_options={"popsize": 4})
    with pytest.raises(OptimizerError, match="state settings"):
        small("fwa", seed=1).load_state_dict(small("fwa").state_dict())
    with pytest.raises(OptimizerError, match="state name"):
        small("fwa").load_state_dict(small("fwa-dyn").state_dict())


def test_fwa_dyn_recenter_keeps_the_core_amplitude():
    opt = make_optimizer("fwa-dyn", 4, sigma0=0.5, popsize=12, seed=0)
    target = opt._fw.x[2].copy()  # firework 2 starts at the optimum: it is and stays the core
    run(opt, lambda X: ((X - target) ** 2).sum(axis=1), 36)
    assert int(np.argmin(opt._fw.f)) == 2 and opt._fw.amp[2] != opt._fw.amp[0]
    step = opt.step_size
    opt.recenter(np.ones(4))
    assert opt.step_size == step
    assert np.array_equal(opt.ask()[0], np.ones(4))


def test_centre_is_cmas_mean_fwas_core_and_the_best_otherwise():
    f = np.array([3.0, 1.0, 2.0, 5.0])
    for method, centre in (("cma", lambda o: np.asarray(o._es.mean)),
                           ("fwa", lambda o: o._fw.x[o._core()])):
        opt = make_optimizer(method, 6, x0=np.full(6, 0.5), seed=1, popsize=4)
        assert np.array_equal(opt.centre, np.full(6, 0.5))
        X = opt.ask()
        opt.tell(X, f)
        assert np.array_equal(opt.centre, centre(opt))
        assert not np.array_equal(opt.centre, np.full(6, 0.5))
    opt = make_optimizer("nevergrad:OnePlusOne", 6, seed=1, popsize=4)
    X = opt.ask()
    opt.tell(X, f)
    assert np.array_equal(opt.centre, X[1])  # no centre of its own: the best so far
