"""Task definitions: classes, templates and label words (method.md §3-4). No torch, no I/O.

A template is a format string over the task's text fields (`{text}`, or `{text1}`/`{text2}` for
sentence pairs) plus `{mask}` for masked LMs. Label words are given without a leading space; the
tokenizer-facing code prepends one when `task.label_space` is set (BPE and SentencePiece tokenizers
encode " great" and "great" differently; WordPiece ignores the space).
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from common.errors import ConfigError


@dataclass(frozen=True)
class Template:
    text: str
    label_words: tuple[str, ...]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    classes: tuple[str, ...]
    text_fields: tuple[str, ...]
    causal: dict[str, Template]  # named templates for causal LMs; "default" first
    masked: dict[str, Template]  # named templates for masked LMs
    metric: str = "accuracy"  # or "f1"


_SENTIMENT_WORDS = ("negative", "positive")
_SENTIMENT_CAUSAL = {
    # method.md §4's causal template; the model handles it poorly zero-shot (env.md: 0.61)
    "default": Template("{text} It was", _SENTIMENT_WORDS),
    # an instruction-style template the instruct model understands (env.md: 0.81)
    "instruct": Template("Review: {text}\nSentiment:", _SENTIMENT_WORDS),
}
_SENTIMENT_MASKED = {"default": Template("{text} It was {mask} .", ("bad", "great"))}

TASKS: dict[str, TaskSpec] = {
    "rotten_tomatoes": TaskSpec(
        name="rotten_tomatoes",
        classes=("negative", "positive"),
        text_fields=("text",),
        causal=_SENTIMENT_CAUSAL,
        masked=_SENTIMENT_MASKED,
    ),
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ConfigError(f"task.name: unknown task '{name}'; known: {', '.join(sorted(TASKS))}")
    return TASKS[name]


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
    slots = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    unknown = slots - set(spec.text_fields) - {"mask"}
    if unknown:
        raise ConfigError(f"task.template: unknown slot(s) {sorted(unknown)} in {text!r}")
    if kind == "masked" and "mask" not in slots:
        raise ConfigError(f"task.template: a masked-LM template needs a {{mask}} slot: {text!r}")
    if kind == "causal" and "mask" in slots:
        raise ConfigError(f"task.template: a causal-LM template cannot have {{mask}}: {text!r}")
    if not slots & set(spec.text_fields):
        raise ConfigError(f"task.template: no text slot ({spec.text_fields}) in {text!r}")
