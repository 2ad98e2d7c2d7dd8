"""Real sentiment data: IMDB (aclImdb v1) and the Amazon Multi-Domain Sentiment Dataset.

Two on-disk forms are accepted for each data set, so the same code serves CI and a user:

* the prepared gzipped JSON Lines in a data directory (``imdb/train.jsonl.gz``,
  ``amazon_multidomain/reviews.jsonl.gz``), as laid out in ``shared/data``;
* the official release a user downloads, either unpacked (``aclImdb/``,
  ``sorted_data_acl/``) or still packed (``aclImdb_v1.tar.gz``,
  ``domain_sentiment_data.tar.gz``).

Where the data lives is a setting: an explicit ``data_dir`` argument, else the
``FEDRNN_DATA_DIR`` environment variable, else ``./data``. Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import html
import json
import math
import os
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DATA_DIR_ENV = "FEDRNN_DATA_DIR"
IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
AMAZON_URL = "https://www.cs.jhu.edu/~mdredze/datasets/sentiment/domain_sentiment_data.tar.gz"
AMAZON_CATEGORIES = ("books", "dvd", "electronics", "kitchen")
# The official release names the kitchen folder after its Amazon category.
_AMAZON_FOLDERS = {"kitchen_&_housewares": "kitchen"}
# Fixed seed of the documented Amazon 80/20 split (1,600 train / 400 test per category).
AMAZON_SPLIT_SEED = 2007
IMDB_SPLITS = ("train", "test", "unsup")


class DataError(ValueError):
    """Missing, corrupt or malformed data; the message names the file and the problem."""


@dataclass
class Reviews:
    """A labelled (or unlabelled, label -1) set of review texts.

    ``group`` is the natural non-IID key: the IMDb movie id, or the Amazon category.
    """

    texts: list[str]
    labels: np.ndarray
    groups: np.ndarray
    source: str = ""
    ratings: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self) -> None:
        if len(self.ratings) == 0:
            self.ratings = np.zeros(len(self.texts), dtype=np.int64)
        if not len(self.texts) == len(self.labels) == len(self.groups) == len(self.ratings):
            raise DataError(f"{self.source}: texts, labels, groups and ratings differ in length")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: Iterable[int] | np.ndarray) -> Reviews:
        idx = np.asarray(list(index) if not isinstance(index, np.ndarray) else index, dtype=np.int64)
        return Reviews(
            texts=[self.texts[i] for i in idx],
            labels=self.labels[idx],
            groups=self.groups[idx],
            source=self.source,
            ratings=self.ratings[idx],
        )


_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
_SPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Strip the HTML line breaks IMDB keeps (``<br /><br />``) and normalise whitespace."""
    return _SPACE.sub(" ", _BR.sub(" ", text)).strip()


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the data sets live: the argument, else ``$FEDRNN_DATA_DIR``, else ``./data``."""
    chosen = data_dir or os.environ.get(DATA_DIR_ENV) or "data"
    path = Path(chosen).expanduser()
    if not path.is_dir():
        how = (
            "--data-dir" if data_dir else (f"${DATA_DIR_ENV}" if os.environ.get(DATA_DIR_ENV) else "the default ./data")
        )
        raise DataError(
            f"data directory {path} (from {how}) does not exist; point --data-dir or "
            f"${DATA_DIR_ENV} at a folder holding imdb/ and amazon_multidomain/ (prepared JSON Lines) or "
            f"the official releases aclImdb_v1.tar.gz ({IMDB_URL}) and "
            f"domain_sentiment_data.tar.gz ({AMAZON_URL})"
        )
    return path


# ---------------------------------------------------------------- JSON Lines


def json_record(line: str, path: Path, lineno: int) -> dict:
    """One JSON Lines record; anything but a JSON object is a DataError naming the file and line."""
    try:
        rec = json.loads(line)
    except (ValueError, RecursionError) as e:  # bad JSON, a 5,000-digit number, [[[[... nested too deep
        raise DataError(f"{path}: line {lineno} is not valid JSON ({type(e).__name__}: {e})") from e
    if not isinstance(rec, dict):
        raise DataError(f"{path}: line {lineno} is not a JSON object")
    return rec


def _rating(value: object, path: Path, n: int) -> int:
    """A record's optional star rating (0 = unknown); ratings parsed from XML arrive as text like "4.0"."""
    if value is None or value == "":
        return 0
    try:
        r = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        r = math.nan
    if isinstance(value, bool) or not 0 <= r <= 10:
        raise DataError(f"{path}: record {n} has rating {value!r}; expected a number in [0, 10]")
    return int(r)


def read_jsonl_gz(path: Path) -> list[dict]:
    """Read a gzipped JSON Lines file; a truncated or corrupt file is a DataError naming it."""
    records: list[dict] = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    records.append(json_record(line, path, lineno))
    except (EOFError, gzip.BadGzipFile, zlib.error, UnicodeDecodeError) as e:
        raise DataError(f"{path}: truncated or corrupt gzip file ({e}); re-copy or re-download it") from e
    return records


def labelled_from_records(records: list[dict], path: Path, group_key: str, labelled: bool = True) -> Reviews:
    texts, labels, groups, ratings = [], [], [], []
    for n, rec in enumerate(records, start=1):
        text = rec.get("text")
        if not isinstance(text, str):
            raise DataError(f"{path}: record {n} has no string field 'text'")
        if labelled:
            label = rec.get("label")
            if label not in (0, 1) or isinstance(label, bool):
                raise DataError(f"{path}: record {n} has label {label!r}; expected 0 (negative) or 1 (positive)")
        else:
            label = -1
        texts.append(clean_text(text))
        labels.append(label)
        groups.append(str(rec.get(group_key, "")))
        ratings.append(_rating(rec.get("rating"), path, n))
    return Reviews(
        texts=texts,
        labels=np.asarray(labels, dtype=np.int64),
        groups=np.asarray(groups, dtype=object),
        source=str(path),
        ratings=np.asarray(ratings, dtype=np.int64),
    )


# ---------------------------------------------------------------- IMDB


def load_imdb(split: str, data_dir: str | os.PathLike[str] | None = None) -> Reviews:
    """IMDB ``train``/``test`` (labelled) or ``unsup`` (label -1); group = IMDb movie id."""
    if split not in IMDB_SPLITS:
        raise DataError(f"IMDB split {split!r} unknown; expected one of {IMDB_SPLITS}")
    root = resolve_data_dir(data_dir)
    candidates = [root / "imdb" / f"{split}.jsonl.gz", root / "aclImdb", root / "aclImdb_v1.tar.gz"]
    if (root / f"{split}.jsonl.gz").is_file() and root.name == "imdb":
        candidates.insert(0, root / f"{split}.jsonl.gz")
    for cand in candidates:
        if cand.is_file() and cand.name.endswith(".jsonl.gz"):
            reviews = labelled_from_records(read_jsonl_gz(cand), cand, "movie", labelled=split != "unsup")
            return reviews
        if cand.is_dir():
            return _imdb_from_release(_DirSource(cand.parent), split, cand)
        if cand.is_file():
            try:
                with tarfile.open(cand, "r:*") as tar:
                    return _imdb_from_release(_TarSource(tar), split, cand)
            except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
                raise DataError(f"{cand}: truncated or corrupt tar archive ({e}); re-download {IMDB_URL}") from e
    raise DataError(
        f"IMDB {split} not found; looked for {', '.join(str(c) for c in candidates)}. "
        f"Download the official release from {IMDB_URL} into {root}"
    )


class _DirSource:
    """Files of an unpacked release, addressed by their path inside the archive."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def files(self, prefix: str) -> Iterator[tuple[str, bytes]]:
        base = self.root / prefix
        if not base.is_dir():
            return
        for p in sorted(base.iterdir()):
            if p.is_file():
                yield f"{prefix}/{p.name}", p.read_bytes()

    def read(self, name: str) -> bytes | None:
        p = self.root / name
        return p.read_bytes() if p.is_file() else None


class _TarSource:
    """Files of a packed release; read in one pass since gzip tars are sequential."""

    def __init__(self, tar: tarfile.TarFile) -> None:
        self.members: dict[str, bytes] = {}
        for m in tar:
            if m.isfile():
                f = tar.extractfile(m)
                if f is not None:
                    self.members[m.name.lstrip("./")] = f.read()

    def files(self, prefix: str) -> Iterator[tuple[str, bytes]]:
        pre = prefix.rstrip("/") + "/"
        for name in sorted(self.members):
            if name.startswith(pre) and "/" not in name[len(pre) :]:
                yield name, self.members[name]

    def read(self, name: str) -> bytes | None:
        return self.members.get(name)


_IMDB_NAME = re.compile(r"(\d+)_(\d+)\.txt$")
_MOVIE = re.compile(r"title/(tt\d+)")


def _imdb_from_release(src: _DirSource | _TarSource, split: str, where: Path) -> Reviews:
    folder = "train" if split == "unsup" else split
    parts = [("unsup", -1)] if split == "unsup" else [("neg", 0), ("pos", 1)]
    texts, labels, groups, ratings = [], [], [], []
    for sub, label in parts:
        urls = src.read(f"aclImdb/{folder}/urls_{sub}.txt")
        movies = [m.group(1) if (m := _MOVIE.search(u)) else "" for u in (urls or b"").decode().splitlines()]
        found = 0
        for name, raw in src.files(f"aclImdb/{folder}/{sub}"):
            m = _IMDB_NAME.search(name)
            if not m:
                continue
            idx, rating = int(m.group(1)), int(m.group(2))
            texts.append(clean_text(raw.decode("utf-8", "replace")))
            labels.append(label)
            groups.append(movies[idx] if idx < len(movies) else "")
            ratings.append(rating)
            found += 1
        if found == 0:
            raise DataError(f"{where}: no reviews under aclImdb/{folder}/{sub}/; is this the official aclImdb release?")
    return Reviews(
        texts=texts,
        labels=np.asarray(labels, dtype=np.int64),
        groups=np.asarray(groups, dtype=object),
        source=f"{where}:{split}",
        ratings=np.asarray(ratings, dtype=np.int64),
    )


def imdb_validation_split(train: Reviews, fraction: float = 0.1, seed: int = 0) -> tuple[Reviews, Reviews]:
    """Carve a validation slice from IMDB train *by movie id*, so no movie is in both parts."""
    if not 0 < fraction < 1:
        raise DataError(f"validation fraction must be in (0, 1), got {fraction}")
    movies = np.unique(train.groups.astype(str))
    rng = np.random.default_rng(seed)
    rng.shuffle(movies)
    counts = {m: 0 for m in movies}
    for g in train.groups:
        counts[str(g)] += 1
    target, chosen, total = fraction * len(train), set(), 0
    for m in movies:
        if total >= target:
            break
        chosen.add(m)
        total += counts[m]
    is_val = np.array([str(g) in chosen for g in train.groups])
    return train.subset(np.flatnonzero(~is_val)), train.subset(np.flatnonzero(is_val))


# ---------------------------------------------------------------- Amazon


_REVIEW_BLOCK = re.compile(r"<review>(.*?)</review>", re.DOTALL)


def _tag(block: str, tag: str) -> str:
    m = re.search(rf"<{tag}>\s*\n?(.*?)\n?\s*</{tag}>", block, re.DOTALL)
    return html.unescape(m.group(1).strip()) if m else ""


def parse_review_xml(text: str) -> list[dict]:
    """Parse the pseudo-XML ``.review`` format of ``sorted_data_acl`` into records."""
    out = []
    for block in _REVIEW_BLOCK.findall(text):
        out.append(
            {
                "text": _tag(block, "review_text"),
                "title": _tag(block, "title"),
                "asin": _tag(block, "asin"),
                "unique_id": _tag(block, "unique_id"),
                "rating": _tag(block, "rating"),  # text; checked where records become Reviews
            }
        )
    return out


def load_amazon(data_dir: str | os.PathLike[str] | None = None) -> Reviews:
    """All 8,000 labelled Amazon reviews; group = category (books, dvd, electronics, kitchen)."""
    root = resolve_data_dir(data_dir)
    candidates = [
        root / "amazon_multidomain" / "reviews.jsonl.gz",
        root / "sorted_data_acl",
        root / "domain_sentiment_data.tar.gz",
    ]
    for cand in candidates:
        if cand.is_file() and cand.name.endswith(".jsonl.gz"):
            reviews = labelled_from_records(read_jsonl_gz(cand), cand, "group")
            bad = set(reviews.groups) - set(AMAZON_CATEGORIES)
            if bad:
                raise DataError(f"{cand}: unknown categories {sorted(bad)}; expected {AMAZON_CATEGORIES}")
            return reviews
        if cand.is_dir():
            return _amazon_from_release(_DirSource(cand.parent), cand)
        if cand.is_file():
            try:
                with tarfile.open(cand, "r:*") as tar:
                    return _amazon_from_release(_TarSource(tar), cand)
            except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
                raise DataError(f"{cand}: truncated or corrupt tar archive ({e}); re-download {AMAZON_URL}") from e
    raise DataError(
        f"Amazon multi-domain reviews not found; looked for {', '.join(str(c) for c in candidates)}. "
        f"Download the official release from {AMAZON_URL} into {root}"
    )


def _amazon_from_release(src: _DirSource | _TarSource, where: Path) -> Reviews:
    recs = []
    for folder in ("books", "dvd", "electronics", "kitchen_&_housewares"):
        for fname, label in (("negative.review", 0), ("positive.review", 1)):
            raw = src.read(f"sorted_data_acl/{folder}/{fname}")
            if raw is None:
                raise DataError(f"{where}: missing sorted_data_acl/{folder}/{fname}; is this {AMAZON_URL}?")
            group = _AMAZON_FOLDERS.get(folder, folder)
            recs += [dict(r, label=label, group=group) for r in parse_review_xml(raw.decode("utf-8", "replace"))]
    return labelled_from_records(recs, where, "group")


def amazon_split(
    reviews: Reviews, test_fraction: float = 0.2, seed: int = AMAZON_SPLIT_SEED
) -> tuple[Reviews, Reviews]:
    """The fixed, seeded 80/20 split inside each category and label (1,600 / 400 per category)."""
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for cat in AMAZON_CATEGORIES:
        for label in (0, 1):
            idx = np.flatnonzero((reviews.groups == cat) & (reviews.labels == label))
            idx = idx[rng.permutation(len(idx))]
            n_test = int(round(test_fraction * len(idx)))
            test_idx += idx[:n_test].tolist()
            train_idx += idx[n_test:].tolist()
    return reviews.subset(np.sort(train_idx)), reviews.subset(np.sort(test_idx))
