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

import os
import tarfile
import zlib
from pathlib import Path

import numpy as np

from fedrnn.data.releases import (
    AMAZON_URL,
    IMDB_URL,
    DirSource,
    TarSource,
    amazon_from_release,
    imdb_from_release,
    parse_review_xml,
)
from fedrnn.data.reviews import DataError, Reviews, labelled_from_records, read_jsonl_gz, read_table

DATA_DIR_ENV = "FEDRNN_DATA_DIR"
AMAZON_CATEGORIES = ("books", "dvd", "electronics", "kitchen")
# The official release names the kitchen folder after its Amazon category.
# Fixed seed of the documented Amazon 80/20 split (1,600 train / 400 test per category).
AMAZON_SPLIT_SEED = 2007
IMDB_SPLITS = ("train", "test", "unsup")


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


def load_review_file(path: str | os.PathLike[str]) -> Reviews:
    """Load one private review file of any supported format (a device's own data).

    ``.jsonl.gz``/``.jsonl`` records with ``text`` and ``label``; an Amazon ``.review`` file
    (label from its name: ``positive.review``/``negative.review``); or a CSV/TSV with
    ``label`` and ``text`` columns. Labels must be 0 (negative) or 1 (positive).
    """
    p = Path(path)
    name = p.name.lower()
    if name.endswith(".review"):
        if not p.is_file():
            raise DataError(f"review file {p} does not exist")
        if name not in ("positive.review", "negative.review"):
            raise DataError(f"{p}: a .review file must be named positive.review or negative.review")
        label = 1 if name.startswith("positive") else 0
        recs = [dict(r, label=label) for r in parse_review_xml(p.read_bytes().decode("utf-8", "replace"))]
        return labelled_from_records(recs, p, "group")
    rows = read_table(p)
    for lineno, rec in rows:
        if isinstance(rec.get("label"), str):  # CSV/TSV cells are text; "1" is the number 1
            try:
                rec["label"] = int(rec["label"])
            except ValueError:
                raise DataError(f"{p}: line {lineno} has label {rec['label']!r}; expected 0 or 1") from None
    return labelled_from_records([rec for _, rec in rows], p, "group")


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
            return imdb_from_release(DirSource(cand.parent), split, cand)
        if cand.is_file():
            try:
                with tarfile.open(cand, "r:*") as tar:
                    return imdb_from_release(TarSource(tar), split, cand)
            except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
                raise DataError(f"{cand}: truncated or corrupt tar archive ({e}); re-download {IMDB_URL}") from e
    raise DataError(
        f"IMDB {split} not found; looked for {', '.join(str(c) for c in candidates)}. "
        f"Download the official release from {IMDB_URL} into {root}"
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
            return amazon_from_release(DirSource(cand.parent), cand)
        if cand.is_file():
            try:
                with tarfile.open(cand, "r:*") as tar:
                    return amazon_from_release(TarSource(tar), cand)
            except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
                raise DataError(f"{cand}: truncated or corrupt tar archive ({e}); re-download {AMAZON_URL}") from e
    raise DataError(
        f"Amazon multi-domain reviews not found; looked for {', '.join(str(c) for c in candidates)}. "
        f"Download the official release from {AMAZON_URL} into {root}"
    )


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
