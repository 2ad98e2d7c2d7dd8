"""The target-domain data of a federated run, tokenized once and cached as ``.npz``.

The server prepares it before the run; ClientApps (Ray actors, one process serving many
clients) memory-map it once per process. This keeps per-client start-up to a slice of an
array instead of re-reading and re-tokenizing text every round.

Pools:
* ``amazon``: clients' pool = the fixed Amazon train split (1,600 per category); target test =
  the Amazon test split (400 per category).
* ``imdb``: the IMDB test reviews (unseen by the teacher), split by movie: 90% of the reviews form
  the clients' pool, 10% the target test set.
Both carry ``retention``: a fixed IMDB test subset that measures how much source skill is kept.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from fedrnn.data.loaders import amazon_split, imdb_validation_split, load_amazon, load_imdb
from fedrnn.data.tokenizer import Encoded, encode

SPLITS = ("pool", "test", "retention")


@dataclass
class TargetData:
    pool: Encoded
    pool_groups: np.ndarray  # natural group of each pool example (category or movie)
    test: Encoded
    test_groups: np.ndarray
    retention: Encoded


def cache_path(cache_dir: Path, target: str, tokenizer: Tokenizer, max_len: int, retention: int) -> Path:
    digest = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{target}-{digest}-len{max_len}-ret{retention}.npz"


def prepare_target(
    target: str, tokenizer: Tokenizer, max_len: int, retention: int, cache_dir: Path, data_dir: str | None
) -> Path:
    """Tokenize the target pools once; returns the cache file (reused if already there)."""
    path = cache_path(cache_dir, target, tokenizer, max_len, retention)
    if path.is_file():
        return path
    imdb_test = load_imdb("test", data_dir)
    if target == "amazon":
        pool, test = amazon_split(load_amazon(data_dir))
        rest = imdb_test
    else:
        pool, test = imdb_validation_split(imdb_test, fraction=0.1, seed=7)
        rest = test
    ret = rest.subset(np.random.default_rng(11).permutation(len(rest))[:retention])
    arrays: dict[str, np.ndarray] = {}
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

    return TargetData(enc("pool"), a["pool_groups"], enc("test"), a["test_groups"], enc("retention"))
