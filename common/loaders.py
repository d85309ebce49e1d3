"""Task data from its sources: local files, the Hugging Face hub, the offline rotten_tomatoes set.

Local files are CSV, TSV (GLUE style: a header, tab-separated, no quoting), JSONL (one object a
line) or a folder written by `datasets`' `save_to_disk`. Standard tasks find their columns under
the usual names (GLUE's `sentence`, `sentence1`/`sentence2`, SNLI's `premise`/`hypothesis`, ...);
a custom task names them in `task.text_fields` and `task.label_field`. Every problem with the data
is a one-line `DataError` naming the file and the row or column. No torch.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import TaskConfig
from common.data import (
    Example,
    Splits,
    cap_stratified,
    draw_per_class,
    few_shot_split,
    hold_out,
    rotten_tomatoes_splits,
)
from common.errors import ConfigError, DataError, first_line
from common.tasks import CUSTOM, TaskSpec, task_spec

# column names a standard task's fields are found under, first match wins
COLUMNS = {
    "text": ("text", "sentence", "content", "review"),
    "text1": ("text1", "sentence1", "premise", "#1 String", "question1"),
    "text2": ("text2", "sentence2", "hypothesis", "#2 String", "question2"),
    "label": ("label", "gold_label", "Quality"),
}
NO_GOLD = ("-", "-1")  # SNLI's pairs without a gold label: skipped, as in every SNLI benchmark


@dataclass(frozen=True)
class Table:
    source: str  # the file (or hub dataset and split), for messages
    columns: tuple[str, ...]
    rows: list[tuple[str, dict[str, Any]]]  # (where, e.g. "train.csv line 7"; values by column)


def load_splits(task: TaskConfig, seed: int) -> Splits:
    """k per class train and dev for `seed`, and the test split (capped at task.max_test)."""
    spec = task_spec(task)
    if task.train_file is None and (task.dev_file or task.test_file):
        raise ConfigError("task.dev_file and task.test_file need task.train_file (without it the "
                          "task's own source provides every split)")
    if task.train_file is None and task.name == "rotten_tomatoes":
        return rotten_tomatoes_splits(seed, task.k, task.max_test)
    if task.train_file is None:
        train_table, test_table = hub_tables(spec)
    else:
        train_table = read_table(task.train_file, "train")
        test_table = (read_table(task.test_file, spec.test_split) if task.test_file
                      else folder_split(task.train_file, spec.test_split))
    pool, test = _pool_and_test(task, spec, train_table, test_table)
    n, where = len(spec.classes), train_table.source
    if task.dev_file is None:
        train, dev = few_shot_split(pool, seed, task.k, n_classes=n, where=where)
    else:  # k per class from the dev file, none of them a train or test text
        dev_table = read_table(task.dev_file, "validation")
        train = draw_per_class(pool, seed, task.k, n, where, "train")
        dev_pool = _disjoint(examples(dev_table, spec, task), test + train)
        dev = draw_per_class(dev_pool, seed, task.k, n, dev_table.source, "dev")
    return Splits(train, dev, cap_stratified(test, task.max_test))


def _pool_and_test(task: TaskConfig, spec: TaskSpec, train_table: Table,
                   test_table: Table | None) -> tuple[list[Example], list[Example]]:
    """The training pool (no text twice, none in test) and the test examples."""
    pool = examples(train_table, spec, task)
    if test_table is not None:
        test = examples(test_table, spec, task)
    else:  # a fixed hold-out, the same for every seed (as for rotten_tomatoes)
        test, pool = hold_out(pool, task.name)
    return _disjoint(pool, test), test


def _disjoint(pool: list[Example], other: list[Example]) -> list[Example]:
    """`pool` without repeated texts and without any text that occurs in `other`."""
    seen = {e.texts for e in other}
    out = []
    for example in pool:
        if example.texts not in seen:
            seen.add(example.texts)
            out.append(example)
    return out


# -- reading ------------------------------------------------------------------------------------

def read_table(path: str, split: str) -> Table:
    """The rows of a CSV, TSV or JSONL file, or of `split` of a `save_to_disk` folder."""
    file = Path(path)
    if not file.exists():
        raise DataError(f"{path}: no such file or folder")
    try:
        if file.is_dir():
            table = _read_folder(file, split)
        elif file.suffix.lower() in (".csv", ".tsv"):
            table = _read_delimited(file)
        elif file.suffix.lower() in (".jsonl", ".json"):
            table = _read_jsonl(file)
        else:
            raise DataError(f"{path}: unknown format '{file.suffix}'; use .csv, .tsv, .jsonl or "
                            "a folder written by datasets' save_to_disk")
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read ({type(err).__name__}: {first_line(err)})") from None
    if not table.rows:
        raise DataError(f"{path}: empty file (no data rows)")
    return table


def _read_delimited(file: Path) -> Table:
    tsv = file.suffix.lower() == ".tsv"
    with open(file, encoding="utf-8-sig", newline="") as handle:  # -sig: Excel's BOM
        reader = csv.DictReader(handle, delimiter="\t" if tsv else ",",
                                quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
        rows = [(f"{file} line {reader.line_num}", row) for row in reader]
        return Table(str(file), tuple(reader.fieldnames or ()), rows)


def _read_jsonl(file: Path) -> Table:
    rows, columns = [], {}
    with open(file, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{file} line {number}: not JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{file} line {number}: expected a JSON object, got {line[:40]!r}")
            columns.update(dict.fromkeys(row))
            rows.append((f"{file} line {number}", row))
    return Table(str(file), tuple(columns), rows)


def _read_folder(folder: Path, split: str) -> Table:
    data = _load_from_disk(folder)
    if hasattr(data, "keys"):  # a DatasetDict: one split of it
        if split not in data:
            raise DataError(f"{folder}: no '{split}' split (has {', '.join(data)})")
        data, source = data[split], f"{folder}[{split}]"
    else:
        source = str(folder)
    return _dataset_table(data, source)


def folder_split(path: str, split: str) -> Table | None:
    """`split` (or 'test') of a saved DatasetDict folder, or None for anything else."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    data = _load_from_disk(folder)
    for name in (split, "test"):
        if hasattr(data, "keys") and name in data:
            return _dataset_table(data[name], f"{folder}[{name}]")
    return None


def _load_from_disk(folder: Path):
    datasets = _datasets()
    try:
        return datasets.load_from_disk(str(folder))
    except Exception as err:  # noqa: BLE001 - any failure inside datasets is a data error here
        raise DataError(f"{folder}: not a folder written by datasets' save_to_disk "
                        f"({type(err).__name__}: {first_line(err)})") from None


def _dataset_table(data, source: str) -> Table:
    rows = [(f"{source} row {i}", row) for i, row in enumerate(data)]
    return Table(source, tuple(data.column_names), rows)


def hub_tables(spec: TaskSpec) -> tuple[Table, Table]:
    """The train and test splits of a standard task from the Hugging Face hub."""
    name = ":".join(spec.hub)
    datasets = _datasets()
    try:
        data = datasets.load_dataset(*spec.hub)
    except Exception as err:  # noqa: BLE001 - network, cache and hub errors alike
        raise DataError(f"cannot load {spec.name} ('{name}') from the Hugging Face hub "
                        f"({type(err).__name__}: {first_line(err)}); on a machine without "
                        "network give task.train_file (and task.test_file)") from None
    missing = [s for s in ("train", spec.test_split) if s not in data]
    if missing:
        raise DataError(f"hub dataset '{name}' has no {missing[0]} split (has {', '.join(data)})")
    return (_dataset_table(data["train"], f"{name}[train]"),
            _dataset_table(data[spec.test_split], f"{name}[{spec.test_split}]"))


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("hub names and save_to_disk folders need the 'datasets' package: "
                        "pip install datasets") from None
    return datasets


# -- rows -> examples -----------------------------------------------------------------------------

def examples(table: Table, spec: TaskSpec, task: TaskConfig) -> list[Example]:
    """One Example per row with a label; SNLI-style rows without a gold label are skipped."""
    configured = task.text_fields or (None,) * len(spec.text_fields)
    if len(configured) != len(spec.text_fields):
        raise DataError(f"task.text_fields: {spec.name} has {len(spec.text_fields)} text "
                        f"field(s), got {list(configured)}")
    fields = [_column(table, field, name)
              for field, name in zip(spec.text_fields, configured, strict=True)]
    label_column = _column(table, "label", task.label_field)
    to_index = _label_index(spec, task, label_column)
    out = []
    for where, row in table.rows:
        texts = []
        for column in fields:
            value = row.get(column)
            if value is None:
                raise DataError(f"{where}: no value in column {column!r}")
            texts.append(" ".join(str(value).split()))
        label = to_index(row.get(label_column), where)
        if label is not None:
            out.append(Example(tuple(texts), label))
    if not out:
        raise DataError(f"{table.source}: no labelled rows")
    return out


def _column(table: Table, field: str, configured: str | None) -> str:
    names = (configured,) if configured else COLUMNS[field]
    for name in names:
        if name in table.columns:
            return name
    wanted = f"column {configured!r}" if configured else f"a {field} column ({', '.join(names)})"
    raise DataError(f"{table.source}: missing {wanted}; columns are {list(table.columns)}")


def _label_index(spec: TaskSpec, task: TaskConfig,
                 column: str) -> Callable[[Any, str], int | None]:
    """Label value -> class index: a custom task's `task.labels` keys, else the class names or
    their 0-based indices."""
    custom = spec.name == CUSTOM
    names = list(task.labels) if custom else list(spec.classes)

    def index(value: Any, where: str) -> int | None:
        text = "" if value is None else str(value).strip()
        if text in names:
            return names.index(text)
        if not custom:
            if text.lstrip("-").isdigit() and 0 <= int(text) < len(names):
                return int(text)
            if text in NO_GOLD:
                return None
        allowed = "task.labels" if custom else f"the classes of {spec.name} or 0..{len(names) - 1}"
        raise DataError(f"{where}: label {value!r} in column {column!r} is not one of "
                        f"{allowed} ({', '.join(names)})")

    return index
