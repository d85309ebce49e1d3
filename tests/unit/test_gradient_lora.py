"""The gradient LoRA baseline on tiny random-weight llama and gpt2 models with toy splits."""

import json
import math

import pytest
import tiny
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from common.config import RunConfig
from common.errors import ConfigError
from workers.gradient_lora import LoraRun, train_lora
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
    first_best = next(h for h in scored if h["dev"]["accuracy"] == best)  # ties: the earlier
    assert r["best_epoch"] == first_best["epoch"]
    assert r["final"]["dev"]["loss"] == pytest.approx(first_best["dev"]["loss"], rel=1e-6)
    assert r["final"]["dev"]["predicted_counts"] == first_best["dev"]["predicted_counts"]


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
                                 {"epochs": 2.5}, {"progress": 3}])
def test_bad_input_is_one_clear_config_error(bad):
    with pytest.raises(ConfigError, match="gradient LoRA: .* got"):
        train_lora(config(), loaded=tiny.model("llama"), splits=tiny.splits(), **bad)
