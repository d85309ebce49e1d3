"""The `dfolora` command line: config assembly, refusals, and a whole run on a fake evaluator."""

import json
import subprocess
import sys

import pytest
import yaml
from layered import LayeredQuadratic

from common.errors import ConfigError
from orchestrator import cli, presets


def test_presets_load_and_validate():
    from orchestrator.validation import validate_run

    assert {"demo", "smoke", "roberta-large-sst2", "gpt2-large-rte"} <= set(presets.names())
    for name in presets.names():
        cfg = presets.resolve(preset=name)
        validate_run(cfg)
        assert presets.describe(name)
    paper = presets.resolve(preset="roberta-large-mrpc")
    assert (paper.budget, paper.optimizer.popsize, paper.adapter.dim, paper.adapter.rank) == (
        8000, 20, 500, 4)


def test_set_overrides_parse_yaml_values():
    cfg = presets.resolve(preset="smoke", sets=[
        "budget=80", "schedule.layers=[29, 28, 27]", "task.label_words=null",
        "cluster.num_actors=2", "optimizer.name=nevergrad:OnePlusOne", "task.name=sst2"])
    assert cfg.budget == 80 and cfg.schedule.layers == (29, 28, 27)
    assert cfg.cluster.num_actors == 2 and cfg.optimizer.name == "nevergrad:OnePlusOne"
    assert cfg.task.name == "sst2" and cfg.task.k == 8  # the preset's other keys stay


@pytest.mark.parametrize("sets, match", [
    (["budgte=3"], "did you mean 'budget'"),
    (["task.kk=3"], "unknown config key 'task.kk'"),
    (["budget"], "expected KEY=VALUE"),
    (["budget=[1"], "not valid YAML"),
    (["budget=ten"], "budget must be int"),
    (["seed.x=1"], "seed must be int"),
    (["budget=3", "budget.x=1"], "'budget' is not a section"),
    ([".x=1"], "expected KEY=VALUE"),
])
def test_bad_overrides_are_one_line_errors(sets, match):
    with pytest.raises(ConfigError, match=match):
        presets.resolve(sets=sets)


def test_unknown_preset_and_bad_config_file(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'smoke'"):
        presets.resolve(preset="smok")
    bad = tmp_path / "bad.yaml"
    bad.write_text("budget: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        presets.resolve(config=str(bad))
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        presets.resolve(config=str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        presets.resolve(config=str(tmp_path / "missing.yaml"))


def run_cli(*args, cwd=None):
    """The real console entry point in a subprocess: exit code, stdout, stderr."""
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("args, match", [
    (["run", "--set", "budgte=3", "--out", "{tmp}/a"], "did you mean 'budget'"),
    (["run", "--preset", "nope", "--out", "{tmp}/a"], "unknown preset 'nope'"),
    (["run", "--set", "optimizer.name=adam", "--out", "{tmp}/a"], "unknown optimiser"),
    (["run", "--preset", "smoke", "--set", "optimizer.name=nevergrad:NoSuchOptimizer", "--out",
      "{tmp}/a"], "optimizer.name: unknown Nevergrad optimiser 'NoSuchOptimizer'"),
    (["run", "--resume"], "--resume needs --out"),
    (["run", "--resume", "--out", "{tmp}/empty"], "nothing to resume"),
    (["run", "--out", "{tmp}/full"], "not empty"),
    (["run", "--out", "{tmp}/file.txt"], "is a file"),
    (["export", "{tmp}/full", "--out", "{tmp}/x"], "not a finished run folder"),
    (["compare", "{tmp}/full"], "no results.json"),
])
def test_user_mistakes_exit_2_with_one_line(tmp_path, args, match):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("precious")
    (tmp_path / "file.txt").write_text("x")
    code, out, err = run_cli(*[a.format(tmp=tmp_path) for a in args])
    assert code == 2, err
    assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "full" / "keep.txt").read_text() == "precious"
    assert not (tmp_path / "a").exists()


def test_an_optimizer_name_without_effect_is_one_warning_line(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("precious")
    code, _, err = run_cli("run", "--preset", "smoke", "--set", "optimizer.name=fwa-dyn",
                           "--out", str(tmp_path / "full"))
    assert code == 2 and err.splitlines() == [
        "warning: optimizer.name 'fwa-dyn' has no effect: schedule.optimizers [cma, fwa] "
        "decides the optimisers",
        f"error: output folder '{tmp_path / 'full'}' is not empty: pass --resume to continue "
        f"the run there, or choose another --out"]


@pytest.mark.parametrize("command", ["run", "zero-shot", "lora"])
@pytest.mark.parametrize("bad, match", [("task.name=not_a_task", "unknown task 'not_a_task'"),
                                        ("model.name=/nonexistent/model", "cannot load")])
def test_a_run_refused_once_loading_leaves_no_folder(tmp_path, monkeypatch, capsys, command,
                                                     bad, match):
    """Mistakes found only when the model or data load: no runs/<task>-<method>-<time>/ left."""
    monkeypatch.chdir(tmp_path)
    assert cli.main([command, "--preset", "smoke", "--set", bad, "--progress", "quiet"]) == 2
    assert match in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_refused_run_keeps_the_folders_it_did_not_create(tmp_path, capsys):
    bad = ["--preset", "smoke", "--set", "task.name=not_a_task", "--progress", "quiet"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["zero-shot", *bad, "--out", str(empty)]) == 2
    assert empty.is_dir() and list(empty.iterdir()) == []
    assert cli.main(["zero-shot", *bad, "--out", str(tmp_path / "a" / "b" / "c")]) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]
    assert "unknown task 'not_a_task'" in capsys.readouterr().err


def test_help_everywhere():
    for command in ([], ["run"], ["zero-shot"], ["lora"], ["export"], ["compare"], ["presets"],
                    ["sweep"]):
        code, out, _ = run_cli(*command, "--help")
        assert code == 0 and "usage: dfolora" in out
    code, out, _ = run_cli("presets")
    assert code == 0 and "demo" in out and "smoke" in out


def test_run_writes_the_run_folder_and_resumes(tmp_path, monkeypatch, capsys):
    """A whole `dfolora run` on the synthetic layered objective (no model): every file, then
    `--resume` of a finished run is a no-op that reports the same results."""
    import orchestrator.driver as driver

    monkeypatch.setattr(driver, "build_evaluator", lambda cfg, stats: LayeredQuadratic())
    out = tmp_path / "run"
    args = ["run", "--set", "budget=60", "--set", "adapter.dim=8", "--set", "optimizer.popsize=6",
            "--set", "schedule.optimizers=[cma, fwa]", "--out", str(out), "--progress", "json"]
    assert cli.main(args) == 0
    stdout = capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in stdout[:-1]]
    assert records[0]["event"] == "start" and records[-1]["event"] == "final"
    assert "test accuracy" in stdout[-1]
    assert yaml.safe_load((out / "config.yaml").read_text())["budget"] == 60
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in lines] == [r["event"] for r in records]
    gen = next(r for r in lines if r["event"] == "generation")
    for key in ("round", "layer", "method", "best_loss", "median_loss", "step_size",
                "evaluations", "candidates_per_s", "candidates_per_s_per_actor", "seconds"):
        assert key in gen
    results = json.loads((out / "results.json").read_text())
    for key in ("zero_shot", "final", "evaluations", "wall_seconds", "peak_memory_mb"):
        assert key in results
    assert set(results["final"]) >= {"train", "dev", "test"}
    assert results["method"] == "dfo-lora:cma+fwa" and results["evaluations"] <= 60
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        "dev.png", "loss.png", "throughput.png"]
    assert (out / "checkpoints" / "LATEST").exists() and (out / "best_vectors.npz").exists()
    assert cli.main(["run", "--resume", "--out", str(out), "--progress", "quiet"]) == 0
    assert json.loads((out / "results.json").read_text())["final"] == results["final"]
    assert cli.main(["compare", str(out), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert row["method"] == "dfo-lora:cma+fwa" and row["test"] == results["final"]["test"][
        "accuracy"]


# -- resume under a changed config: the diff, --force, the trust notice ------------------------

def test_resume_with_a_changed_config_needs_force(tmp_path, monkeypatch, capsys):
    import orchestrator.driver as driver

    monkeypatch.setattr(driver, "build_evaluator", lambda cfg, stats: LayeredQuadratic())
    sets = ["adapter.dim=8", "optimizer.popsize=6", "seed=5"]
    out = tmp_path / "run"
    driver.run(presets.resolve(sets=[*sets, "budget=30"]), out, evaluator=LayeredQuadratic(),
               stop_after=2)  # an interrupted run
    capsys.readouterr()

    def resume(*extra, force=False):
        args = ["run", "--resume", "--out", str(out), "--progress", "quiet"]
        for item in [*sets, *extra]:
            args += ["--set", item]
        code = cli.main(args + ["--force"] * force)
        return code, capsys.readouterr().err

    code, err = resume("budget=60")
    assert code == 2 and "\n  budget: 30 -> 60\n" in err and "--force" in err
    assert "resuming from" in err and "resume only folders you trust" in err
    code, err = resume("budget=60", "seed=6", force=True)
    assert code == 2 and "seed: 5 -> 6" in err and "seed cannot change" in err
    assert yaml.safe_load((out / "config.yaml").read_text())["budget"] == 30  # untouched
    code, err = resume("budget=60", force=True)
    assert code == 0, err
    assert yaml.safe_load((out / "config.yaml").read_text())["budget"] == 60
    assert json.loads((out / "results.json").read_text())["evaluations"] == 60


def test_fresh_run_has_no_trust_notice_and_help_explains_force(tmp_path, monkeypatch, capsys):
    import orchestrator.driver as driver

    monkeypatch.setattr(driver, "build_evaluator", lambda cfg, stats: LayeredQuadratic())
    args = ["run", "--set", "budget=12", "--set", "adapter.dim=8", "--set",
            "optimizer.popsize=6", "--out", str(tmp_path / "r"), "--progress", "quiet"]
    assert cli.main(args) == 0
    assert "resuming from" not in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--force" in text and "budget and schedule.rounds extend" in text
    assert "Refused even so: model.*, task.*, adapter.*, seed, schedule.layers" in text


def test_a_run_killed_in_its_first_checkpoint_starts_again(tmp_path, monkeypatch, capsys):
    """Files of a first entry cut short (no checksum file, no LATEST) are not a run to resume:
    `--resume` starts it again from config.yaml, with no trust notice."""
    import orchestrator.driver as driver

    monkeypatch.setattr(driver, "build_evaluator", lambda cfg, stats: LayeredQuadratic())
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "ckpt-000000.npz").write_bytes(b"PK partial")
    cfg = presets.resolve(sets=["budget=12", "adapter.dim=8", "optimizer.popsize=6"])
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert cli.main(["run", "--resume", "--out", str(out), "--progress", "quiet"]) == 0
    assert "resuming from" not in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text())["evaluations"] == 12


# --- console reporters --------------------------------------------------------------------------

def test_bar_reporter_shows_progress_and_final_line():
    import io

    from orchestrator.reporting import bar_reporter

    stream = io.StringIO()
    report = bar_reporter(60, stream)
    report({"event": "start", "loss_star": 0.7, "dev": {"accuracy": 0.5, "loss": 0.7},
            "metric": "accuracy"})
    report({"event": "generation", "round": 0, "layer": 29, "method": "cma", "generation": 0,
            "best_loss": 0.6, "loss_star": 0.6, "step_size": 1.0, "evaluations": 20,
            "accepted": True, "seconds": 1.0, "candidates_per_s": 20.0})
    report({"event": "final", "best_dev_round": 0, "train": {"accuracy": 0.9},
            "dev": {"accuracy": 0.8}, "test": {"accuracy": 0.75}})
    text = stream.getvalue()
    assert "zero adapter" in text and "20/60" in text and "layer 29" in text
    assert "test acc 0.7500" in text


def test_tensorboard_without_the_package_is_a_clear_error(tmp_path):
    pytest.importorskip("torch")
    try:
        import tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    code, _, err = run_cli("run", "--preset", "smoke", "--tensorboard", str(tmp_path / "tb"),
                           "--out", str(tmp_path / "run"))
    assert code == 2 and "pip install tensorboard" in err
    assert not (tmp_path / "run").exists()
