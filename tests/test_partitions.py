"""Client shards: disjoint, complete, with the configured skew."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedrnn.data.loaders import AMAZON_CATEGORIES, amazon_split, load_amazon
from fedrnn.data.partitions import (
    PartitionError,
    load_partitions,
    partition_amazon,
    partition_by_group,
    save_partitions,
    split_holdout,
)
from fedrnn.data.reviews import Reviews


@pytest.fixture(scope="module")
def amazon_pool(data_dir: Path) -> Reviews:
    return amazon_split(load_amazon(data_dir))[0]


def _label_skew(pool: Reviews, shards: list[np.ndarray]) -> float:
    """Mean distance of a client's positive share from its category's (0 = IID)."""
    return float(np.mean([abs(pool.labels[s].mean() - 0.5) for s in shards]))


@pytest.mark.parametrize("alpha", [0.1, 1.0, 100.0])
def test_amazon_partition_disjoint_complete(amazon_pool: Reviews, alpha: float) -> None:
    shards = partition_amazon(amazon_pool, 100, alpha, seed=0, min_examples=4)
    flat = np.concatenate(shards)
    assert len(flat) == len(amazon_pool) == len(set(flat.tolist()))
    assert min(len(s) for s in shards) >= 4
    for k, s in enumerate(shards):
        assert set(amazon_pool.groups[s]) == {AMAZON_CATEGORIES[k % 4]}


def test_label_skew_follows_alpha(amazon_pool: Reviews) -> None:
    skews = [_label_skew(amazon_pool, partition_amazon(amazon_pool, 100, a, seed=0)) for a in (0.1, 1.0, 100.0)]
    assert skews[0] > 0.3 > skews[1] > skews[2]
    assert skews[2] < 0.1


def test_quantity_skew_and_seed(amazon_pool: Reviews) -> None:
    a = partition_amazon(amazon_pool, 100, 1.0, seed=0)
    b = partition_amazon(amazon_pool, 100, 1.0, seed=0)
    c = partition_amazon(amazon_pool, 100, 1.0, seed=1)
    sizes = np.array([len(s) for s in a])
    assert sizes.max() > 2 * sizes.min()
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_group_partition_keeps_movies_together() -> None:
    groups = np.repeat([f"tt{i}" for i in range(40)], 10)
    pool = Reviews(texts=[""] * 400, labels=np.zeros(400, dtype=np.int64), groups=groups.astype(object))
    shards = partition_by_group(pool, 10, seed=0, min_examples=4)
    assert sorted(np.concatenate(shards).tolist()) == list(range(400))
    movies_per_client = [len(set(groups[s])) for s in shards]
    assert np.mean(movies_per_client) < 8  # contiguous movie blocks, not a random scatter of 40


def test_too_many_clients_is_a_clear_error(amazon_pool: Reviews) -> None:
    with pytest.raises(PartitionError, match="min_client_examples"):
        partition_amazon(amazon_pool, 2000, 1.0, seed=0, min_examples=4)


def test_holdout_and_file_roundtrip(tmp_path: Path, amazon_pool: Reviews) -> None:
    shards = partition_amazon(amazon_pool, 8, 1.0, seed=0)
    train, held = split_holdout(shards[3], 0.2, seed=0, client_id=3)
    assert len(held) >= 1 and not set(train) & set(held) and len(train) + len(held) == len(shards[3])
    save_partitions(str(tmp_path / "p.npz"), shards)
    again = load_partitions(str(tmp_path / "p.npz"))
    assert all(np.array_equal(x, y) for x, y in zip(shards, again, strict=True))
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(PartitionError, match="bad.npz"):
        load_partitions(str(tmp_path / "bad.npz"))
