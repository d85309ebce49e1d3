"""Tiny random-weight models of every supported family, with a word-level tokenizer built here.

Nothing is downloaded: configs and the tokenizer are made in memory (docs/environment.md).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    RobertaConfig,
)

from common.data import Example, Splits
from workers.models import LoadedModel, prepare

WORDS = ("the a movie film was is it great bad good terrible fun dull plot actors story "
         "review sentiment positive negative boring brilliant . , : !").split()
SPECIALS = ["[PAD]", "[UNK]", "[MASK]", "[BOS]", "[EOS]"]
FAMILIES = ("llama", "gpt2", "roberta", "bert")


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIALS + list(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   mask_token="[MASK]", bos_token="[BOS]", eos_token="[EOS]")


def model(family: str, layers: int = 3) -> LoadedModel:
    torch.manual_seed(0)
    tok = tokenizer()
    vocab = len(tok)
    common = dict(vocab_size=vocab, pad_token_id=0)
    if family == "llama":  # grouped-query attention: 4 query heads, 2 key/value heads
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=64, **common)
    elif family == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=64, **common)
    elif family == "roberta":
        cfg = RobertaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=70, **common)
    else:
        cfg = BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64, **common)
    kind = "causal" if family in ("llama", "gpt2") else "masked"
    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForMaskedLM
    net = auto.from_config(cfg)
    return LoadedModel(prepare(net, torch.device("cpu")), tok, kind, torch.device("cpu"))


def splits(k: int = 4, n_test: int = 10) -> Splits:
    """Toy sentiment examples of varied length (so batches need padding)."""
    pos = ["great fun", "a brilliant movie", "the story was good and the actors great",
           "good plot", "fun fun film", "brilliant actors", "a good story", "great film !",
           "the movie is brilliant", "good good good"]
    neg = ["bad", "a dull movie", "the plot was terrible and the actors bad", "boring film",
           "terrible story", "dull dull", "bad actors", "a boring plot .", "the film is bad",
           "terrible"]

    def take(items, label, lo, hi):
        return [Example((t,), label) for t in items[lo:hi]]

    train = take(pos, 1, 0, k) + take(neg, 0, 0, k)
    dev = take(pos, 1, k, 2 * k) + take(neg, 0, k, 2 * k)
    test = take(pos, 1, 2 * k, 2 * k + n_test // 2) + take(neg, 0, 2 * k, 2 * k + n_test // 2)
    return Splits(train, dev, test)
