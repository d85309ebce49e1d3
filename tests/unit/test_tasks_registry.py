"""The task registry (docs/design.md §4): templates, label words, rendering; custom tasks."""

from pathlib import Path

import numpy as np
import pytest
import tiny
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from common.config import RunConfig, TaskConfig
from common.data import Example
from common.errors import ConfigError
from common.tasks import TASKS, Template, get_task, resolve_template, task_spec
from workers.batches import Prompter
from workers.worker import EvalWorker

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SENTIMENT = ("negative", "positive")
DBPEDIA = ("Company", "Education", "Artist", "Athlete", "Office", "Transportation", "Building",
           "Natural", "Village", "Animal", "Plant", "Album", "Film", "Written")
# docs/design.md §4, restated: task -> (classes, masked template, causal template, masked words,
# causal words)
TABLE = {
    "sst2": (2, "{text} It was {mask} .", "{text} It was", ("bad", "great"), SENTIMENT),
    "yelp_polarity": (2, "{text} It was {mask} .", "{text} It is", ("bad", "great"), SENTIMENT),
    "ag_news": (4, "{mask} News: {text}", "{text} News:", ("World", "Sports", "Business", "Tech"),
                None),
    "dbpedia": (14, "[ Category: {mask} ] {text}", "{text} The text above is about", DBPEDIA,
                None),
    "mrpc": (2, "{text1} ? {mask} , {text2}", "{text1} the {text2} ? Answer:", ("No", "Yes"),
             None),
    "rte": (2, "{text1} ? {mask} , {text2}", "{text1} {text2} Answer:", ("Yes", "No"), None),
    "snli": (3, "{text1} ? {mask} , {text2}", "{text1} the {text2} ? Answer:",
             ("Yes", "Maybe", "No"), None),
    "rotten_tomatoes": (2, "{text} It was {mask} .", "{text} It was", ("bad", "great"),
                        SENTIMENT),
}
TEXTS = {1: ("the movie was great",), 2: ("the film was great", "the movie was good")}


def test_registry_is_method_table():
    assert set(TASKS) == set(TABLE)
    for name, (n, masked, causal, masked_words, causal_words) in TABLE.items():
        spec = get_task(name)
        assert len(spec.classes) == n
        assert resolve_template(spec, "masked", "default", None) == Template(masked, masked_words)
        assert resolve_template(spec, "causal", "default", None) == Template(
            causal, causal_words or masked_words)
    assert [get_task(t).metric for t in TABLE].count("f1") == 1 and get_task("mrpc").metric == "f1"
    assert {t: get_task(t).test_split for t in TABLE if get_task(t).test_split != "test"} == {
        "sst2": "validation", "mrpc": "validation", "rte": "validation"}
    assert get_task("snli").text_fields == get_task("rte").text_fields == ("text1", "text2")
    # rotten_tomatoes keeps its instruction template for causal LMs
    assert resolve_template(get_task("rotten_tomatoes"), "causal", "instruct", None).text == (
        "Review: {text}\nSentiment:")


SPLIT = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])


def pieces(text: str) -> list[str]:
    """The word-level tokens of `text`, the mask token kept whole."""
    parts = [[p for p, _ in SPLIT.pre_tokenize_str(part)] for part in text.split("[MASK]")]
    return [t for i, part in enumerate(parts) for t in ([] if i == 0 else ["[MASK]"]) + part]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """tests/tiny.py's word-level tokenizer plus every template and label word of the registry."""
    words = list(tiny.WORDS)
    for spec in TASKS.values():
        for template in (*spec.masked.values(), *spec.causal.values()):
            words += pieces(template.text.replace("{", " ").replace("}", " "))
            words += template.label_words
    vocab = {w: i for i, w in enumerate(tiny.SPECIALS + list(dict.fromkeys(words)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = SPLIT
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   mask_token="[MASK]", bos_token="[BOS]", eos_token="[EOS]")


@pytest.mark.parametrize("kind", ["masked", "causal"])
@pytest.mark.parametrize("name", sorted(TABLE))
def test_every_task_renders_and_tokenizes(name, kind):
    tok = word_tokenizer()
    spec = get_task(name)
    template = resolve_template(spec, kind, "default", None)
    prompter = Prompter(tok, kind, spec, template, TaskConfig(name=name), max_length=32)
    texts = TEXTS[len(spec.text_fields)]
    slots = dict(zip(spec.text_fields, texts, strict=True), mask="[MASK]")
    expected = TABLE[name][1 if kind == "masked" else 2].format(**slots)
    assert prompter.render(texts) == expected
    assert all(t in expected for t in texts)
    ids, position = prompter.encode(Example(texts, 0))
    assert tok.convert_ids_to_tokens(ids) == pieces(expected)  # no word lost or unknown
    assert position == (ids.index(tok.mask_token_id) if kind == "masked" else len(ids) - 1)
    assert tok.convert_ids_to_tokens(prompter.label_ids) == list(template.label_words)
    assert len(set(prompter.label_ids)) == len(spec.classes)


def test_pair_task_truncates_the_longer_text_only():
    tok = word_tokenizer()
    spec = get_task("rte")
    template = resolve_template(spec, "masked", "default", None)
    prompter = Prompter(tok, "masked", spec, template, TaskConfig(name="rte"), max_length=12)
    long = " ".join(["great"] * 30)
    ids, position = prompter.encode(Example(("the movie was good", long), 0))
    tokens = tok.convert_ids_to_tokens(ids)
    assert len(ids) <= 12 and tokens[:6] == ["the", "movie", "was", "good", "?", "[MASK]"]
    assert position == 5 and tokens[6] == ","


# -- custom tasks -------------------------------------------------------------------------------

def custom(**task) -> TaskConfig:
    base = {"name": "custom", "train_file": "x.csv", "text_fields": ["question", "answer"],
            "label_field": "ok", "labels": {"no": "No", "yes": "Yes"},
            "template": "{question} ? {mask} , {answer}"}
    return RunConfig.from_dict({"task": base | task}).task


def test_custom_spec_from_config():
    spec = task_spec(custom())
    assert spec.classes == ("no", "yes") and spec.text_fields == ("question", "answer")
    t = resolve_template(spec, "masked", "{question} ? {mask} , {answer}", None)
    assert t == Template("{question} ? {mask} , {answer}", ("No", "Yes"))
    with pytest.raises(ConfigError, match="needs a .mask. slot"):
        resolve_template(task_spec(custom(template="{question} {answer}")), "masked",
                         "{question} {answer}", None)


@pytest.mark.parametrize("change, message", [
    ({"labels": None}, "needs task.labels"),
    ({"train_file": None, "label_field": None}, "needs task.train_file, task.label_field"),
    ({"text_fields": ["a", "b", "c"]}, "one or two distinct columns"),
    ({"template": "default"}, "literal template"),
    ({"name": "sst2"}, "task.labels is for custom tasks"),
])
def test_custom_config_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        task_spec(custom(**change))


def test_config_labels_mapping():
    task = RunConfig.from_dict({"task": {"labels": {1: "bad", 5: "great"}}}).task
    assert task.labels == {"1": "bad", "5": "great"}
    for bad in ({1: 2}, [], {}, {True: "x"}):
        with pytest.raises(ConfigError, match="task.labels"):
            RunConfig.from_dict({"task": {"labels": bad}})


def test_custom_task_from_yaml_and_csv_scores_zero_shot(monkeypatch):
    monkeypatch.chdir(FIXTURES)
    cfg = RunConfig.from_dict(yaml.safe_load((FIXTURES / "custom.yaml").read_text()))
    worker = EvalWorker(cfg, loaded=tiny.model("gpt2"))
    assert [e.texts for e in worker.examples["test"]] == [
        ("the movie was great",), ("the film was bad",), ("brilliant actors",),
        ("a terrible story",)]
    assert [e.label for e in worker.examples["test"]] == [1, 0, 1, 0]
    assert worker.prompter.render(("good plot",)) == "good plot it was"
    assert worker.prompter.tokenizer.convert_ids_to_tokens(worker.prompter.label_ids) == [
        "bad", "great"]
    result = worker.score("test")
    logits, labels = worker.predict("test")
    predicted = logits.argmax(-1)
    assert result["n"] == 4 and result["accuracy"] == (predicted == labels).mean()
    assert result["predicted_counts"] == np.bincount(predicted, minlength=2).tolist()
    assert len(worker.examples["train"]) == len(worker.examples["dev"]) == 4
