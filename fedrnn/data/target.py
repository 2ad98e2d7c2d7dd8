"""The target-domain data of a federated run, tokenized once and cached as ``.npz``.

The server prepares it before the run; ClientApps (Ray actors, one process serving many
clients) memory-map it once per process. This keeps per-client start-up to a slice of an
array instead of re-reading and re-tokenizing text every round.

Pools:
* ``amazon``: clients' pool = the fixed Amazon train split (1,600 per category); target test =
  the Amazon test split (400 per category).
* ``imdb``: the IMDB test reviews (unseen by the teacher), split by movie: 90% of the reviews form
  the clients' pool, 10% the target test set.
* a path: any labelled text file ``load_labelled_file`` reads (JSON Lines, CSV, TSV; columns named
  by a ``TargetSpec``). The test set is carved inside each (group, class) stratum with a fixed seed,
  so every group is tested and every seed of a study sees the same test set.
All carry ``retention``: a fixed IMDB test subset that measures how much source skill is kept
(skipped with ``retention = 0``, so a file target needs no IMDB data then).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from fedrnn.data.files import Columns, load_labelled_file
from fedrnn.data.loaders import amazon_split, imdb_validation_split, load_amazon, load_imdb
from fedrnn.data.reviews import Reviews
from fedrnn.data.tokenizer import Encoded, encode

SPLITS = ("pool", "test", "retention")
BUILTIN = ("amazon", "imdb")
SENTIMENT = ["negative", "positive"]  # the teacher's classes
TARGET_SPLIT_SEED = 2026  # fixed: every run and seed on a file target shares one test set


@dataclass(frozen=True)
class TargetSpec:
    """How to read a file target: its columns, class order and test share."""

    columns: Columns = Columns()
    classes: tuple[str, ...] = ()  # class names in id order; () = from the labels (see ``class_names``)
    test_fraction: float = 0.2

    def key(self) -> str:
        return repr((self.columns, self.classes, self.test_fraction))


@dataclass
class TargetData:
    pool: Encoded
    pool_groups: np.ndarray  # natural group of each pool example (category or movie)
    test: Encoded
    test_groups: np.ndarray
    retention: Encoded
    classes: list[str]
    pool_keys: np.ndarray  # what natural partitioning splits by (the partition column; else the groups)
    test_texts: np.ndarray  # file targets: the test split's texts, saved with each run; else empty


def cache_path(cache_dir: Path, target: str, tokenizer: Tokenizer, max_len: int, retention: int,
               spec: TargetSpec | None = None) -> Path:
    digest = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:12]
    if target in BUILTIN:
        return Path(cache_dir) / f"{target}-{digest}-len{max_len}-ret{retention}.npz"
    h = hashlib.sha256(Path(target).read_bytes())
    h.update((spec or TargetSpec()).key().encode())
    stem = Path(target).name.split(".")[0]
    return Path(cache_dir) / f"{stem}-{h.hexdigest()[:12]}-{digest}-len{max_len}-ret{retention}.npz"


def split_by_group(
    reviews: Reviews, test_fraction: float, seed: int = TARGET_SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Pool / test indices: ``test_fraction`` of every (group, class) stratum (at least one where it has two)."""
    rng = np.random.default_rng(seed)
    pool, test = [], []
    groups = reviews.groups.astype(str)
    for g in np.unique(groups):
        for c in np.unique(reviews.labels):
            idx = rng.permutation(np.flatnonzero((groups == g) & (reviews.labels == c)))
            n_test = min(max(1, int(round(test_fraction * len(idx)))), len(idx) - 1) if len(idx) > 1 else 0
            test += idx[:n_test].tolist()
            pool += idx[n_test:].tolist()
    return np.sort(pool), np.sort(test)


def prepare_target(
    target: str, tokenizer: Tokenizer, max_len: int, retention: int, cache_dir: Path, data_dir: str | None,
    spec: TargetSpec | None = None,
) -> Path:
    """Tokenize the target pools once; returns the cache file (reused if already there)."""
    spec = spec or TargetSpec()
    path = cache_path(cache_dir, target, tokenizer, max_len, retention, spec)
    if path.is_file():
        return path
    arrays: dict[str, np.ndarray] = {}
    if target in BUILTIN:
        imdb_test = load_imdb("test", data_dir)
        if target == "amazon":
            pool, test = amazon_split(load_amazon(data_dir))
            rest = imdb_test
        else:
            pool, test = imdb_validation_split(imdb_test, fraction=0.1, seed=7)
            rest = test
        arrays |= {"classes": np.asarray(SENTIMENT), "pool_keys": pool.groups.astype(str)}
    else:
        f = load_labelled_file(target, spec.columns, spec.classes)
        pool_idx, test_idx = split_by_group(f.reviews, spec.test_fraction)
        pool, test = f.reviews.subset(pool_idx), f.reviews.subset(test_idx)
        keys = f.partition_keys if spec.columns.partition else f.reviews.groups
        arrays |= {"classes": np.asarray(f.classes), "pool_keys": keys[pool_idx].astype(str),
                   "test_texts": np.asarray(test.texts, dtype=str)}
        rest = load_imdb("test", data_dir) if retention else Reviews([], np.zeros(0, np.int64), np.zeros(0, object))
    ret = rest.subset(np.random.default_rng(11).permutation(len(rest))[:retention])
    for name, reviews in (("pool", pool), ("test", test), ("retention", ret)):
        enc = encode(tokenizer, reviews.texts, reviews.labels, max_len)
        arrays |= {
            f"{name}_ids": enc.ids,
            f"{name}_lengths": enc.lengths,
            f"{name}_labels": enc.labels,
            f"{name}_groups": reviews.groups.astype(str),
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


@functools.lru_cache(maxsize=4)
def load_target(path: str) -> TargetData:
    """Load (once per process) a prepared target cache."""
    with np.load(path, allow_pickle=False) as z:
        a = {k: z[k] for k in z.files}

    def enc(name: str) -> Encoded:
        return Encoded(a[f"{name}_ids"], a[f"{name}_lengths"], a[f"{name}_labels"])

    return TargetData(enc("pool"), a["pool_groups"], enc("test"), a["test_groups"], enc("retention"),
                      [str(c) for c in a.get("classes", SENTIMENT)], a.get("pool_keys", a["pool_groups"]),
                      a.get("test_texts", np.zeros(0, dtype=str)))
