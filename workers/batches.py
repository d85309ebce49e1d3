"""Prompting and tokenisation: template + label words -> padded, length-bucketed batches.

Each example records the position whose logits are scored: the mask token for masked LMs, the
last real token for causal LMs (docs/design.md §3; batches are right-padded and the position is
gathered, so pad tokens are never scored). Over-long texts lose tokens from their text part only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from common.config import TaskConfig
from common.data import Example
from common.errors import ConfigError
from common.tasks import TaskSpec, Template


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T), right-padded
    attention_mask: torch.Tensor  # (B, T)
    positions: torch.Tensor  # (B,) index of the scored token
    labels: torch.Tensor  # (B,)

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask,
                                               self.positions, self.labels)))


class Prompter:
    """Renders and tokenises examples of one task for one tokenizer and model kind."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, kind: str, spec: TaskSpec,
                 template: Template, task: TaskConfig, max_length: int):
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self.tokenizer, self.kind, self.spec, self.template = tokenizer, kind, spec, template
        self.max_length = max_length
        if kind == "masked" and tokenizer.mask_token is None:
            raise ConfigError("model.kind is masked but the tokenizer has no mask token")
        self.label_ids = label_token_ids(tokenizer, template.label_words, task)

    def render(self, texts: tuple[str, ...]) -> str:
        slots = dict(zip(self.spec.text_fields, texts, strict=True))
        if self.kind == "masked":
            slots["mask"] = self.tokenizer.mask_token
        return self.template.text.format(**slots)

    def encode(self, example: Example) -> tuple[list[int], int]:
        """Token ids and the scored position; truncates the longest text until it fits."""
        texts = list(example.texts)
        for _ in range(8):
            ids = self.tokenizer(self.render(tuple(texts)))["input_ids"]
            if len(ids) <= self.max_length:
                return ids, self._position(ids)
            longest = max(range(len(texts)), key=lambda i: len(texts[i]))
            text_ids = self.tokenizer(texts[longest], add_special_tokens=False)["input_ids"]
            keep = max(0, len(text_ids) - (len(ids) - self.max_length) - 1)
            if not text_ids:
                break
            texts[longest] = self.tokenizer.decode(text_ids[:keep])
        raise ConfigError(
            f"model.max_length={self.max_length} is too short for template "
            f"{self.template.text!r} even with the text truncated"
        )

    def _position(self, ids: list[int]) -> int:
        if self.kind == "causal":
            return len(ids) - 1
        hits = [i for i, t in enumerate(ids) if t == self.tokenizer.mask_token_id]
        if len(hits) != 1:
            raise ConfigError(f"template must yield exactly one mask token, got {len(hits)}")
        return hits[0]

    def batches(self, examples: list[Example], batch_size: int) -> list[Batch]:
        """Batches of examples of similar length (less padding); order inside is by length."""
        encoded = [self.encode(e) + (e.label,) for e in examples]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
        pad = self.tokenizer.pad_token_id
        out = []
        for start in range(0, len(order), batch_size):
            rows = [encoded[i] for i in order[start : start + batch_size]]
            width = max(len(ids) for ids, _, _ in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, (ids, _, _) in enumerate(rows):
                input_ids[r, : len(ids)] = torch.tensor(ids)
                mask[r, : len(ids)] = 1
            positions = torch.tensor([p for _, p, _ in rows])
            labels = torch.tensor([y for _, _, y in rows])
            out.append(Batch(input_ids, mask, positions, labels))
        return out


def label_token_ids(tokenizer: PreTrainedTokenizerBase, words: tuple,
                    task: TaskConfig) -> list[int | tuple[int, ...]]:
    """One token id per class, or a tuple of ids for a class given a list of words (their logits
    are averaged by the label head, workers/fastpath.py)."""
    ids: list[int | tuple[int, ...]] = []
    flat: list[int] = []
    for entry in words:
        if isinstance(entry, str):
            ids.append(_word_id(tokenizer, entry, task))
            flat.append(ids[-1])
        else:
            ids.append(tuple(_word_id(tokenizer, word, task) for word in entry))
            flat.extend(ids[-1])
    if len(set(flat)) != len(flat):
        raise ConfigError(f"task.label_words {_plain(words)} map to the same token")
    return ids


def _word_id(tokenizer: PreTrainedTokenizerBase, word: str, task: TaskConfig) -> int:
    text = " " + word if task.label_space and not word.startswith(" ") else word
    pieces = in_context_ids(tokenizer, text)
    if not pieces or (len(pieces) > 1 and task.label_token != "first"):
        shown = tokenizer.convert_ids_to_tokens(pieces)
        raise ConfigError(
            f"task.label_words: {text!r} is {len(pieces)} tokens {shown} after the prompt; "
            "choose a single-token word (e.g. a common one), or set task.label_token=first "
            "to score its first token"
            + ("" if task.label_space else ", or task.label_space=true"))
    return pieces[0]


ANCHOR = "a"  # a one-piece word in every vocabulary we have met; see in_context_ids


def in_context_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """The ids `text` gets where it follows other text, as a label word follows the prompt.

    Tokenising `text` alone is not that for SentencePiece-style tokenizers (Llama-2, Mistral,
    T5: a `▁` word-boundary piece is put before the start of every input), where " great" alone
    becomes ['▁', '▁great'] instead of the in-context ['▁great']. So a text that starts with a
    space is tokenised after an anchor word and the anchor's ids are dropped; byte-level BPE
    (GPT-2, Llama-3, SmolLM) gives the same ids either way (docs/design.md §3, label words).
    """
    alone = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not text.startswith(" "):
        return alone
    anchor = tokenizer(ANCHOR, add_special_tokens=False)["input_ids"]
    both = tokenizer(ANCHOR + text, add_special_tokens=False)["input_ids"]
    if both[: len(anchor)] != anchor:  # the anchor merged with the text: keep the plain ids
        return alone
    return both[len(anchor):]


def _plain(words: tuple) -> list:
    return [w if isinstance(w, str) else list(w) for w in words]
