"""Data loaders: real counts through the data-dir setting, official release formats, bad input."""

from __future__ import annotations

import gzip
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from fedrnn.data.loaders import (
    AMAZON_CATEGORIES,
    amazon_split,
    imdb_validation_split,
    load_amazon,
    load_imdb,
    load_review_file,
    resolve_data_dir,
)
from fedrnn.data.reviews import DataError, clean_text


def test_imdb_counts(data_dir: Path) -> None:
    for split in ("train", "test"):
        r = load_imdb(split, data_dir)
        assert len(r) == 25_000
        assert (r.labels == 0).sum() == 12_500 and (r.labels == 1).sum() == 12_500
        assert all("<br" not in t for t in r.texts[:2000])
    train = load_imdb("train", data_dir)
    assert train.texts[int(np.flatnonzero(train.labels == 1)[0])].startswith("Bromwell High is a cartoon comedy.")


def test_imdb_validation_is_split_by_movie(data_dir: Path) -> None:
    train, val = imdb_validation_split(load_imdb("train", data_dir), 0.1, seed=0)
    assert len(train) + len(val) == 25_000
    assert 2_000 < len(val) < 3_000
    assert not set(train.groups) & set(val.groups)


def test_amazon_counts_and_split(data_dir: Path) -> None:
    r = load_amazon(data_dir)
    assert len(r) == 8_000
    for cat in AMAZON_CATEGORIES:
        assert (r.groups == cat).sum() == 2_000
    train, test = amazon_split(r)
    for cat in AMAZON_CATEGORIES:
        assert (train.groups == cat).sum() == 1_600 and (test.groups == cat).sum() == 400
        assert (test.labels[test.groups == cat] == 1).sum() == 200
    assert not set(train.texts) & set(test.texts) - {t for t in r.texts if r.texts.count(t) > 1}
    train2, _ = amazon_split(load_amazon(data_dir))
    assert train.texts == train2.texts  # the documented split is fixed


def _mini_aclimdb(root: Path) -> None:
    for split in ("train", "test"):
        for sub, rating in (("neg", 2), ("pos", 9)):
            d = root / "aclImdb" / split / sub
            d.mkdir(parents=True)
            for i in range(3):
                (d / f"{i}_{rating}.txt").write_text(f"{split} {sub} review {i}<br /><br />second line")
            urls = "".join(f"http://www.imdb.com/title/tt00000{i}{sub == 'pos':d}/usercomments\n" for i in range(3))
            (root / "aclImdb" / split / f"urls_{sub}.txt").write_text(urls)
    d = root / "aclImdb" / "train" / "unsup"
    d.mkdir()
    (d / "0_0.txt").write_text("unlabelled")
    (root / "aclImdb" / "train" / "urls_unsup.txt").write_text("http://www.imdb.com/title/tt9999999/usercomments\n")


def _release(src: Path, folder: str, archive: str) -> Path:
    """Pack ``src/folder`` as the official ``archive`` in a download folder, as a user gets it."""
    where = src.parent / "dl"
    where.mkdir()
    with tarfile.open(where / archive, "w:gz") as tar:
        tar.add(src / folder, arcname=folder)
    return where


@pytest.mark.parametrize("packed", [False, True])
def test_official_imdb_release(tmp_path: Path, packed: bool) -> None:
    src = tmp_path / "src"
    _mini_aclimdb(src)
    where = _release(src, "aclImdb", "aclImdb_v1.tar.gz") if packed else src
    train = load_imdb("train", where)
    assert len(train) == 6 and sorted(train.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert train.texts[0] == "train neg review 0 second line"
    assert set(train.groups) == {"tt0000000", "tt0000001", "tt0000010", "tt0000011", "tt0000020", "tt0000021"}
    assert set(train.ratings.tolist()) == {2, 9}
    unsup = load_imdb("unsup", where)
    assert len(unsup) == 1 and unsup.labels[0] == -1 and unsup.groups[0] == "tt9999999"


REVIEW_XML = """<review>
<unique_id>
id-{i}
</unique_id>
<asin>
B000{i}
</asin>
<rating>
{rating}.0
</rating>
<title>
Title &amp; more
</title>
<review_text>
Text {i} &quot;quoted&quot;
</review_text>
</review>
"""


@pytest.mark.parametrize("packed", [False, True])
def test_official_amazon_release(tmp_path: Path, packed: bool) -> None:
    src = tmp_path / "src"
    for folder in ("books", "dvd", "electronics", "kitchen_&_housewares"):
        d = src / "sorted_data_acl" / folder
        d.mkdir(parents=True)
        (d / "positive.review").write_text("".join(REVIEW_XML.format(i=i, rating=5) for i in range(2)))
        (d / "negative.review").write_text("".join(REVIEW_XML.format(i=i, rating=1) for i in range(3)))
    where = _release(src, "sorted_data_acl", "domain_sentiment_data.tar.gz") if packed else src
    r = load_amazon(where)
    assert len(r) == 20
    assert sorted(set(r.groups)) == sorted(AMAZON_CATEGORIES)
    assert (r.labels == 1).sum() == 8
    assert r.texts[0] == 'Text 0 "quoted"'
    one = load_review_file(src / "sorted_data_acl" / "books" / "positive.review")
    assert len(one) == 2 and set(one.labels) == {1}


def test_clean_text() -> None:
    assert clean_text("a<br /><br />b  \n c<BR/>d") == "a b c d"


def test_missing_data_dir_names_where_and_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDRNN_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="does not exist"):
        resolve_data_dir(tmp_path / "nope")
    with pytest.raises(DataError, match=r"aclImdb_v1\.tar\.gz.*ai\.stanford\.edu"):
        load_imdb("train", tmp_path)
    with pytest.raises(DataError, match="domain_sentiment_data"):
        load_amazon(tmp_path)


def test_truncated_gzip(tmp_path: Path, data_dir: Path) -> None:
    raw = (data_dir / "amazon_multidomain" / "reviews.jsonl.gz").read_bytes()
    (tmp_path / "amazon_multidomain").mkdir()
    (tmp_path / "amazon_multidomain" / "reviews.jsonl.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"reviews\.jsonl\.gz: truncated or corrupt gzip"):
        load_amazon(tmp_path)


@pytest.mark.parametrize("label", [2, -1, "pos", None, True])
def test_wrong_label_values(tmp_path: Path, label: object) -> None:
    (tmp_path / "imdb").mkdir()
    with gzip.open(tmp_path / "imdb" / "train.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "fine", "label": 1, "movie": "tt1"}) + "\n")
        f.write(json.dumps({"text": "bad", "label": label, "movie": "tt1"}) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl\.gz: record 2 has label"):
        load_imdb("train", tmp_path)


def test_bad_json_line_named(tmp_path: Path) -> None:
    p = tmp_path / "mine.jsonl"
    p.write_text('{"text": "ok", "label": 1}\n{not json\n')
    with pytest.raises(DataError, match=r"mine\.jsonl: line 2 is not valid JSON"):
        load_review_file(p)
