"""Bring-your-own data: labelled files in every format, natural / Dirichlet / quantity partitions,
the per-group test split, and a target with more than two classes."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from fedrnn.config import ConfigError, load_config
from fedrnn.data.files import Columns, load_labelled_file
from fedrnn.data.partitions import PartitionError, partition_dirichlet, partition_natural, partition_quantity
from fedrnn.data.reviews import DataError
from fedrnn.data.target import load_target
from fedrnn.federation.prepare import check_files, prepare_run
from fedrnn.model.checkpoint import load_checkpoint

ROWS = [  # (text, label, source): string labels, a custom column name for the text
    ("great phone, love it", "pos", "amazon"),
    ("battery died in a day", "neg", "amazon"),
    ("the soup was cold", "neg", "yelp"),
    ("best tacos in town", "pos", "yelp"),
    ("a moving film", "pos", "imdb"),
]


def write_rows(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    """The rows in the format the file name says, with columns ``review``, ``label`` and ``source``."""
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        body = "".join(json.dumps({"review": t, "label": y, "source": g}) + "\n" for t, y, g in rows)
        path.write_bytes(gzip.compress(body.encode()) if name.endswith(".gz") else body.encode())
    else:
        with path.open("w", newline="") as f:
            w = csv.writer(f, delimiter="\t" if name.endswith(".tsv") else ",")
            w.writerow(["source", "review", "label"])
            w.writerows([(g, t, y) for t, y, g in rows])
    return path


@pytest.mark.parametrize("name", ["mine.jsonl", "mine.jsonl.gz", "mine.csv", "mine.tsv"])
def test_every_format_with_string_labels_and_custom_columns(tmp_path: Path, name: str) -> None:
    f = load_labelled_file(write_rows(tmp_path / name, ROWS), Columns(text="review", group="source"))
    assert f.classes == ["neg", "pos"]  # sentiment words map to the teacher's order
    assert f.reviews.texts == [t for t, _, _ in ROWS]
    assert f.reviews.labels.tolist() == [1, 0, 0, 1, 1]
    assert f.reviews.groups.tolist() == ["amazon", "amazon", "yelp", "yelp", "imdb"]


def test_class_order_numbers_and_more_classes(tmp_path: Path) -> None:
    three = [("a", "sports", "x"), ("b", "politics", "x"), ("c", "tech", "y"), ("d", "tech", "y")]
    f = load_labelled_file(write_rows(tmp_path / "t.csv", three), Columns(text="review"))
    assert f.classes == ["politics", "sports", "tech"] and f.reviews.labels.tolist() == [1, 0, 2, 2]
    f = load_labelled_file(tmp_path / "t.csv", Columns(text="review"), classes=["tech", "sports", "politics"])
    assert f.reviews.labels.tolist() == [1, 2, 0, 0]
    nums = [("a", "2", "x"), ("b", "0", "x"), ("c", "1", "x")]
    assert load_labelled_file(write_rows(tmp_path / "n.tsv", nums), Columns(text="review")).classes == ["0", "1", "2"]


@pytest.mark.parametrize(("name", "body", "match"), [
    ("a.jsonl", '{"review": "ok", "label": "pos"}\n{"review": "x", "label": []}\n', r"a\.jsonl: line 2 has label \[\]"),
    ("b.jsonl", '{"review": "ok", "label": "pos"}\n\n{"text": "x", "label": "neg"}\n', r"b\.jsonl: line 3 has no text"),
    ("c.csv", "review,label\nok,pos\nfine,neg,extra\n", r"c\.csv: line 3 has 3 columns"),
    ("d.tsv", "review\tlabel\nok\tpos\nno\tpos\n", r"d\.tsv: every record has label 'pos'"),
    ("e.jsonl", '{"review": "ok", "label": "pos"}\n{broken\n', r"e\.jsonl: line 2 is not valid JSON"),
])
def test_bad_files_name_file_and_line(tmp_path: Path, name: str, body: str, match: str) -> None:
    (tmp_path / name).write_text(body)
    with pytest.raises(DataError, match=match):
        load_labelled_file(tmp_path / name, Columns(text="review"))


def test_label_outside_the_given_classes_is_named(tmp_path: Path) -> None:
    write_rows(tmp_path / "x.csv", ROWS)
    with pytest.raises(DataError, match=r"x\.csv: line 3 has label 'neg', not one of the classes"):
        load_labelled_file(tmp_path / "x.csv", Columns(text="review"), classes=["pos", "meh"])


def test_natural_partition_sizes_split_and_merge() -> None:
    keys = np.repeat(["amazon", "imdb", "yelp"], [1000, 500, 100])
    shards, notes = partition_natural(keys, 16, seed=0, min_examples=4)
    assert sorted(np.concatenate(shards).tolist()) == list(range(1600))  # disjoint and complete
    per_value = {v: sum(1 for s in shards if set(keys[s]) == {v}) for v in ("amazon", "imdb", "yelp")}
    assert per_value == {"amazon": 10, "imdb": 5, "yelp": 1}  # clients in proportion to the value's size
    assert all(len(set(keys[s])) == 1 for s in shards)  # a split never mixes values
    sizes = [len(s) for s in shards if keys[s[0]] == "amazon"]
    assert max(sizes) - min(sizes) <= 1 and any("'amazon' (1000 examples) split over 10" in n for n in notes)
    many = np.repeat([f"user{i}" for i in range(40)], np.arange(40) + 5)
    shards, notes = partition_natural(many, 8, seed=0, min_examples=4)
    assert len(shards) == 8 and all(len({str(k) for k in many[s]}) >= 2 for s in shards)  # merged, never split
    assert max(map(len, shards)) - min(map(len, shards)) <= 45 and "hold several values" in notes[0]
    with pytest.raises(PartitionError, match="fewer than 4 examples"):
        partition_natural(np.repeat(["a", "b"], [10, 6]), 4, seed=0, min_examples=4)


def test_dirichlet_and_quantity_partitions() -> None:
    labels = np.repeat([0, 1], 500)
    skewed = partition_dirichlet(labels, 10, alpha=0.1, seed=0)
    iid = partition_dirichlet(labels, 10, alpha=100.0, seed=0)
    skew = [np.mean([abs(labels[s].mean() - 0.5) for s in shards]) for shards in (skewed, iid)]
    assert skew[0] > 0.3 > 0.1 > skew[1] and {len(s) for s in skewed} == {100}
    sizes = [len(s) for s in partition_quantity(1000, 10, sigma=1.0, seed=0)]
    assert sum(sizes) == 1000 and max(sizes) > 3 * min(sizes) and min(sizes) >= 4


def test_config_checks_the_target(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"run.target: .*none\.csv names no existing file"):
        check_files(load_config(None, {"run": {"target": str(tmp_path / "none.csv")}}))
    with pytest.raises(ConfigError, match="run.target must be one of"):
        load_config(None, {"run": {"target": str(tmp_path / "mine.txt")}})
    with pytest.raises(ConfigError, match="run.partition must be"):
        load_config(None, {"run": {"partition": "random"}})


def test_file_target_run_preparation(tmp_path: Path, cache_dir: Path, tiny_teacher: tuple[Path, dict]) -> None:
    """A 3-class CSV: per-group test split saved with the run, natural shards, a re-initialised head."""
    rng = np.random.default_rng(0)
    rows = [(f"text {i} {'good' if i % 3 else 'bad'}", ["low", "mid", "high"][i % 3], f"g{i % 4}") for i in range(240)]
    path = write_rows(tmp_path / "three.csv", [rows[i] for i in rng.permutation(240)])
    cfg = load_config(None, {"run": {"target": str(path), "text_column": "review", "group_column": "source",
                                     "classes": ["low", "mid", "high"], "clients": 8, "clients_per_round": 4,
                                     "partition": "natural",
                                     "teacher": str(tiny_teacher[0])}, "server": {"retention_examples": 0}})
    prepared = prepare_run(cfg, tmp_path / "run", Console(quiet=True))
    data = load_target(prepared.target_path)
    assert data.classes == ["low", "mid", "high"] and len(data.test) == 48  # 20% of each (group, class)
    for g in ("g0", "g1", "g2", "g3"):
        assert (data.test_groups == g).sum() == 12
    with gzip.open(tmp_path / "run" / "target_test.jsonl.gz", "rt") as f:
        saved = [json.loads(line) for line in f]
    assert len(saved) == 48 and {r["label"] for r in saved} == {"low", "mid", "high"}
    info = json.loads((tmp_path / "run" / "partition.json").read_text())
    assert info["method"] == "natural" and info["sizes"]["min"] >= 4
    model, _, _ = load_checkpoint(prepared.teacher_dir)
    teacher, _, _ = load_checkpoint(tiny_teacher[0])
    assert model.cfg.num_classes == 3 and model.head.weight.shape[0] == 3
    assert np.array_equal(model.embedding.weight.detach().numpy(), teacher.embedding.weight.detach().numpy())
