"""`dfolora sweep`: the grid, its folder names, and refusals before anything is written."""

import pytest

from common.errors import ConfigError
from orchestrator import cli
from orchestrator.sweep import grid


def test_grid_is_sources_x_seeds_x_varied_values():
    cells = grid(["smoke"], [], [1, 2], ["budget=40"],
                 ["schedule.optimizers=[cma]", "task.k=4", "schedule.optimizers=[cma, fwa]"])
    assert [c.name for c in cells] == [
        "smoke-seed1-schedule.optimizers=cma-task.k=4",
        "smoke-seed1-schedule.optimizers=cma_fwa-task.k=4",
        "smoke-seed2-schedule.optimizers=cma-task.k=4",
        "smoke-seed2-schedule.optimizers=cma_fwa-task.k=4"]
    assert cells[1].sets == ("budget=40", "seed=1", "schedule.optimizers=[cma, fwa]", "task.k=4")
    assert cells[1].argv(__import__("pathlib").Path("r/x"))[:3] == ["run", "--preset", "smoke"]
    assert [c.name for c in grid([], [], [], [], [])] == ["defaults-seed42"]


@pytest.mark.parametrize("args, match", [
    (["--preset", "smok"], "run --preset smok: unknown preset 'smok'"),
    (["--preset", "smoke", "--vary", "task.k=0"], "run --preset smoke --set task.k=0: task.k "
                                                  "must be > 0"),
    (["--preset", "smoke", "--vary", "budgte=3"], "did you mean 'budget'"),
    (["--preset", "smoke", "--vary", "task.k"], "--vary 'task.k': expected KEY=VALUE"),
    (["--preset", "smoke", "--vary", "task.k=4", "--vary", "task.k=4"],
     "--vary task.k: the value '4' is given twice"),
    (["--preset", "smoke", "--vary", "schedule.optimizers=[cma, fwa]", "--vary",
      "schedule.optimizers=[cma,fwa]"], "share the folder"),
    (["--preset", "smoke", "--seeds", "-1"], "seed must be >= 0"),
    (["--config", "{tmp}/missing.yaml"], "config file '{tmp}/missing.yaml' does not exist"),
    (["--preset", "smoke", "--jobs", "0"], "--jobs and --threads must be >= 1"),
])
def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path, capsys, args, match):
    root = tmp_path / "root"
    args = [a.format(tmp=tmp_path) for a in args]
    assert cli.main(["sweep", *args, "--root", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert match.format(tmp=tmp_path) in err and len(err.splitlines()) == 1, err
    assert not root.exists()


def test_grid_names_the_offending_run():
    with pytest.raises(ConfigError, match=r"run --preset smoke --set seed=3 --set task.k=x"):
        grid(["smoke"], [], [3], [], ["task.k=x"])


def test_a_run_that_fails_is_named_and_the_sweep_exits_non_zero(tmp_path, capsys):
    root = tmp_path / "root"
    args = ["sweep", "--preset", "smoke", "--set", "model.name=/nonexistent/model", "--root",
            str(root), "--quiet"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "error: run smoke-seed42 failed (exit code 2): error:" in err and "cannot load" in err
    assert (root / "logs" / "smoke-seed42.log").exists() and not (root / "smoke-seed42").exists()


def test_results_table_is_a_grid_of_sweep_cells(tmp_path):
    """bench/results_table.py: one sweep cell per template x method x seed, the baselines as the
    same config's lora / zero-shot commands (not resumed), a bad --set refused up front."""
    import argparse
    import importlib.util

    from orchestrator import sweep

    path = __import__("pathlib").Path(__file__).resolve().parents[2] / "bench/results_table.py"
    spec = importlib.util.spec_from_file_location("results_table", path)
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    args = argparse.Namespace(templates=["default", "instruct"], seeds=[13, 21],
                              methods=["zero-shot", "dfo cma", "gradient lora"], sets=["budget=40"])
    cells = table.cells(args)
    assert len(cells) == 12 and len({c[3].name for c in cells}) == 12
    template, method, seed, cell = cells[5]  # default, gradient lora, 21
    assert (template, method, seed, cell.name) == ("default", "gradient lora", 21,
                                                   "default-gradient-lora-21")
    argv = cell.argv(tmp_path / cell.name)
    assert argv[:3] == ["lora", "--preset", "demo"] and "--resume" not in argv
    assert "task.template=default" in argv and "seed=21" in argv and "budget=40" in argv
    dfo = cells[8][3].argv(tmp_path)  # instruct, dfo cma, 13
    assert dfo[0] == "run" and "schedule.optimizers=[cma]" in dfo and dfo[-1] == "--resume"
    with pytest.raises(ConfigError, match="budgte"):
        table.cells(argparse.Namespace(**{**vars(args), "sets": ["budgte=3"]}))
    # an interrupted baseline cannot resume: the sweep clears its folder and starts it again
    partial = tmp_path / "zs"
    partial.mkdir()
    (partial / "config.yaml").write_text("partial\n")
    assert sweep.state(partial) == "new"
    bad = sweep.Cell((), ("task.name=not_a_task",), "zs", command="zero-shot")  # fails fast
    codes = sweep.run_cells([bad], tmp_path, say=lambda line: None)
    assert codes == {"zs": 2} and not (partial / "config.yaml").exists()
    assert "not_a_task" in (tmp_path / "logs" / "zs.log").read_text()
