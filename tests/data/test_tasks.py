"""Task specs: the shipped files, user files, bad inputs, stratified subsampling, records."""

import collections
import json

import numpy as np
import pytest

from jdistill.data import io as data
from jdistill.data import tasks


@pytest.mark.parametrize("name,sizes,classes", [
    ("twitter_topics", {"train": 16990, "test": 4117}, 20),
    ("reuters35", {"train": 6415, "test": 2505}, 35),
])
def test_shipped_task_counts_and_label_ranges(name, sizes, classes):
    task = tasks.get_task(name)
    assert task.num_classes == classes
    for split, n in sizes.items():
        examples = tasks.load_split(task, split)
        assert len(examples) == n
        labels = {y for _, y in examples}
        assert labels == set(range(classes))  # every class occurs in both splits
        assert all(isinstance(t, str) and t for t, _ in examples)


def test_twitter_label_names_follow_the_manifest():
    task = tasks.twitter_topics()
    assert task.label_names[0] == "Analyst Update"
    assert task.label_names[11] == "IPO"
    assert task.label_names[19] == "Stock Movement"
    first = tasks.load_split(task, "train")[0]
    assert first[1] == 0 and first[0].startswith("Here are Thursday's biggest analyst calls")


def test_reuters_labels_are_topic_codes():
    task = tasks.reuters35()
    counts = collections.Counter(y for _, y in tasks.load_split(task, "train"))
    assert task.label_names[:2] == ("earn", "acq")
    assert counts[0] > counts[1] > counts[34]  # listed most frequent first


def test_prompt_records_roundtrip_through_read_examples(tmp_path):
    task = tasks.twitter_topics()
    examples = [("Fed holds rates steady", 1), ("Apple beats estimates", 5)]
    records = tasks.to_records(task, examples)
    assert records[0] == {
        "prompt": "Classify the topic of this financial news tweet.\n"
                  "Tweet: Fed holds rates steady\nTopic:",
        "answer": " Fed | Central Banks"}
    path = tasks.write_records(tmp_path / "records.jsonl", records)
    assert data.read_examples(path) == records
    assert not list(tmp_path.glob(".*"))  # no temp file left behind


def test_template_must_have_text_field():
    with pytest.raises(ValueError, match=r"\{text\}"):
        tasks.TaskSpec(name="t", splits={}, label_names=("a",), template="Classify: ")
    with pytest.raises(ValueError, match="only"):
        tasks.TaskSpec(name="t", splits={}, label_names=("a",), template="{text} {oops}")
    spec = tasks.TaskSpec(name="t", splits={}, label_names=("a", "b"),
                          template="Labels: {labels}\n{text}\nLabel:")
    assert tasks.prompt(spec, "x") == "Labels: a, b\nx\nLabel:"


def test_label_names_must_be_distinct():
    with pytest.raises(ValueError, match="duplicate"):
        tasks.TaskSpec(name="t", splits={}, label_names=("a", "a"))


def _write(path, rows):
    if path.suffix == ".csv":
        import csv
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_task_from_file_string_labels(tmp_path, suffix):
    rows = [{"headline": "Acme buys Widget Co", "label": "M&A"},
            {"headline": "Acme Q3 profit rises", "label": "Earnings"},
            {"headline": "Widget Co to be acquired", "label": "M&A"}]
    path = _write(tmp_path / f"mix{suffix}", rows)
    task = tasks.task_from_file(path)
    assert task.label_names == ("Earnings", "M&A")  # inferred, sorted
    assert tasks.load_split(task, "test") == [("Acme buys Widget Co", 1),
                                              ("Acme Q3 profit rises", 0),
                                              ("Widget Co to be acquired", 1)]


def test_task_from_file_integer_labels_need_names(tmp_path):
    path = _write(tmp_path / "ints.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 0}])
    with pytest.raises(ValueError, match=r"ints\.jsonl row 1: label 1 is an integer index; "
                                         "pass label_names"):
        tasks.task_from_file(path)
    task = tasks.task_from_file(path, ["neg", "pos"])
    assert tasks.load_split(task, "test") == [("a", 1), ("b", 0)]


def test_task_from_file_splits_dict(tmp_path):
    train = _write(tmp_path / "train.csv",
                   [{"text": "x", "label": "a"}, {"text": "y", "label": "b"}])
    test = _write(tmp_path / "test.csv", [{"text": "z", "label": "b"}])
    task = tasks.task_from_file({"train": train, "test": test})
    assert task.label_names == ("a", "b")
    assert tasks.load_split(task, "test") == [("z", 1)]
    with pytest.raises(ValueError, match="no split 'validation'"):
        tasks.load_split(task, "validation")


def test_unknown_label_names_file_and_row(tmp_path):
    path = _write(tmp_path / "bad.csv", [{"text": "ok", "label": "a"},
                                         {"text": "bad", "label": "zzz"}])
    task = tasks.task_from_file(path, ["a", "b"])
    with pytest.raises(ValueError, match=r"bad\.csv row 2: label 'zzz'"):
        tasks.load_split(task, "test")
    path = _write(tmp_path / "range.csv", [{"text": "ok", "label": "7"}])
    with pytest.raises(ValueError, match=r"range\.csv row 1"):
        tasks.load_split(tasks.task_from_file(path, ["a", "b"]), "test")


def test_missing_text_column_names_file_and_columns(tmp_path):
    path = _write(tmp_path / "cols.csv", [{"body": "x", "label": "a"}])
    with pytest.raises(ValueError, match=r"cols\.csv row 1: no text column.*'body'"):
        tasks.load_split(tasks.task_from_file(path, ["a"]), "test")


def test_empty_split_and_empty_text(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    with pytest.raises(ValueError, match="has no examples"):
        tasks.load_split(tasks.task_from_file(empty, ["a"]), "test")
    blank = _write(tmp_path / "blank.csv", [{"text": "  ", "label": "a"}])
    with pytest.raises(ValueError, match=r"blank\.csv row 1: empty"):
        tasks.load_split(tasks.task_from_file(blank, ["a"]), "test")


def test_missing_file_and_unknown_task(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tasks.load_split(tasks.task_from_file(tmp_path / "nope.csv", ["a"]), "test")
    with pytest.raises(ValueError, match="unknown task"):
        tasks.get_task("nope")


def _labelled(counts):
    return [(f"{c}-{i}", c) for c, n in enumerate(counts) for i in range(n)]


def test_subsample_is_stratified_deterministic_and_nested():
    examples = _labelled([500, 200, 90, 9, 1])
    n_total = len(examples)
    for n in (10, 57, 200, 799, n_total):
        sub = tasks.subsample(examples, n, seed=3)
        assert len(sub) == n and len(set(sub)) == n
        counts = collections.Counter(y for _, y in sub)
        for c, size in enumerate([500, 200, 90, 9, 1]):
            assert abs(counts[c] - n * size / n_total) <= 1.0, (n, c)
        assert sub == tasks.subsample(examples, n, seed=3)
    small, big = tasks.subsample(examples, 100, 0), tasks.subsample(examples, 300, 0)
    assert big[:100] == small  # nested: more data adds examples, never redraws
    assert tasks.subsample(examples, 100, 1) != small
    assert sorted(tasks.subsample(examples, n_total, 0)) == sorted(examples)


def test_subsample_larger_than_available_is_an_error():
    with pytest.raises(ValueError, match="only 3 are available"):
        tasks.subsample(_labelled([2, 1]), 4, 0)


def test_subsample_on_the_real_task_keeps_rare_classes():
    examples = tasks.load_split(tasks.twitter_topics(), "train")
    sub = tasks.subsample(examples, 1000, 0)
    counts = collections.Counter(y for _, y in sub)
    full = collections.Counter(y for _, y in examples)
    for c in full:
        assert abs(counts[c] - 1000 * full[c] / len(examples)) <= 1.0
    assert np.isclose(sum(counts.values()), 1000)


# ------------------------------------------------------------------ Hugging Face datasets


def _save_hf(path, *, class_label=True):
    """A DatasetDict written with save_to_disk: ClassLabel labels, a headline reading "NA"."""
    import datasets

    label = (datasets.ClassLabel(names=["Earnings", "M&A", "Macro"]) if class_label
             else datasets.Value("string"))
    features = datasets.Features({"headline": datasets.Value("string"), "label": label})
    train = {"headline": ["Acme beats estimates", "NA", "Fed holds", "Widget buys Gadget"],
             "label": [0, 1, 2, 1] if class_label else ["Earnings", "M&A", "Macro", "M&A"]}
    test = {"headline": ["Profit falls", "NA"],
            "label": [0, 2] if class_label else ["Earnings", "Macro"]}
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(train, features=features),
        "validation": datasets.Dataset.from_dict(test, features=features),
    }).save_to_disk(str(path))
    return path


def test_save_to_disk_folder_is_a_task_with_classlabel_names(tmp_path):
    task = tasks.get_task(str(_save_hf(tmp_path / "fin")))
    assert task.label_names == ("Earnings", "M&A", "Macro")  # from the ClassLabel feature
    assert set(task.splits) == {"train", "validation"}
    train = tasks.load_split(task, "train")
    assert train == [("Acme beats estimates", 0), ("NA", 1), ("Fed holds", 2),
                     ("Widget buys Gadget", 1)]  # the "NA" headline stays a string
    assert tasks.load_split(task, "validation") == [("Profit falls", 0), ("NA", 2)]
    with pytest.raises(ValueError, match="has no split 'test'"):
        tasks.load_split(task, "test")


def test_an_arrow_file_is_a_task_split_with_classlabel_names(tmp_path):
    arrow, = (_save_hf(tmp_path / "fin") / "validation").glob("*.arrow")
    task = tasks.get_task(str(arrow), split="test")
    assert task.label_names == ("Earnings", "M&A", "Macro") and set(task.splits) == {"test"}
    assert tasks.load_split(task, "test") == [("Profit falls", 0), ("NA", 2)]


def test_hf_string_labels_are_inferred_and_columns_named(tmp_path):
    path = _save_hf(tmp_path / "fin", class_label=False)
    task = tasks.task_from_hf(path, splits=["train"])
    assert task.label_names == ("Earnings", "M&A", "Macro") and set(task.splits) == {"train"}
    assert tasks.load_split(task, "train")[1] == ("NA", 1)
    with pytest.raises(ValueError, match="no label column"):
        tasks.task_from_hf(path, label_field="topic")
    with pytest.raises(ValueError, match="splits"):
        tasks.task_from_hf(path, splits=["test"])


def test_hub_name_without_network_says_how_to_pass_a_local_copy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"save_to_disk\('DIR'\)") as e:
        tasks.get_task("nvidia/FinHeadlineMix")
    assert "\n" not in str(e.value)


def test_folder_that_is_not_a_saved_dataset(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match="save_to_disk"):
        tasks.get_task(str(tmp_path / "x"))


def test_shipped_data_resolves_from_the_package_or_jdistill_data(tmp_path, monkeypatch):
    root = data.data_root()
    assert root.name == "shipped_data" and (root / "MANIFEST.md").is_file()
    assert data.data_file("finance/twitter_financial_news_topic/topic_train.csv").suffix == ".xz"
    (tmp_path / "finance/twitter_financial_news_topic").mkdir(parents=True)
    for split, rows in (("train", "Fed holds,1\nApple beats,5\n"), ("valid", "Oil up,6\n")):
        (tmp_path / f"finance/twitter_financial_news_topic/topic_{split}.csv").write_text(
            "text,label\n" + rows)
    monkeypatch.setenv("JDISTILL_DATA", str(tmp_path))
    assert tasks.load_split(tasks.twitter_topics(), "test") == [("Oil up", 6)]
    monkeypatch.setenv("JDISTILL_DATA", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="JDISTILL_DATA"):
        tasks.twitter_topics()


@pytest.mark.parametrize("compress", ["xz", "gz", "bz2"])
def test_compressed_task_files_read_like_plain_ones(tmp_path, compress):
    import bz2
    import gzip
    import lzma

    opener = {"xz": lzma.open, "gz": gzip.open, "bz2": bz2.open}[compress]
    path = tmp_path / f"t.csv.{compress}"
    with opener(path, "wt", encoding="utf-8", newline="") as f:
        f.write('text,label\n"Acme, Inc. beats",up\nNA,down\n')
    task = tasks.get_task(str(path))
    assert tasks.load_split(task, "test") == [("Acme, Inc. beats", 1), ("NA", 0)]
