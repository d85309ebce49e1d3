"""Task data, few-shot splits, templates and tokenisation, losses and metrics, derived seeds."""

from collections import Counter

import numpy as np
import pytest
import tiny
import torch

from common import data
from common.config import TaskConfig
from common.data import Example
from common.errors import ConfigError
from common.seeding import derive_seed
from common.tasks import Template, get_task, resolve_template
from workers.batches import Prompter
from workers.scoring import classification_metrics, example_losses, f1_score

SPEC = get_task("rotten_tomatoes")


# -- rotten_tomatoes --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus():
    """The corpus read once; the split functions below reuse it (reading takes ~0.3 s)."""
    examples = data.load_rotten_tomatoes()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "load_rotten_tomatoes", lambda path=None: list(examples))
        yield examples


def texts(examples):
    return [e.texts for e in examples]


def test_corpus_size_and_labels(corpus):
    assert len(corpus) == 12_752
    assert Counter(e.label for e in corpus) == {1: 7368, 0: 5384}
    assert len({e.texts for e in corpus}) == len(corpus)  # de-duplicated
    assert all(len(e.texts) == 1 and e.texts[0] == e.texts[0].strip() for e in corpus)


def test_splits_are_deterministic(corpus):
    a = data.rotten_tomatoes_splits(1, 16, 1000)
    b = data.rotten_tomatoes_splits(1, 16, 1000)
    assert a == b


def test_seed_changes_train_and_dev_not_test(corpus):
    a = data.rotten_tomatoes_splits(1, 16, 1000)
    b = data.rotten_tomatoes_splits(2, 16, 1000)
    assert set(texts(a.train)) != set(texts(b.train))
    assert set(texts(a.dev)) != set(texts(b.dev))
    assert a.test == b.test
    assert data.rotten_tomatoes_splits(3, 4, None).test == data.rotten_tomatoes_splits(
        4, 8, None).test


@pytest.mark.parametrize("seed, k", [(0, 16), (42, 4), (7, 32)])
def test_splits_are_class_balanced_and_disjoint(corpus, seed, k):
    s = data.rotten_tomatoes_splits(seed, k, None)
    assert Counter(e.label for e in s.train) == {0: k, 1: k}
    assert Counter(e.label for e in s.dev) == {0: k, 1: k}
    train, dev, test = set(texts(s.train)), set(texts(s.dev)), set(texts(s.test))
    assert len(train) == len(s.train) == 2 * k and len(dev) == len(s.dev) == 2 * k
    assert not train & dev and not train & test and not dev & test
    assert len(s.test) == int(len(corpus) * data.TEST_FRACTION)


@pytest.mark.parametrize("cap", [1000, 101, 2])
def test_test_cap_is_stratified_and_fixed(corpus, cap):
    full = data.rotten_tomatoes_splits(0, 16, None).test
    capped = data.rotten_tomatoes_splits(0, 16, cap).test
    assert len(capped) == cap
    assert set(texts(capped)) <= set(texts(full))
    share = np.mean([e.label for e in capped])
    assert abs(share - np.mean([e.label for e in full])) <= max(0.01, 1 / cap)
    assert capped == data.rotten_tomatoes_splits(5, 8, cap).test  # same sample for every seed
    order = {t: i for i, t in enumerate(texts(full))}
    assert [order[t] for t in texts(capped)] == sorted(order[t] for t in texts(capped))


def test_cap_at_or_above_size_keeps_everything(corpus):
    full = data.rotten_tomatoes_splits(0, 16, None).test
    assert data.rotten_tomatoes_splits(0, 16, len(full)).test == full
    assert data.rotten_tomatoes_splits(0, 16, 10**6).test == full


def test_few_shot_split_order_and_seed():
    pool = [Example((f"{label}-{i}",), label) for label in (0, 1, 2) for i in range(10)]
    train, dev = data.few_shot_split(pool, seed=3, k=3)
    assert [e.label for e in train] == [0] * 3 + [1] * 3 + [2] * 3
    assert [e.label for e in dev] == [0] * 3 + [1] * 3 + [2] * 3
    assert not set(texts(train)) & set(texts(dev))
    assert data.few_shot_split(pool, seed=3, k=3) == (train, dev)
    assert data.few_shot_split(pool, seed=4, k=3)[0] != train


# -- templates --------------------------------------------------------------------------------

def test_named_templates():
    causal = resolve_template(SPEC, "causal", "default", None)
    assert causal == Template("{text} It was", ("negative", "positive"))
    assert resolve_template(SPEC, "causal", "instruct", None).text == "Review: {text}\nSentiment:"
    masked = resolve_template(SPEC, "masked", "default", None)
    assert masked == Template("{text} It was {mask} .", ("bad", "great"))
    # label words given with a named template replace the template's own
    assert resolve_template(SPEC, "masked", "default", ("awful", "good")).label_words == (
        "awful", "good")


def test_literal_templates():
    t = resolve_template(SPEC, "causal", "{text} Overall:", ("bad", "good"))
    assert t == Template("{text} Overall:", ("bad", "good"))
    t = resolve_template(SPEC, "masked", "{mask}! {text}", ("no", "yes"))
    assert t == Template("{mask}! {text}", ("no", "yes"))
    with pytest.raises(ConfigError, match="named masked-LM template"):
        resolve_template(SPEC, "masked", "instruct", None)  # causal-only name
    with pytest.raises(ConfigError, match="unknown task 'sst9'"):
        get_task("sst9")


def prompter(kind: str, template: str, max_length: int = 64, **task) -> Prompter:
    words = ("bad", "great")
    return Prompter(tiny.tokenizer(), kind, SPEC, resolve_template(SPEC, kind, template, words),
                    TaskConfig(label_words=words, **task), max_length)


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_render_and_label_ids():
    p = prompter("masked", "{text} it was {mask} .")
    assert p.render(("a good film",)) == "a good film it was [MASK] ."
    assert p.label_ids == p.tokenizer.convert_tokens_to_ids(["bad", "great"])
    c = prompter("causal", "Review: {text} sentiment:")
    assert c.render(("dull",)) == "Review: dull sentiment:"
    with pytest.raises(ValueError):
        c.render(("one", "two"))  # a text per text field of the task


def test_causal_scores_last_real_token_with_right_padding():
    p = prompter("causal", "{text} it was")
    tok = p.tokenizer
    examples = [Example(("great fun",), 1), Example(("the movie was bad and dull",), 0),
                Example(("bad",), 0), Example(("a good film",), 1)]
    (batch,) = p.batches(examples, batch_size=8)
    lengths = batch.attention_mask.sum(1)
    assert sorted(lengths.tolist()) == [3, 4, 5, 8]
    for row, n in enumerate(lengths.tolist()):
        assert batch.attention_mask[row, :n].all() and not batch.attention_mask[row, n:].any()
        assert (batch.input_ids[row, n:] == tok.pad_token_id).all()
        assert batch.positions[row] == n - 1
        assert tok.convert_ids_to_tokens(batch.input_ids[row, n - 2 : n].tolist()) == [
            "it", "was"]
    # rows are sorted by length, labels follow their rows
    assert lengths.tolist() == sorted(lengths.tolist())
    assert batch.labels.tolist() == [0, 1, 1, 0]


def test_masked_scores_the_mask_token():
    p = prompter("masked", "{text} it was {mask} .")
    tok = p.tokenizer
    examples = [Example(("great fun",), 1), Example(("the plot was terrible",), 0),
                Example(("dull",), 0)]
    batches = p.batches(examples, batch_size=2)
    assert [b.input_ids.shape[0] for b in batches] == [2, 1]
    for batch in batches:
        rows = torch.arange(batch.input_ids.shape[0])
        assert (batch.input_ids[rows, batch.positions] == tok.mask_token_id).all()
        assert ((batch.input_ids == tok.mask_token_id).sum(1) == 1).all()
        n = batch.attention_mask.sum(1)
        assert (batch.positions == n - 2).all()  # the mask is followed by "."
        assert (batch.input_ids[batch.attention_mask == 0] == tok.pad_token_id).all()


LONG = " ".join(["the movie was great fun and the plot was good"] * 3)


@pytest.mark.parametrize("kind, template, tail", [
    ("causal", "{text} it was", ["it", "was"]),
    ("masked", "{text} it was {mask} .", ["it", "was", "[MASK]", "."]),
    ("masked", "review : {text} it was {mask} .", ["it", "was", "[MASK]", "."]),
])
def test_long_text_is_truncated_in_the_text_part_only(kind, template, tail):
    p = prompter(kind, template, max_length=12)
    tok = p.tokenizer
    ids, position = p.encode(Example((LONG,), 1))
    assert 12 - 2 <= len(ids) <= 12
    tokens = tok.convert_ids_to_tokens(ids)
    head = ["review", ":"] if template.startswith("review") else []
    assert tokens[: len(head)] == head and tokens[-len(tail):] == tail
    kept = ids[len(head) : len(ids) - len(tail)]
    assert kept and kept == ids_of(tok, LONG)[: len(kept)]  # a prefix of the text survives
    if kind == "causal":
        assert position == len(ids) - 1
    else:
        assert ids[position] == tok.mask_token_id
    # a short text is left alone
    short, _ = p.encode(Example(("good",), 1))
    assert short == ids_of(tok, p.render(("good",)))


def test_template_longer_than_max_length():
    p = prompter("masked", "review : the movie was great fun {text} it was {mask} .",
                 max_length=6)
    with pytest.raises(ConfigError, match="model.max_length=6 is too short"):
        p.encode(Example(("good",), 1))


# -- losses and metrics -----------------------------------------------------------------------

@pytest.mark.parametrize("n_labels", [2, 3, 5])
def test_ce_equals_torch_cross_entropy(n_labels):
    gen = torch.Generator().manual_seed(n_labels)
    logits = torch.randn(7, n_labels, generator=gen) * 3
    labels = torch.randint(n_labels, (7,), generator=gen)
    expected = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(example_losses(logits, labels, "ce"), expected)
    # leading candidate axes score every candidate against the same labels
    stacked = torch.stack([logits, logits * 0.5])
    got = example_losses(stacked, labels, "ce")
    assert got.shape == (2, 7)
    torch.testing.assert_close(got[1], torch.nn.functional.cross_entropy(
        logits * 0.5, labels, reduction="none"))


@pytest.mark.parametrize("n_labels, margin", [(2, 2.0), (3, 2.0), (4, 0.5)])
def test_hinge_equals_multi_margin_loss(n_labels, margin):
    gen = torch.Generator().manual_seed(10 + n_labels)
    logits = torch.randn(3, 9, n_labels, generator=gen) * 2
    labels = torch.randint(n_labels, (9,), generator=gen)
    reference = torch.nn.MultiMarginLoss(margin=margin, reduction="none")
    got = example_losses(logits, labels, "hinge", margin)
    assert got.shape == (3, 9)
    for c in range(3):
        torch.testing.assert_close(got[c], reference(logits[c], labels))


def test_losses_are_float32_for_half_inputs():
    logits = torch.tensor([[1.0, -1.0], [0.25, 0.5]], dtype=torch.bfloat16)
    labels = torch.tensor([0, 1])
    for loss in ("ce", "hinge"):
        assert example_losses(logits, labels, loss).dtype == torch.float32
    # hand-computed hinge: (max(0, 2 - 1 + -1) + 0) / 2 = 0 and (max(0, 2 - 0.5 + 0.25)) / 2
    torch.testing.assert_close(example_losses(logits, labels, "hinge"),
                               torch.tensor([0.0, 0.875]))


def test_f1_binary_and_macro():
    pred = np.array([1, 1, 0, 0, 1])
    gold = np.array([1, 0, 0, 1, 1])
    # class 1: tp = 2, 3 predicted, 3 gold -> 2 * 2 / 6
    assert f1_score(pred, gold, 2) == pytest.approx(2 / 3)
    assert f1_score(np.zeros(4, int), np.zeros(4, int), 2) == 0.0  # no positives anywhere
    assert f1_score(np.ones(4, int), np.array([1, 1, 0, 0]), 2) == pytest.approx(2 * 2 / 6)
    pred = np.array([0, 1, 2, 2, 1, 0])
    gold = np.array([0, 1, 1, 2, 2, 0])
    # class 0: 1.0; class 1: tp 1, 2 + 2 -> 0.5; class 2: tp 1, 2 + 2 -> 0.5
    assert f1_score(pred, gold, 3) == pytest.approx(2 / 3)
    assert f1_score(gold, gold, 3) == 1.0


def test_classification_metrics():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.5, 0.0]])
    labels = torch.tensor([0, 1, 1, 1])
    m = classification_metrics(logits, labels, "ce", 2.0)
    assert m["accuracy"] == 0.5 and m["n"] == 4 and m["predicted_counts"] == [3, 1]
    assert m["f1"] == pytest.approx(2 * 1 / (1 + 3))
    assert m["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)))


# -- derived seeds ----------------------------------------------------------------------------

def test_derive_seed_is_stable():
    assert derive_seed(42, "map", 3, 1) == 374008694812632034  # computed once; must never change
    assert derive_seed(0, "few-shot") == 7033374586914578779
    assert derive_seed(np.int64(42), "map", 3, 1) == derive_seed(42, "map", 3, 1)


def test_derive_seed_differs_across_parts():
    seeds = [derive_seed(42), derive_seed(43), derive_seed(42, "map"), derive_seed(42, "maps"),
             derive_seed(42, "map", 3, 1), derive_seed(42, "map", 1, 3),
             derive_seed(42, "map", 3, 2), derive_seed(42, "map", "3", 1),
             derive_seed(42, "map", 31), derive_seed(42, "few-shot"), derive_seed(0, "few-shot")]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds)
