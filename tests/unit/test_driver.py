"""The driver's boundary: settings rejected before a model loads, no torch in the orchestrator,
records for reporters, and evaluator results checked."""

import io
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from harness import run
from layered import LayeredQuadratic

from common.config import RunConfig
from common.errors import ConfigError, DfoloraError
from orchestrator.evaluation import EvalResult, local
from orchestrator.optimizers import OptimizerError
from orchestrator.reporting import fan_out, jsonl_reporter, progress_reporter
from orchestrator.validation import validate_run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_model(monkeypatch):
    """Building the in-process evaluator (and so loading a model) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(local.LocalEvaluator, "__init__", refuse)


BAD = [  # (config, error, words the message must contain)
    ({"optimizer": {"name": "cmaes"}}, OptimizerError, ["unknown optimiser 'cmaes'", "fwa"]),
    ({"schedule": {"optimizers": ["cma", "fireworks"]}}, OptimizerError, ["'fireworks'"]),
    ({"optimizer": {"name": "nevergrad:NoSuchOptimizer"}}, OptimizerError,
     ["unknown Nevergrad optimiser 'NoSuchOptimizer'"]),
    ({"optimizer": {"name": "nevergrad:cma"}}, OptimizerError, ["nevergrad:CMA"]),
    ({"optimizer": {"popsize": 1}}, ConfigError, ["optimizer.popsize", "got 1"]),
    ({"optimizer": {"sigma0": 0}}, ConfigError, ["optimizer.sigma0", "got 0"]),
    ({"optimizer": {"sigma0": -1.5}}, ConfigError, ["optimizer.sigma0", "-1.5"]),
    ({"budget": 19}, ConfigError, ["budget (19)", "one generation", "popsize = 20"]),
    ({"optimizer": {"bounds": [0.5, 2.0]}}, ConfigError, ["optimizer.bounds", "[0.5, 2.0]"]),
    ({"optimizer": {"name": "fwa-dyn", "popsize": 4, "fireworks": 5}}, OptimizerError,
     ["n_fireworks", "got 5"]),
    ({"optimizer": {"fireworks": 3}}, ConfigError, ["fwa-dyn only"]),
    ({"schedule": {"optimizers": ["cma", "cma"]}}, ConfigError, ["twice"]),
    ({"schedule": {"accept": "greedy"}}, ConfigError, ["schedule.accept", "'greedy'"]),
    ({"schedule": {"layers": [2, -1]}}, ConfigError, ["schedule.layers", "-1"]),
]


@pytest.mark.parametrize("data, error, words", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_settings_fail_before_any_model_loads(tmp_path, no_model, data, error, words):
    with pytest.raises(error) as err:
        run(RunConfig.from_dict(data), tmp_path)  # from_dict already refuses some
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert isinstance(err.value, DfoloraError)
    assert not (tmp_path / "checkpoints").exists()


def test_an_overridden_optimizer_name_is_still_checked(tmp_path, no_model):
    """schedule.optimizers decides the optimisers, but a bad optimizer.name is not ignored,
    and one set to something else than the default warns that it has no effect."""
    over = {"schedule": {"optimizers": ["cma", "fwa"]}}
    with pytest.raises(OptimizerError, match="optimizer.name: unknown Nevergrad optimiser "
                                             "'NoSuchOptimizer'"):
        run(RunConfig.from_dict({**over, "optimizer": {"name": "nevergrad:NoSuchOptimizer"}}),
            tmp_path)
    assert list(tmp_path.iterdir()) == []
    with pytest.warns(UserWarning, match=r"optimizer.name 'fwa-dyn' has no effect: "
                                         r"schedule.optimizers \[cma, fwa\] decides"):
        validate_run(RunConfig.from_dict({**over, "optimizer": {"name": "fwa-dyn"}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_run(RunConfig.from_dict({"schedule": {"optimizers": ["fwa"]}}))  # default name
        validate_run(RunConfig.from_dict({**over, "optimizer": {"name": "fwa"}}))  # one of them


def test_good_settings_pass_validation():
    for data in ({}, {"schedule": {"optimizers": ["cma", "fwa"], "alternate": "layer"}},
                 {"optimizer": {"name": "nevergrad:NGOpt", "bounds": [-3, 3]}},
                 {"optimizer": {"name": "fwa-dyn", "fireworks": 4}, "budget": 20}):
        validate_run(RunConfig.from_dict(data))


def test_orchestrator_imports_no_torch():
    code = ("import sys; import orchestrator.driver, orchestrator.evaluation.local, "
            "orchestrator.reporting; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', "
            "'workers', 'ray')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_layers_out_of_range_are_reported_once_the_model_is_known(tmp_path):
    cfg = RunConfig.from_dict({"adapter": {"dim": 8}, "schedule": {"layers": [1, 4]}})
    with pytest.raises(ConfigError, match=r"\[4\] out of range; the model has 4 layers"):
        run(cfg, tmp_path, evaluator=LayeredQuadratic())


def test_a_run_refused_while_loading_leaves_nothing_it_created(tmp_path):
    """The driver itself removes a new folder when the model cannot load (a DfoloraError
    before the first checkpoint); a folder that held something keeps it."""
    cfg = RunConfig.from_dict({"model": {"name": "/nonexistent/model"}})
    with pytest.raises(DfoloraError, match="cannot load"):
        run(cfg, tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "config.yaml").write_text("budget: 40\n")
    with pytest.raises(DfoloraError, match="cannot load"):
        run(cfg, tmp_path / "kept", resume=True)
    assert (tmp_path / "kept" / "config.yaml").exists()


def test_an_evaluator_returning_the_wrong_number_of_losses_is_an_error(tmp_path):
    class Short(LayeredQuadratic):
        def evaluate(self, layer, Z):
            full = super().evaluate(layer, Z)
            return EvalResult(full.losses[:-1]) if len(Z) > 1 else full

    cfg = RunConfig.from_dict({"adapter": {"dim": 8}, "budget": 40,
                               "optimizer": {"popsize": 4}})
    with pytest.raises(DfoloraError, match=r"losses of shape \(3,\) for 4 candidates"):
        run(cfg, tmp_path, evaluator=Short())


def test_reporters_receive_every_record_in_order(tmp_path):
    cfg = RunConfig.from_dict({"adapter": {"dim": 8}, "budget": 40,
                               "optimizer": {"popsize": 4},
                               "schedule": {"optimizers": ["fwa", "cma"], "layers": [0, 1]}})
    records, stream = [], io.StringIO()
    began = time.perf_counter()
    result = run(cfg, tmp_path / "run", evaluator=LayeredQuadratic(),
                 reporter=fan_out(records.append, progress_reporter(stream),
                                  jsonl_reporter(tmp_path / "records.jsonl")))
    elapsed = time.perf_counter() - began
    events = [r["event"] for r in records]
    assert events == (["start"] + ["generation", "generation", "dev"] * 5 + ["final"])
    assert [r for r in records if r["event"] == "generation"] == result.metrics
    lines = stream.getvalue().splitlines()
    assert len(lines) == len(records) and lines[-1].startswith("final (best dev after round")
    assert len((tmp_path / "records.jsonl").read_text().splitlines()) == len(records)
    assert result.summary()["evaluations"] == 40
    # wall time: the session's, covering every generation's own seconds, within the call
    assert sum(r["seconds"] for r in result.metrics) <= result.seconds <= elapsed
    assert result.metrics[-1]["wall_seconds"] <= result.seconds
    assert result.summary()["seconds"] == round(result.seconds, 3)
