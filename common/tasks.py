"""Task definitions: classes, templates and label words (docs/design.md §3-4). No torch, no I/O.

A template is a format string over the task's text fields (`{text}`, or `{text1}`/`{text2}` for
sentence pairs) plus `{mask}` for masked LMs. Label words are given without a leading space; the
tokenizer-facing code prepends one when `task.label_space` is set (BPE and SentencePiece tokenizers
encode " great" and "great" differently; WordPiece ignores the space).

`TASKS` holds the tasks of docs/design.md §4; `task_spec(cfg.task)` also builds a custom task from
its config (`task.text_fields`, `task.labels` mapping label values to words, a literal
`task.template`).
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from common.config import TaskConfig
from common.errors import ConfigError


@dataclass(frozen=True)
class Template:
    text: str
    label_words: tuple  # a word per class, or a tuple of words (logits averaged)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    classes: tuple[str, ...]  # class names; a label value equal to a name (or its index) maps to it
    text_fields: tuple[str, ...]
    causal: dict[str, Template]  # named templates for causal LMs; "default" first
    masked: dict[str, Template]  # named templates for masked LMs
    metric: str = "accuracy"  # or "f1"
    hub: tuple[str, ...] = ()  # `datasets.load_dataset` arguments: hub repository, config
    test_split: str = "test"  # the split scored as test (GLUE tasks: "validation")


CUSTOM = "custom"

_SENTIMENT_WORDS = ("negative", "positive")
_SENTIMENT_CAUSAL = {
    # the paper's causal template `<s> . It was`, written without the " ." between text and
    # prompt: review snippets end with their own punctuation, so " ." would mostly give ". ."
    # (docs/environment.md's and docs/benchmarks.md's figures use this form). Poor zero-shot
    # (docs/environment.md: 0.61).
    "default": Template("{text} It was", _SENTIMENT_WORDS),
    # an instruction-style template the instruct model understands (docs/environment.md: 0.81)
    "instruct": Template("Review: {text}\nSentiment:", _SENTIMENT_WORDS),
}
_SENTIMENT_MASKED = {"default": Template("{text} It was {mask} .", ("bad", "great"))}
_PAIR_MASKED = "{text1} ? {mask} , {text2}"
_PAIR = ("text1", "text2")
_AG_WORDS = ("World", "Sports", "Business", "Tech")
_DBPEDIA_CLASSES = ("Company", "EducationalInstitution", "Artist", "Athlete", "OfficeHolder",
                    "MeanOfTransportation", "Building", "NaturalPlace", "Village", "Animal",
                    "Plant", "Album", "Film", "WrittenWork")
_DBPEDIA_WORDS = ("Company", "Education", "Artist", "Athlete", "Office", "Transportation",
                  "Building", "Natural", "Village", "Animal", "Plant", "Album", "Film", "Written")


def _spec(name, classes, fields, masked, causal, masked_words, causal_words=None, **kw):
    return TaskSpec(name, classes, fields,
                    causal={"default": Template(causal, causal_words or masked_words)},
                    masked={"default": Template(masked, masked_words)}, **kw)


# docs/design.md §4, one row each; the test split is GLUE's validation split for SST-2, MRPC, RTE
TASKS: dict[str, TaskSpec] = {
    "sst2": _spec("sst2", _SENTIMENT_WORDS, ("text",), "{text} It was {mask} .",
                  "{text} It was", ("bad", "great"), _SENTIMENT_WORDS,
                  hub=("nyu-mll/glue", "sst2"), test_split="validation"),
    "yelp_polarity": _spec("yelp_polarity", _SENTIMENT_WORDS, ("text",),
                           "{text} It was {mask} .", "{text} It is", ("bad", "great"),
                           _SENTIMENT_WORDS, hub=("fancyzhx/yelp_polarity",)),
    "ag_news": _spec("ag_news", ("World", "Sports", "Business", "Sci/Tech"), ("text",),
                     "{mask} News: {text}", "{text} News:", _AG_WORDS, hub=("fancyzhx/ag_news",)),
    "dbpedia": _spec("dbpedia", _DBPEDIA_CLASSES, ("text",), "[ Category: {mask} ] {text}",
                     "{text} The text above is about", _DBPEDIA_WORDS,
                     hub=("fancyzhx/dbpedia_14",)),
    "mrpc": _spec("mrpc", ("not_equivalent", "equivalent"), _PAIR, _PAIR_MASKED,
                  "{text1} the {text2} ? Answer:", ("No", "Yes"), metric="f1",
                  hub=("nyu-mll/glue", "mrpc"), test_split="validation"),
    "rte": _spec("rte", ("entailment", "not_entailment"), _PAIR, _PAIR_MASKED,
                 "{text1} {text2} Answer:", ("Yes", "No"), hub=("nyu-mll/glue", "rte"),
                 test_split="validation"),
    "snli": _spec("snli", ("entailment", "neutral", "contradiction"), _PAIR, _PAIR_MASKED,
                  "{text1} the {text2} ? Answer:", ("Yes", "Maybe", "No"),
                  hub=("stanfordnlp/snli",)),
    "rotten_tomatoes": TaskSpec(
        name="rotten_tomatoes",
        classes=("negative", "positive"),
        text_fields=("text",),
        causal=_SENTIMENT_CAUSAL,
        masked=_SENTIMENT_MASKED,
    ),
}


def get_task(name: str) -> TaskSpec:
    if name == CUSTOM:
        raise ConfigError("task.name: a custom task is defined by its config; use task_spec()")
    if name not in TASKS:
        raise ConfigError(f"task.name: unknown task '{name}'; known: "
                          f"{', '.join(sorted(TASKS))}, or {CUSTOM}")
    return TASKS[name]


def task_spec(task: TaskConfig) -> TaskSpec:
    """The registry entry of `task.name`, or the spec a custom task's config defines."""
    if task.name != CUSTOM:
        if task.labels is not None:
            raise ConfigError(f"task.labels is for custom tasks; {task.name}'s label values are "
                              "its class names or their 0-based indices (task.label_words "
                              "changes the words)")
        return get_task(task.name)
    missing = [key for key in ("train_file", "text_fields", "label_field", "labels")
               if getattr(task, key) is None]
    if missing:
        raise ConfigError(f"task.name=custom needs task.{', task.'.join(missing)}")
    if len(task.text_fields) not in (1, 2) or len(set(task.text_fields)) != len(task.text_fields):
        raise ConfigError(f"task.text_fields: one or two distinct columns, got "
                          f"{list(task.text_fields)}")
    if "{" not in task.template:
        raise ConfigError(f"task.template: a custom task needs a literal template with "
                          f"{{field}} slots (and {{mask}} for masked LMs), got {task.template!r}")
    # the literal is the task's only named template, so resolve_template finds the words
    template = {task.template: Template(task.template, tuple(task.labels.values()))}
    return TaskSpec(CUSTOM, tuple(task.labels), tuple(task.text_fields), causal=template,
                    masked=template)


def resolve_template(
    spec: TaskSpec, kind: str, template: str, label_words: tuple[str, ...] | None
) -> Template:
    """The template and label words to use for a model of `kind` ("causal" or "masked")."""
    named = spec.causal if kind == "causal" else spec.masked
    if template in named:
        chosen = named[template]
    elif "{" in template:
        if label_words is None:
            raise ConfigError("task.label_words must be given with a literal task.template")
        chosen = Template(template, label_words)
    else:
        raise ConfigError(
            f"task.template: '{template}' is neither a named {kind}-LM template of "
            f"{spec.name} ({', '.join(named)}) nor a literal with {{field}} slots"
        )
    words = label_words or chosen.label_words
    if len(words) != len(spec.classes):
        raise ConfigError(
            f"task.label_words: {spec.name} has {len(spec.classes)} classes, got {len(words)} words"
        )
    _check_slots(chosen.text, spec, kind)
    return Template(chosen.text, tuple(words))


def _check_slots(text: str, spec: TaskSpec, kind: str) -> None:
    try:
        slots = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as err:  # e.g. a single '}'; literal braces are written {{ and }}
        raise ConfigError(f"task.template: {err}: {text!r}") from None
    unknown = slots - set(spec.text_fields) - {"mask"}
    if unknown:
        raise ConfigError(f"task.template: unknown slot(s) {sorted(unknown)} in {text!r}")
    if kind == "masked" and "mask" not in slots:
        raise ConfigError(f"task.template: a masked-LM template needs a {{mask}} slot: {text!r}")
    if kind == "causal" and "mask" in slots:
        raise ConfigError(f"task.template: a causal-LM template cannot have {{mask}}: {text!r}")
    if not slots & set(spec.text_fields):
        raise ConfigError(f"task.template: no text slot ({spec.text_fields}) in {text!r}")
