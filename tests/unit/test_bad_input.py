"""Every user mistake ends in one readable line: a `DfoloraError` naming the key or value at fault.

Models are the tiny random ones of tests/tiny.py; nothing is downloaded. The machine has no
network, and huggingface_hub retries an unreachable hub for ~25 s, so the hub-name case runs in
offline mode (huggingface_hub reads HF_HUB_OFFLINE once, at import, hence the setattr as well).
"""

import json
import math
import shutil
import time

import huggingface_hub.constants
import numpy as np
import pytest
import tiny

from common import data
from common.config import ModelConfig, RunConfig
from common.errors import ConfigError, DataError, DfoloraError, ModelError
from orchestrator import cli
from workers import models
from workers.worker import EvalWorker

DIM = 500  # the default adapter.dim
MASKED_TEMPLATE = "{text} it was {mask} ."
CAUSAL_TEMPLATE = "{text} it was"


def config(family: str = "gpt2", **sections) -> RunConfig:
    masked = family in tiny.MASKED
    cfg = {"task": {"template": MASKED_TEMPLATE if masked else CAUSAL_TEMPLATE,
                    "label_words": ["bad", "great"], "k": 4},
           "eval": {"batch_size": 4, "max_stack_tokens": 200}}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return RunConfig.from_dict(cfg)


def make_worker(family: str = "gpt2", layers: int = 3, **sections) -> EvalWorker:
    return EvalWorker(config(family, **sections), loaded=tiny.model(family, layers),
                      splits=tiny.splits())


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message, f"not one line: {message!r}"
    assert "Traceback" not in message
    return message


# -- model name -----------------------------------------------------------------------------

def test_missing_local_model_folder():
    with pytest.raises(ModelError) as err:
        models.load(ModelConfig(name="/nonexistent/model-dir"))
    assert "'/nonexistent/model-dir'" in one_line(err)
    assert "model.name" in str(err.value)


def test_unknown_hub_name_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(ModelError) as err:
        models.load(ModelConfig(name="no-such-org/no-such-model-xyz"))
    assert time.perf_counter() - start < 30
    assert "'no-such-org/no-such-model-xyz'" in one_line(err)


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory):
    """A tiny gpt2 saved as a local model folder (its weights are damaged per test)."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    loaded = tiny.model("gpt2", layers=1)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


def test_saved_folder_loads(saved_gpt2):
    assert models.load(ModelConfig(name=str(saved_gpt2))).kind == "causal"


@pytest.mark.parametrize("case, needle", [
    ("empty", "model_type"),
    ("bad-json", "not a valid JSON file"),
    ("wrong-kind", "AutoModelForMaskedLM"),
    ("corrupt-weights", "header"),
    ("no-weights", "model.safetensors"),
])
def test_broken_model_folder(tmp_path, saved_gpt2, case, needle):
    folder = tmp_path / case
    kind = "auto"
    if case == "empty":
        folder.mkdir()
    elif case == "bad-json":
        folder.mkdir()
        (folder / "config.json").write_text("{not json")
    else:
        shutil.copytree(saved_gpt2, folder)
        weights = folder / "model.safetensors"
        if case == "wrong-kind":
            kind = "masked"
        elif case == "corrupt-weights":
            weights.write_bytes(b"garbage")
        else:
            weights.unlink()
    with pytest.raises(ModelError) as err:
        models.load(ModelConfig(name=str(folder), kind=kind))
    message = one_line(err)
    assert f"'{folder}'" in message and needle in message


@pytest.mark.parametrize("device", ["nonsense", "cuda:99"])
def test_bad_device(device, monkeypatch):
    monkeypatch.setattr(models.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError) as err:
        models.resolve_device(device)
    assert device.split(":")[0] in one_line(err) and "model.device" in str(err.value)


def test_cli_reports_one_error_line(capsys, tmp_path):
    assert cli.main(["zero-shot", "--set", "model.name=/nonexistent/x", "--set",
                     "task.max_test=5", "--out", str(tmp_path / "z")]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "'/nonexistent/x'" in errors[0]
    assert err.rstrip().splitlines()[-1] == errors[0]


def test_cli_config_error_is_one_line(capsys, tmp_path):
    assert cli.main(["zero-shot", "--set", "model.name=/nonexistent/x", "--set", "task.k=0",
                     "--out", str(tmp_path / "z")]) == 2
    _, err = capsys.readouterr()
    assert err.strip() == "error: task.k must be > 0, got 0"


# -- templates and label words ----------------------------------------------------------------

def test_masked_template_without_mask():
    with pytest.raises(ConfigError) as err:
        make_worker("roberta", task={"template": CAUSAL_TEMPLATE})
    message = one_line(err)
    assert "task.template" in message and "{mask}" in message and CAUSAL_TEMPLATE in message


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_causal_template_with_mask(family):
    with pytest.raises(ConfigError) as err:
        make_worker(family, task={"template": MASKED_TEMPLATE})
    message = one_line(err)
    assert "task.template" in message and "{mask}" in message


@pytest.mark.parametrize("template, words, needle", [
    ("{txt} it was", ["bad", "great"], "txt"),  # a slot the task does not have
    ("it was {{text}}", ["bad", "great"], "no text slot"),  # only an escaped slot
    ("{text} it was", None, "task.label_words"),  # literal without label words
    ("{text} it was", ["bad", "good", "great"], "2 classes, got 3"),
    ("no-such-template", ["bad", "great"], "no-such-template"),
])
def test_bad_literal_templates(template, words, needle):
    with pytest.raises(ConfigError) as err:
        make_worker("gpt2", task={"template": template, "label_words": words})
    assert needle in one_line(err)


def test_multi_token_label_word_needs_label_token_first():
    # the tiny tokenizer maps unknown words to one [UNK]; a space makes two word tokens
    with pytest.raises(ConfigError) as err:
        make_worker("gpt2", task={"label_words": ["bad", "good movie"]})
    message = one_line(err)
    assert "task.label_token" in message and "good movie" in message and "2 tokens" in message
    worker = make_worker("gpt2", layers=1, task={"label_words": ["bad", "good movie"],
                                       "label_token": "first"})
    tok = worker.prompter.tokenizer
    assert worker.prompter.label_ids == tok.convert_tokens_to_ids(["bad", "good"])


def test_label_words_sharing_a_token():
    with pytest.raises(ConfigError) as err:
        make_worker("gpt2", task={"label_words": ["good movie", "good film"],
                                  "label_token": "first"})
    assert "same token" in one_line(err)


# -- data -------------------------------------------------------------------------------------

def test_too_few_examples_in_a_class():
    pool = ([data.Example((f"neg {i}",), 0) for i in range(3)]
            + [data.Example((f"pos {i}",), 1) for i in range(10)])
    assert len(data.few_shot_split(pool, seed=0, k=1)[0]) == 2
    with pytest.raises(DataError) as err:
        data.few_shot_split(pool, seed=0, k=2)
    message = one_line(err)
    assert "class 0 has 3" in message and "k=2 needs 4" in message


def test_unreadable_corpus(tmp_path):
    broken = tmp_path / "corpus.csv.bz2"
    broken.write_bytes(b"not bz2 at all")
    with pytest.raises(DataError) as err:
        data.load_rotten_tomatoes(broken)
    assert str(broken) in one_line(err)


# -- vectors given to the worker --------------------------------------------------------------

@pytest.fixture(scope="module")
def worker():
    return make_worker("gpt2")


@pytest.mark.parametrize("vector, needle", [
    (np.zeros(DIM - 1), "(499,)"),
    (np.zeros(DIM + 4), "(504,)"),
    (np.zeros((1, DIM)), "(1, 500)"),
    (np.zeros(()), "()"),
    ([0.0] * 3, "(3,)"),
])
def test_commit_rejects_wrong_shape(worker, vector, needle):
    with pytest.raises(DfoloraError) as err:
        worker.commit(0, vector)
    message = one_line(err)
    assert needle in message and "d = 500" in message and "layer 0" in message
    assert 0 not in worker.committed


@pytest.mark.parametrize("vector, needle", [
    (np.zeros(DIM), "(500,)"),
    (np.zeros((2, DIM - 1)), "(2, 499)"),
    (np.zeros((1, 2, DIM)), "(1, 2, 500)"),
])
def test_evaluate_rejects_wrong_shape(worker, vector, needle):
    with pytest.raises(DfoloraError) as err:
        worker.evaluate(1, vector)
    message = one_line(err)
    assert needle in message and "(n, d)" in message and "layer 1" in message


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_vectors(worker, bad):
    z = np.zeros(DIM)
    z[7] = bad
    with pytest.raises(DfoloraError) as err:
        worker.commit(2, z)
    assert "non-finite" in one_line(err) and "layer 2" in str(err.value)
    with pytest.raises(DfoloraError, match="non-finite"):
        worker.evaluate(2, np.stack([np.zeros(DIM), z]))
    assert 2 not in worker.committed


@pytest.mark.parametrize("layer", [-1, 3, 100, "0", 1.0, None])
def test_layer_out_of_range(worker, layer):
    for call, vector in ((worker.commit, np.zeros(DIM)), (worker.evaluate, np.zeros((2, DIM)))):
        with pytest.raises(DfoloraError) as err:
            call(layer, vector)
        message = one_line(err)
        assert f"layer {layer!r} out of range" in message and "has 3" in message
    assert worker.committed == {}


def test_worker_still_works_after_rejections(worker):
    z = np.random.default_rng(0).standard_normal((2, DIM))
    before = worker.evaluate(1, z).losses
    for bad in (np.zeros(DIM - 1), np.full(DIM, np.nan)):
        with pytest.raises(DfoloraError):
            worker.commit(1, bad)
    np.testing.assert_array_equal(worker.evaluate(1, z).losses, before)


# -- configuration ----------------------------------------------------------------------------

def config_error(data) -> str:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict(data)
    return one_line(err)


@pytest.mark.parametrize("data, expected", [
    ({"sead": 1}, "unknown config key 'sead' (did you mean 'seed'?)"),
    ({"adaptor": {}}, "unknown config key 'adaptor' (did you mean 'adapter'?)"),
    ({"task": {"kk": 3}}, "unknown config key 'task.kk' (did you mean 'task.k'?)"),
    ({"adapter": {"rnak": 2}}, "unknown config key 'adapter.rnak' (did you mean 'adapter.rank'?)"),
    ({"eval": {"zzz": 1}}, "unknown config key 'eval.zzz'"),
    ({"task": {"a\nb": 1}}, "unknown config key 'task.a\\nb'"),  # still one line
    ({3: 1}, "unknown config key '3'"),
])
def test_unknown_key_with_hint(data, expected):
    assert config_error(data) == expected


def test_unknown_key_in_replace():
    with pytest.raises(ConfigError, match="'task.k.x'"):
        RunConfig().replace(**{"task.k.x": 1})
    with pytest.raises(ConfigError, match="did you mean 'task.k'"):
        RunConfig().replace(**{"task.kk": 1})


@pytest.mark.parametrize("data, needle", [
    ({"task": {"k": "x"}}, "task.k must be int, got 'x'"),
    ({"task": {"k": True}}, "task.k must be int, got True"),
    ({"task": {"k": 4.0}}, "task.k must be int, got 4.0"),
    ({"seed": None}, "seed must be int, got None"),
    ({"model": {"name": 3}}, "model.name must be str, got 3"),
    ({"adapter": {"alpha": "1"}}, "adapter.alpha must be float, got '1'"),
    ({"adapter": {"alpha": False}}, "adapter.alpha must be float, got False"),
    ({"task": {"label_words": "bad"}}, "task.label_words must be a non-empty list, got 'bad'"),
    ({"task": {"label_words": []}}, "task.label_words must be a non-empty list"),
    ({"task": {"label_words": ["bad", 1]}}, "task.label_words[1] must be str, got 1"),
    ({"adapter": {"ratio_bounds": [0.1, "x"]}}, "adapter.ratio_bounds[1] must be float"),
    ({"task": {"max_test": "all"}}, "task.max_test must be int, got 'all'"),
    ({"model": "gpt2"}, "'model' must be a mapping, got 'gpt2'"),
    ("seed: 1", "'config' must be a mapping"),
    ([], "'config' must be a mapping, got []"),
])
def test_wrong_type(data, needle):
    assert needle in config_error(data)


@pytest.mark.parametrize("data, needle", [
    ({"adapter": {"dim": 10}}, "adapter.dim must be divisible by 4, got 10"),
    ({"adapter": {"dim": 0}}, "adapter.dim must be > 0, got 0"),
    ({"adapter": {"rank": -2}}, "adapter.rank must be > 0, got -2"),
    ({"optimizer": {"sigma0": 0}}, "optimizer.sigma0 must be > 0, got 0.0"),
    ({"optimizer": {"sigma0": -0.5}}, "optimizer.sigma0 must be > 0, got -0.5"),
    ({"optimizer": {"sigma0": math.nan}}, "optimizer.sigma0 must be a finite number, got nan"),
    ({"optimizer": {"sigma0": 10**400}}, "optimizer.sigma0"),  # too large for a float
    ({"adapter": {"ratio_bounds": [1.0, 0.1]}}, "adapter.ratio_bounds must be [low, high]"),
    ({"adapter": {"ratio_bounds": [0.0, 1.0]}}, "got [0.0, 1.0]"),
    ({"adapter": {"ratio_bounds": [0.1, 0.5, 1.0]}}, "got [0.1, 0.5, 1.0]"),
    ({"task": {"k": 0}}, "task.k must be > 0, got 0"),
    ({"task": {"max_test": 0}}, "task.max_test must be >= 1 or null, got 0"),
    ({"model": {"max_length": -1}}, "model.max_length must be > 0, got -1"),
    ({"eval": {"batch_size": 0}}, "eval.batch_size must be > 0, got 0"),
    ({"seed": -1}, "seed must be >= 0, got -1"),
])
def test_out_of_range(data, needle):
    assert needle in config_error(data)


@pytest.mark.parametrize("key, value", [
    ("adapter.init", "foo"), ("eval.loss", "mse"), ("model.kind", "seq2seq"),
    ("model.dtype", "int8"), ("task.label_token", "last"),
])
def test_invalid_choice(key, value):
    section, leaf = key.split(".")
    message = config_error({section: {leaf: value}})
    assert message.startswith(f"{key} must be one of ") and repr(value) in message


def test_valid_values_pass():
    cfg = RunConfig.from_dict({"seed": 0, "adapter": {"dim": 8, "ratio_bounds": None,
                                                      "alpha": 2},
                               "task": {"max_test": None, "label_token": "first"}})
    assert cfg.adapter.alpha == 2.0 and isinstance(cfg.adapter.alpha, float)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert RunConfig.from_dict(None) == RunConfig.from_dict({}) == RunConfig()
