"""The gradient LoRA baseline on tiny random-weight llama and gpt2 models with toy splits."""

import json
import math
import subprocess
import sys

import pytest
import tiny
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from common.config import RunConfig
from common.errors import ConfigError
from workers.gradient_lora import LoraRun, selection_key, train_lora
from workers.models import LoadedModel
from workers.worker import EvalWorker

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")
FAMILIES = ("llama", "gpt2")
EPOCHS = 8
SETTINGS = {"lr": 3e-2, "epochs": EPOCHS, "batch_size": 3}
VOLATILE = ("wall_seconds", "peak_memory_mb")  # measurements, not results


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on a busy 2-core machine are ~10x slower with several threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(**overrides):
    cfg = {"task": {"template": "{text} it was", "label_words": ["bad", "great"], "k": 4},
           "eval": {"batch_size": 3, "train_batch_size": 3}}
    cfg.update(overrides)
    return RunConfig.from_dict(cfg)


@pytest.fixture(scope="module", params=FAMILIES)
def run(request, tmp_path_factory):
    """One training run per family, shared by the tests (it takes about half a second)."""
    loaded, splits = tiny.model(request.param), tiny.splits()
    out = tmp_path_factory.mktemp(f"lora-{request.param}")
    records = []
    result = train_lora(config(), loaded=loaded, splits=splits, progress=records.append,
                        out_dir=str(out), **SETTINGS)
    return {"family": request.param, "loaded": loaded, "splits": splits, "out": out,
            "result": result, "records": records}


def test_result_has_every_field_and_is_json(run):
    r = run["result"]
    for key in ("method", "zero_shot", "final", "best_epoch", "evaluations", "steps",
                "wall_seconds", "peak_memory_mb", "history"):
        assert key in r
    assert r["method"] == "gradient-lora"
    assert set(r["zero_shot"]) >= {"dev", "test"} and set(r["final"]) == {"train", "dev", "test"}
    for metrics in [*r["zero_shot"].values(), *r["final"].values()]:
        if isinstance(metrics, dict):
            assert {"loss", "accuracy", "f1", "n", "predicted_counts"} <= set(metrics)
    n_train = len(run["splits"].train)
    assert r["evaluations"] == n_train * EPOCHS and r["train_set_passes"] == EPOCHS
    assert r["steps"] == EPOCHS * math.ceil(n_train / SETTINGS["batch_size"])
    assert [h["epoch"] for h in r["history"]] == list(range(EPOCHS + 1))
    assert len(run["records"]) == EPOCHS and run["records"][-1]["epoch"] == EPOCHS
    assert r["wall_seconds"] > 0 and r["peak_memory_mb"] > 0
    json.dumps(r, allow_nan=False)


def test_training_lowers_the_train_loss(run):
    """Epoch 0 is the scored zero-shot loss, later epochs the mean loss of their minibatches."""
    history = run["result"]["history"]
    assert history[1]["train_loss"] == pytest.approx(history[0]["train_loss"], abs=1e-3)
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.01


def test_zero_shot_is_the_eval_worker_score(run):
    """Same prompts, label words, positions, batches and scoring path as the DFO worker."""
    worker = EvalWorker(config(), loaded=tiny.model(run["family"]), splits=run["splits"])
    zero = run["result"]["zero_shot"]
    for split in ("dev", "test"):
        assert zero[split] == worker.score(split)
    assert zero["train_loss"] == worker.score("train")["loss"]


def test_best_dev_snapshot_is_restored(run):
    r = run["result"]
    scored = [h for h in r["history"] if h["dev"] is not None]
    best = max(h["dev"]["accuracy"] for h in scored)
    assert r["final"]["dev"]["accuracy"] == best
    # ties on accuracy: the lower dev loss, then the earlier epoch
    chosen = min(scored, key=lambda h: (-h["dev"]["accuracy"], h["dev"]["loss"], h["epoch"]))
    assert r["best_epoch"] == chosen["epoch"] == r["settings"]["chosen_epoch"]
    assert r["final"]["dev"]["loss"] == pytest.approx(chosen["dev"]["loss"], rel=1e-6)
    assert r["final"]["dev"]["predicted_counts"] == chosen["dev"]["predicted_counts"]


def test_same_seed_same_results_and_model_given_back(run):
    """A second run on the same model object: PEFT's layers were taken out after the first."""
    assert not any(isinstance(m, LoraLayer) for m in run["loaded"].model.modules())
    again = train_lora(config(), loaded=run["loaded"], splits=run["splits"], **SETTINGS)
    first = {k: v for k, v in run["result"].items() if k not in VOLATILE}
    assert {k: v for k, v in again.items() if k not in VOLATILE} == first


def test_exported_adapter_reloads_with_peft(run):
    out = run["out"]
    assert (out / "adapter_config.json").exists()
    assert (out / "adapter_model.safetensors").exists()
    fresh = tiny.model(run["family"])
    model = PeftModel.from_pretrained(fresh.model, str(out)).eval()
    reloaded = LoraRun(config(), LoadedModel(model.base_model.model, fresh.tokenizer,
                                             fresh.kind, fresh.device), run["splits"])
    for split in ("train", "dev", "test"):
        got, want = reloaded.score(split), run["result"]["final"][split]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6, abs=1e-7)
        assert got["predicted_counts"] == want["predicted_counts"]
    if run["family"] == "gpt2":  # fused c_attn: the value block of B stays exactly zero
        hidden = fresh.model.config.n_embd
        b_rows = [m.lora_B["default"].weight for m in model.modules()
                  if isinstance(m, LoraLayer)]
        assert b_rows and all(torch.all(b[2 * hidden:] == 0) for b in b_rows)
        assert any(torch.any(b[: 2 * hidden] != 0) for b in b_rows)


def test_eval_every_scores_dev_every_nth_epoch_and_the_last():
    r = train_lora(config(), loaded=tiny.model("llama"), splits=tiny.splits(), lr=1e-2,
                   epochs=3, eval_every=2)
    assert [h["dev"] is not None for h in r["history"]] == [True, False, True, True]


@pytest.mark.parametrize("bad", [{"lr": 0.0}, {"lr": float("nan")}, {"epochs": 0},
                                 {"batch_size": 0}, {"eval_every": 0}, {"weight_decay": -1.0},
                                 {"epochs": 2.5}, {"progress": 3}, {"lr": []}, {"lr": "abc"},
                                 {"lr": [1e-3, -1.0]}, {"lr": [1e-3, True]},
                                 {"lr": [2e-3, 2e-3]}])
def test_bad_input_is_one_clear_config_error(bad):
    with pytest.raises(ConfigError, match="gradient LoRA: .* got"):
        train_lora(config(), loaded=tiny.model("llama"), splits=tiny.splits(), **bad)


GRID = [3e-2, 1e-3, 1e-2]  # given unsorted: trained and reported ascending


@pytest.fixture(scope="module")
def grid_run():
    """One grid run on tiny llama, recording which splits are scored."""
    scored, records = [], []
    original = LoraRun.score

    def counting(self, split):
        scored.append(split)
        return original(self, split)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LoraRun, "score", counting)
        r = train_lora(config(), loaded=tiny.model("llama"), splits=tiny.splits(), lr=GRID,
                       epochs=4, batch_size=3, progress=records.append)
    return {"result": r, "scored": scored, "records": records}


def test_grid_picks_the_best_dev_lr_and_epoch(grid_run):
    r, s = grid_run["result"], grid_run["result"]["settings"]
    assert s["lr_grid"] == sorted(GRID) and [e["lr"] for e in s["per_lr"]] == sorted(GRID)
    candidates = [(-acc, loss, e["lr"], epoch) for e in s["per_lr"]
                  for epoch, (acc, loss) in enumerate(zip(e["dev_metric"], e["dev_loss"],
                                                          strict=True))]
    _, loss, lr, epoch = min(candidates)
    assert (s["chosen_lr"], s["chosen_epoch"]) == (lr, epoch) and s["lr"] == lr
    assert r["best_epoch"] == epoch and s["metric"] == "accuracy"
    assert r["final"]["dev"]["loss"] == pytest.approx(loss, rel=1e-6)
    assert r["final"]["dev"]["accuracy"] == max(-c[0] for c in candidates)
    for e in s["per_lr"]:  # each lr's own best epoch by the same rule
        own = min((-a, b, k) for k, (a, b) in enumerate(zip(e["dev_metric"], e["dev_loss"],
                                                            strict=True)))
        assert e["best_epoch"] == own[2] and e["best_dev_loss"] == own[1]
    assert [h["train_loss"] for h in r["history"]] == next(
        e["train_loss"] for e in s["per_lr"] if e["lr"] == lr)
    n = r["train_examples"]
    assert r["evaluations"] == n * 4 * len(GRID) and r["train_set_passes"] == 4 * len(GRID)
    assert [(rec["lr"], rec["epoch"]) for rec in grid_run["records"]] == [
        (x, k) for x in sorted(GRID) for k in range(1, 5)]
    json.dumps(r, allow_nan=False)


def test_grid_scores_test_only_for_the_chosen_adapter(grid_run):
    """Test is scored twice: the zero adapter (zero-shot) and the chosen snapshot."""
    assert grid_run["scored"].count("test") == 2
    assert grid_run["scored"].count("dev") == 1 + 4 * len(GRID) + 1


def test_every_lr_trains_from_the_same_start(grid_run):
    """Each lr's run in the grid equals that lr trained alone."""
    per_lr = {e["lr"]: e for e in grid_run["result"]["settings"]["per_lr"]}
    alone = train_lora(config(), loaded=tiny.model("llama"), splits=tiny.splits(), lr=1e-2,
                       epochs=4, batch_size=3)
    assert [h["train_loss"] for h in alone["history"]] == per_lr[1e-2]["train_loss"]
    assert [h["dev"]["loss"] for h in alone["history"]] == per_lr[1e-2]["dev_loss"]


def test_single_lr_is_a_grid_of_one():
    """One value behaves as before: that lr, its best epoch, the same counts."""
    one = train_lora(config(), loaded=tiny.model("llama"), splits=tiny.splits(), lr=1e-2,
                     epochs=3, batch_size=3)
    listed = train_lora(config(), loaded=tiny.model("llama"), splits=tiny.splits(), lr=[1e-2],
                        epochs=3, batch_size=3)
    assert ({k: v for k, v in one.items() if k not in VOLATILE}
            == {k: v for k, v in listed.items() if k not in VOLATILE})
    s = one["settings"]
    assert s["lr"] == s["chosen_lr"] == 1e-2 and s["lr_grid"] == [1e-2] and s["epochs"] == 3
    assert s["chosen_epoch"] == one["best_epoch"] and len(s["per_lr"]) == 1
    assert one["evaluations"] == len(tiny.splits().train) * 3 and one["train_set_passes"] == 3
    assert [h["epoch"] for h in one["history"]] == [0, 1, 2, 3]


def test_selection_key_ties():
    dev = {"accuracy": 0.75, "loss": 0.5}
    assert selection_key(dev, "accuracy", 1e-3, 2) < selection_key(
        {"accuracy": 0.5, "loss": 0.1}, "accuracy", 1e-3, 1)  # the metric first
    assert selection_key(dev, "accuracy", 5e-3, 9) < selection_key(
        {**dev, "loss": 0.6}, "accuracy", 1e-3, 1)  # then the dev loss
    assert selection_key(dev, "accuracy", 1e-3, 9) < selection_key(dev, "accuracy", 5e-3, 1)
    assert selection_key(dev, "accuracy", 1e-3, 1) < selection_key(dev, "accuracy", 1e-3, 2)
    nan = {"accuracy": float("nan"), "loss": float("nan")}
    assert selection_key({"accuracy": 0.0, "loss": 9.0}, "accuracy", 1, 1) < selection_key(
        nan, "accuracy", 1e-3, 0)


def run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args],
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("args, match", [
    (["--lr", "abc"], "--lr: 'abc' is not a number"),
    (["--lr", "-1"], "--lr: learning rates must be finite numbers > 0, got '-1'"),
    (["--lr=1e-3,-1"], "got '-1'"),
    (["--lr", "1e-3,,2e-3"], "'' is not a number"),
    (["--lr", "nan"], "finite numbers > 0"),
    (["--lr", "1e-3,0.001"], "must be distinct"),
    (["--epochs", "0"], "--epochs must be an integer >= 1"),
])
def test_cli_refuses_bad_lr_and_epochs_before_any_folder(tmp_path, args, match):
    code, err = run_cli("lora", *args, "--out", str(tmp_path / "a"))
    assert code == 2 and err.startswith("error: ") and match in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "a").exists()


def test_cli_help_names_the_grid():
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "lora", "--help"],
                         capture_output=True, text=True, timeout=120).stdout
    assert "5e-4,1e-3,2e-3,5e-3" in out and "whole grid" in " ".join(out.split())
