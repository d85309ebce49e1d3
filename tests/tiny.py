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
    DistilBertConfig,
    ElectraConfig,
    FalconConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    RobertaConfig,
    XLMRobertaConfig,
)

from common.data import Example, Splits
from workers.models import LoadedModel, prepare

WORDS = ("the a movie film was is it great bad good terrible fun dull plot actors story "
         "review sentiment positive negative boring brilliant . , : !").split()
SPECIALS = ["[PAD]", "[UNK]", "[MASK]", "[BOS]", "[EOS]"]
# every worker test runs on these; MORE are families checked by the output-path tests only
FAMILIES = ("llama", "gpt2", "roberta", "bert", "electra", "gemma2", "gemma3", "distilbert",
            "opt", "phi3", "gpt_neox", "falcon")
MORE = ("qwen2", "qwen3", "mistral", "xlm-roberta")
MASKED = ("roberta", "bert", "electra", "xlm-roberta", "distilbert")
FUSED = ("gpt2", "phi3", "gpt_neox", "falcon")  # q, k and v in one module: adapter rank 2r
SOFTCAP = 0.5  # Gemma's final-logit soft-capping, small enough to matter on random logits


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
    cfg = config(family, layers, len(tok))
    kind = "masked" if family in MASKED else "causal"
    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForMaskedLM
    net = auto.from_config(cfg)
    return LoadedModel(prepare(net, torch.device("cpu")), tok, kind, torch.device("cpu"))


def config(family: str, layers: int, vocab: int):
    common = dict(vocab_size=vocab, pad_token_id=0)
    encoder = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                   intermediate_size=64, **common)
    # grouped-query attention: 4 query heads, 2 key/value heads
    decoder = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                   **common)
    alternating = ["sliding_attention", "full_attention"] * layers
    if family == "gpt2":
        return GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=64, **common)
    if family in ("roberta", "xlm-roberta"):  # two positions reserved
        cls = RobertaConfig if family == "roberta" else XLMRobertaConfig
        return cls(max_position_embeddings=70, **encoder)
    if family == "bert":
        return BertConfig(max_position_embeddings=64, **encoder)
    if family == "electra":  # the generator: a prediction head (dense, gelu, LayerNorm) first;
        # embedding size = hidden size, so a head that skips it is silently wrong (head.py); and
        # a wider init than 0.02, at which layer 0 barely moves the loss
        return ElectraConfig(embedding_size=32, max_position_embeddings=64, initializer_range=0.2,
                             **encoder)
    if family == "gemma2":
        return Gemma2Config(head_dim=8, sliding_window=4, final_logit_softcapping=SOFTCAP,
                            layer_types=alternating[:layers], **decoder)
    if family == "gemma3":
        return Gemma3TextConfig(head_dim=8, sliding_window=4, final_logit_softcapping=SOFTCAP,
                                layer_types=alternating[:layers], **decoder)
    if family in ("qwen2", "qwen3"):
        cls = Qwen2Config if family == "qwen2" else Qwen3Config
        return cls(layer_types=["full_attention"] * layers, **decoder)
    if family == "distilbert":
        return DistilBertConfig(dim=32, n_layers=layers, n_heads=4, hidden_dim=64,
                                max_position_embeddings=64, **common)
    if family == "opt":  # word embeddings narrower than the layers: project_in / project_out
        return OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=layers,
                         num_attention_heads=4, max_position_embeddings=64,
                         word_embed_proj_dim=16, **common)
    if family == "phi3":  # fused qkv_proj, grouped-query
        return Phi3Config(bos_token_id=3, eos_token_id=4, **decoder)
    if family == "gpt_neox":  # fused query_key_value, q/k/v interleaved per head
        return GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                             num_attention_heads=4, max_position_embeddings=64, **common)
    if family == "falcon":  # the new decoder architecture: q/k/v interleaved per key group
        return FalconConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                            num_kv_heads=2, new_decoder_architecture=True,
                            max_position_embeddings=64, **common)
    if family == "mistral":
        return MistralConfig(sliding_window=4, **decoder)
    return LlamaConfig(**decoder)


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
