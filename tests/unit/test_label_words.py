"""Label words become the piece the model predicts after the prompt, for every tokenizer style."""

from __future__ import annotations

import pytest
import tiny
from tokenizers import Tokenizer, models, normalizers
from transformers import PreTrainedTokenizerFast

from common.config import TaskConfig
from common.errors import ConfigError
from workers.batches import in_context_ids, label_token_ids

PIECES = ["<unk>", "<pad>", "▁", "▁a", "▁It", "▁was", "▁great", "▁terrible", "▁good", "▁bad",
          "▁terr", "ible"]


def sentencepiece_style(pieces: list[str] = PIECES) -> PreTrainedTokenizerFast:
    """A Llama-2-like tokenizer: its normaliser puts `▁` before the input and for every space,
    then pieces are matched longest first (greedy, as a unigram model with these pieces would)."""
    tok = Tokenizer(models.WordPiece({p: i for i, p in enumerate(pieces)}, unk_token="<unk>",
                                     continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")


def test_a_leading_space_alone_is_split_off_by_sentencepiece():
    tok = sentencepiece_style()  # the failure this guards against, shown on the tokenizer itself
    assert tok.convert_ids_to_tokens(tok(" great", add_special_tokens=False)["input_ids"]) == [
        "▁", "▁great"]


def test_sentencepiece_label_words_are_the_in_context_piece():
    tok = sentencepiece_style()
    ids = label_token_ids(tok, ("terrible", "great"), TaskConfig())
    assert tok.convert_ids_to_tokens(ids) == ["▁terrible", "▁great"]
    # the same piece the prompt + word gets when tokenised as one text
    prompt = tok("It was great", add_special_tokens=False)["input_ids"]
    assert prompt[-1] == ids[1]


def test_word_lists_per_class_use_the_same_rule():
    tok = sentencepiece_style()
    ids = label_token_ids(tok, (["terrible", "bad"], ["great", "good"]), TaskConfig())
    assert [tok.convert_ids_to_tokens(list(i)) for i in ids] == [
        ["▁terrible", "▁bad"], ["▁great", "▁good"]]


def test_word_level_and_bpe_style_ids_are_unchanged():
    tok = tiny.tokenizer()
    for word in ("great", "bad", "positive"):
        assert in_context_ids(tok, " " + word) == tok(" " + word, add_special_tokens=False)[
            "input_ids"]


def test_a_word_of_two_pieces_names_what_to_set():
    tok = sentencepiece_style([p for p in PIECES if p != "▁terrible"])
    pieces = ["▁terr", "ible"]
    with pytest.raises(ConfigError, match="2 tokens.*task.label_token=first") as err:
        label_token_ids(tok, ("terrible", "great"), TaskConfig())
    assert str(pieces) in str(err.value)
    first = label_token_ids(tok, ("terrible", "great"), TaskConfig(label_token="first"))
    assert tok.convert_ids_to_tokens(first) == ["▁terr", "▁great"]
