"""Task data from files (CSV, TSV, JSONL, save_to_disk folders) and the hub; splits; errors.

The fixtures in tests/fixtures hold a handful of rows in each task format; the rest are written
here into tmp_path.
"""

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from common import loaders
from common.config import RunConfig, TaskConfig
from common.data import Example
from common.errors import DataError, DfoloraError
from common.tasks import get_task

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def task(**keys) -> TaskConfig:
    return RunConfig.from_dict({"task": {"k": 2, "max_test": None} | keys}).task


def write_csv(path: Path, header: list[str], rows: list[list]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def reviews(tmp_path: Path, per_class: int = 6, name: str = "train.csv") -> str:
    rows = [[f"good film {i}", "pos"] for i in range(per_class)]
    rows += [[f"bad film {i}", "neg"] for i in range(per_class)]
    return write_csv(tmp_path / name, ["review", "sentiment"], rows)


def custom(train_file: str, **keys) -> TaskConfig:
    return task(name="custom", train_file=train_file, text_fields=["review"],
                label_field="sentiment", labels={"neg": "bad", "pos": "great"},
                template="{review} It was", **keys)


# -- one fixture per format ---------------------------------------------------------------------

def read(name: str, path: str, **keys) -> list[Example]:
    table = loaders.read_table(path, "train")
    return loaders.examples(table, get_task(name), task(name=name, **keys))


def test_glue_tsv():
    rows = read("sst2", str(FIXTURES / "sst2_train.tsv"))
    assert rows[:2] == [Example(("a brilliant movie",), 1), Example(("a dull movie",), 0)]
    assert len(rows) == 12
    # GLUE TSVs are not quoted: a lone double quote is part of the text
    assert read("sst2", str(FIXTURES / "sst2_dev.tsv"))[0] == Example(('the plot is "good',), 1)


def test_glue_tsv_sentence_pair_original_mrpc_columns():
    rows = read("mrpc", str(FIXTURES / "mrpc_train.tsv"))
    assert rows[0] == Example(("the film was great", "the movie was great"), 1)
    assert Counter(e.label for e in rows) == {0: 4, 1: 4}


def test_csv_with_quotes_and_crlf():
    rows = read("ag_news", str(FIXTURES / "ag_news_train.csv"))
    assert [e.label for e in rows] == [0, 1, 2, 3] * 2
    assert rows[-1] == Example(('Phone maker, "X", sues',), 3)


def test_csv_with_a_byte_order_mark(tmp_path):
    (tmp_path / "bom.csv").write_text("\ufeffreview,sentiment\ngood,pos\n", encoding="utf-8")
    table = loaders.read_table(str(tmp_path / "bom.csv"), "train")
    assert table.columns == ("review", "sentiment")


def test_jsonl_class_names_and_no_gold_rows_skipped():
    rows = read("snli", str(FIXTURES / "snli_train.jsonl"))
    assert len(rows) == 12  # the "-" row is skipped
    assert rows[0] == Example(("a man plays", "a person plays"), 0)
    assert Counter(e.label for e in rows) == {0: 4, 1: 4, 2: 4}


def save_rte_folder(path: Path) -> str:
    datasets = pytest.importorskip("datasets")

    def split(n, offset):
        return datasets.Dataset.from_dict({
            "sentence1": [f"premise {offset + i}" for i in range(n)],
            "sentence2": [f"hypothesis {offset + i}" for i in range(n)],
            "label": [i % 2 for i in range(n)], "idx": list(range(n))})

    datasets.DatasetDict({"train": split(8, 0), "validation": split(4, 100)}).save_to_disk(
        str(path))
    return str(path)


def test_save_to_disk_folder_gives_train_and_glue_validation_as_test(tmp_path):
    folder = save_rte_folder(tmp_path / "rte")
    rows = read("rte", folder)
    assert rows[1] == Example(("premise 1", "hypothesis 1"), 1) and len(rows) == 8
    splits = loaders.load_splits(task(name="rte", train_file=folder), seed=0)
    assert sorted(e.texts[0] for e in splits.test) == [f"premise {i}" for i in range(100, 104)]
    assert len(splits.train) == len(splits.dev) == 4


# -- splits -------------------------------------------------------------------------------------

def test_splits_deterministic_balanced_disjoint():
    cfg = task(name="sst2", train_file=str(FIXTURES / "sst2_train.tsv"),
               test_file=str(FIXTURES / "sst2_dev.tsv"))
    a, b = loaders.load_splits(cfg, seed=1), loaders.load_splits(cfg, seed=1)
    assert a == b
    assert loaders.load_splits(cfg, seed=2).train != a.train
    assert loaders.load_splits(cfg, seed=2).test == a.test  # the test set never depends on seed
    for split in (a.train, a.dev):
        assert Counter(e.label for e in split) == {0: 2, 1: 2}
    texts = [{e.texts for e in s} for s in (a.train, a.dev, a.test)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert len(a.test) == 4


def test_pair_and_three_class_splits(tmp_path):
    test = tmp_path / "test.jsonl"
    test.write_text("\n".join(json.dumps({"premise": "a man plays", "hypothesis": h, "label": i})
                              for i, h in enumerate(["a person plays", "he wins", "he sleeps"])))
    s = loaders.load_splits(task(name="snli", train_file=str(FIXTURES / "snli_train.jsonl"),
                                 test_file=str(test), k=1), seed=0)
    assert [e.label for e in s.test] == [0, 1, 2]
    assert Counter(e.label for e in s.train) == Counter(e.label for e in s.dev) == {0: 1, 1: 1,
                                                                                    2: 1}
    # a training pair that is also in the test file is never drawn
    texts = {e.texts for e in s.train + s.dev}
    assert not texts & {e.texts for e in s.test}
    assert all(len(t) == 2 for t in texts)


def test_custom_held_out_test_dev_file_and_cap(tmp_path):
    train = reviews(tmp_path, per_class=10)
    s = loaders.load_splits(custom(train), seed=0)
    assert len(s.test) == 4 and len(s.train) == len(s.dev) == 4  # 20 % of 20 held out
    assert s.test == loaders.load_splits(custom(train), seed=5).test
    dev_file = reviews(tmp_path, per_class=3, name="dev.csv")
    d = loaders.load_splits(custom(train, dev_file=dev_file, max_test=2), seed=0)
    assert all(e.texts[0].endswith(("0", "1", "2")) for e in d.dev)  # drawn from dev.csv
    assert not {e.texts for e in d.train} & {e.texts for e in d.dev}
    assert len(d.test) == 2 and Counter(e.label for e in d.test) == {0: 1, 1: 1}


def test_dbpedia_fourteen_classes(tmp_path):
    rows = [[f"title {i}", f"entity number {i}", i % 14] for i in range(14 * 3)]
    train = write_csv(tmp_path / "train.csv", ["title", "content", "label"], rows)
    test = write_csv(tmp_path / "test.csv", ["title", "content", "label"], rows[:14])
    s = loaders.load_splits(task(name="dbpedia", train_file=train, test_file=test, k=1), seed=0)
    assert Counter(e.label for e in s.train) == dict.fromkeys(range(14), 1)
    assert Counter(e.label for e in s.dev) == dict.fromkeys(range(14), 1)
    assert s.test[3] == Example(("entity number 3",), 3)


def test_rotten_tomatoes_default_is_offline():
    s = loaders.load_splits(task(name="rotten_tomatoes", k=2, max_test=10), seed=0)
    assert len(s.train) == len(s.dev) == 4 and len(s.test) == 10


def test_hub_unreachable_is_a_clear_data_error(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as err:
        loaders.load_splits(task(name="sst2"), seed=0)
    message = str(err.value)
    assert "'nyu-mll/glue:sst2'" in message and "task.train_file" in message
    assert "\n" not in message


def test_hub_dataset_columns(monkeypatch):
    """The hub's column names (dbpedia_14: title, content; SNLI: -1 for no gold label)."""
    datasets = pytest.importorskip("datasets")

    def fake(path, *config):
        assert (path, *config) in (("fancyzhx/dbpedia_14",), ("stanfordnlp/snli",))
        if path.endswith("snli"):
            return datasets.DatasetDict({split: datasets.Dataset.from_dict({
                "premise": ["p 0", "p 1", "p 2", "p 3"], "hypothesis": ["h", "h", "h", "h"],
                "label": [0, -1, 1, 2]}) for split in ("train", "test")})
        rows = {"title": [f"t{i}" for i in range(28)], "content": [f"c{i}" for i in range(28)],
                "label": [i % 14 for i in range(28)]}
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                                     "test": datasets.Dataset.from_dict(rows)})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    train, test = loaders.hub_tables(get_task("dbpedia"))
    assert loaders.examples(train, get_task("dbpedia"), task(name="dbpedia"))[15] == Example(
        ("c15",), 1)
    assert test.rows[0][0] == "fancyzhx/dbpedia_14[test] row 0"
    train, _ = loaders.hub_tables(get_task("snli"))
    assert [e.label for e in loaders.examples(train, get_task("snli"), task(name="snli"))] == [
        0, 1, 2]


# -- bad data -----------------------------------------------------------------------------------

def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, DfoloraError)
    return message


def test_missing_column(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["review", "stars"], [["good", "pos"]] * 8)
    with pytest.raises(DataError) as err:
        loaders.load_splits(custom(path), seed=0)
    assert f"{path}: missing column 'sentiment'; columns are ['review', 'stars']" in one_line(err)
    with pytest.raises(DataError) as err:
        read("mrpc", str(FIXTURES / "sst2_train.tsv"))
    assert "missing a text1 column (text1, sentence1" in one_line(err)


def test_label_not_in_task_labels(tmp_path):
    path = reviews(tmp_path)
    rows = list(csv.reader(open(path)))
    rows[4][1] = "meh"
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    with pytest.raises(DataError) as err:
        loaders.load_splits(custom(path), seed=0)
    assert (f"{path} line 5: label 'meh' in column 'sentiment' is not one of task.labels "
            "(neg, pos)") in one_line(err)
    with pytest.raises(DataError, match=r"line 2: label '7' in column 'label' .* 0\.\.1"):
        read("sst2", write_csv(tmp_path / "s.csv", ["sentence", "label"], [["good", 7]]))


def test_empty_files(tmp_path):
    for name, text in (("a.csv", ""), ("b.csv", "review,sentiment\n"), ("c.jsonl", "\n\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError) as err:
            loaders.load_splits(custom(str(tmp_path / name)), seed=0)
        assert f"{tmp_path / name}: empty file" in one_line(err)


def test_class_with_fewer_than_2k(tmp_path):
    rows = [[f"good {i}", "pos"] for i in range(8)] + [[f"bad {i}", "neg"] for i in range(3)]
    path = write_csv(tmp_path / "few.csv", ["review", "sentiment"], rows)
    with pytest.raises(DataError) as err:
        loaders.load_splits(custom(path, test_file=path), seed=0)
    # the test file is the train file here, so nothing is left: every class is short
    assert "few.csv: class 0 has 0 examples; k=2 needs 4" in one_line(err)
    test = write_csv(tmp_path / "test.csv", ["review", "sentiment"], [["fine", "pos"]])
    with pytest.raises(DataError) as err:
        loaders.load_splits(custom(path, test_file=test), seed=0)
    assert f"{path}: class 0 has 3 examples; k=2 needs 4 (k for train and k for dev)" in (
        one_line(err))
    # a class that never occurs counts as short too
    only_pos = write_csv(tmp_path / "pos.csv", ["review", "sentiment"], rows[:8])
    with pytest.raises(DataError, match="class 0 has 0 examples"):
        loaders.load_splits(custom(only_pos, test_file=test), seed=0)


def test_unreadable_files(tmp_path):
    binary = tmp_path / "data.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81review,sentiment\n")
    cases = {
        str(binary): "data.csv: cannot read (UnicodeDecodeError",
        str(tmp_path / "absent.csv"): "absent.csv: no such file or folder",
        str(tmp_path / "data.parquet"): "unknown format '.parquet'",
        str(tmp_path): "not a folder written by datasets' save_to_disk",
    }
    (tmp_path / "data.parquet").write_text("x")
    for path, message in cases.items():
        with pytest.raises(DataError) as err:
            loaders.load_splits(custom(path), seed=0)
        assert message in one_line(err), path
    bad_json = tmp_path / "t.jsonl"
    bad_json.write_text(json.dumps({"review": "good", "sentiment": "pos"}) + "\n{oops\n")
    with pytest.raises(DataError) as err:
        loaders.load_splits(custom(str(bad_json)), seed=0)
    assert f"{bad_json} line 2: not JSON" in one_line(err)


def test_save_to_disk_folder_without_the_split(tmp_path):
    folder = save_rte_folder(tmp_path / "rte")
    shutil.rmtree(Path(folder) / "train")
    (Path(folder) / "dataset_dict.json").write_text(json.dumps({"splits": ["validation"]}))
    with pytest.raises(DataError) as err:
        loaders.read_table(folder, "train")
    assert f"{folder}: no 'train' split (has validation)" in one_line(err)
