"""Non-IID client shards of the target domain.

* Amazon (default): clients are spread over the four product categories (the natural key);
  inside a category each client draws its label mix from Dirichlet(alpha) (label skew) and
  its size from a log-normal (quantity skew). Every client gets at least ``min_examples``.
* IMDB: reviews ordered by (shuffled) movie and cut into contiguous shards, so a client holds
  the reviews of one or a few movies (movies as natural clients), with log-normal sizes.

flwr-datasets' ``DirichletPartitioner`` was tried first: at alpha = 0.1 with 25 clients per
category and a minimum shard size it gives up after 10 resampling attempts, so the
allocation here is constructive (it cannot fail) while keeping the same Dirichlet model.
Partitions are disjoint and complete: every pool example belongs to exactly one client.
"""

from __future__ import annotations

import numpy as np

from fedrnn.data.loaders import AMAZON_CATEGORIES, DataError, Reviews


class PartitionError(ValueError):
    """The requested partition cannot be built from this data."""


def _allocate(weights: np.ndarray, total: int, minimum: int) -> np.ndarray:
    """Integer sizes summing to ``total``, each >= ``minimum``, proportional to ``weights`` otherwise."""
    n = len(weights)
    if n * minimum > total:
        raise PartitionError(f"{n} clients x {minimum} examples minimum needs {n * minimum}, only {total} available")
    spare = total - n * minimum
    share = weights / weights.sum() * spare
    sizes = np.floor(share).astype(np.int64)
    remainder = spare - sizes.sum()
    sizes[np.argsort(share - sizes)[::-1][:remainder]] += 1
    return sizes + minimum


def _label_skewed_shards(
    labels: np.ndarray,
    index: np.ndarray,
    n_clients: int,
    alpha: float,
    quantity_sigma: float,
    minimum: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Split ``index`` (one category) over clients with Dirichlet label mixes and log-normal sizes."""
    sizes = _allocate(rng.lognormal(0.0, quantity_sigma, n_clients), len(index), minimum)
    classes = np.unique(labels[index])
    mix = rng.dirichlet(np.full(len(classes), alpha), size=n_clients)  # client x class wish
    pools = {c: list(rng.permutation(index[labels[index] == c])) for c in classes}
    shards: list[list[int]] = [[] for _ in range(n_clients)]
    # Fill clients one example at a time in a seeded round-robin, each drawing the class it
    # wants most relative to what it holds; a class that runs out is replaced by what is left.
    want = mix * sizes[:, None]
    have = np.zeros_like(want)
    for _ in range(int(sizes.max())):
        for k in rng.permutation(n_clients):
            if len(shards[k]) >= sizes[k]:
                continue
            deficit = want[k] - have[k]
            for ci in np.argsort(-deficit):
                if pools[classes[ci]]:
                    shards[k].append(pools[classes[ci]].pop())
                    have[k, ci] += 1
                    break
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]


def partition_amazon(
    pool: Reviews, num_clients: int, alpha: float, seed: int, min_examples: int = 4, quantity_sigma: float = 0.5
) -> list[np.ndarray]:
    """Client -> indices into ``pool``; client k belongs to category ``k % 4``."""
    rng = np.random.default_rng([seed, 1])
    shards: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * num_clients
    for ci, cat in enumerate(AMAZON_CATEGORIES):
        members = [k for k in range(num_clients) if k % len(AMAZON_CATEGORIES) == ci]
        if not members:
            continue
        index = np.flatnonzero(pool.groups == cat)
        if len(index) == 0:
            raise DataError(f"{pool.source}: no reviews of category {cat!r} to partition")
        try:
            parts = _label_skewed_shards(pool.labels, index, len(members), alpha, quantity_sigma, min_examples, rng)
        except PartitionError as e:
            raise PartitionError(f"category {cat}: {e}; use fewer clients or a smaller run.min_client_examples") from e
        for k, part in zip(members, parts, strict=True):
            shards[k] = part
    return shards


def partition_by_group(
    pool: Reviews, num_clients: int, seed: int, min_examples: int = 4, quantity_sigma: float = 0.5
) -> list[np.ndarray]:
    """Contiguous shards of the pool ordered by shuffled natural group (IMDb movie)."""
    rng = np.random.default_rng([seed, 2])
    groups = pool.groups.astype(str)
    order_of_group = {g: i for i, g in enumerate(rng.permutation(np.unique(groups)))}
    order = np.lexsort((rng.random(len(pool)), np.array([order_of_group[g] for g in groups])))
    try:
        sizes = _allocate(rng.lognormal(0.0, quantity_sigma, num_clients), len(pool), min_examples)
    except PartitionError as e:
        raise PartitionError(f"{e}; use fewer clients or a smaller run.min_client_examples") from e
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [np.sort(order[bounds[k] : bounds[k + 1]]) for k in range(num_clients)]


def split_holdout(shard: np.ndarray, fraction: float, seed: int, client_id: int) -> tuple[np.ndarray, np.ndarray]:
    """A client's local train / held-out split (at least one example on each side)."""
    rng = np.random.default_rng([seed, 3, client_id])
    perm = rng.permutation(shard)
    n_hold = min(max(1, int(round(fraction * len(shard)))), len(shard) - 1)
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def save_partitions(path: str, shards: list[np.ndarray]) -> None:
    sizes = np.array([len(s) for s in shards], dtype=np.int64)
    flat = np.concatenate(shards) if shards else np.zeros(0, dtype=np.int64)
    np.savez(path, sizes=sizes, index=flat)


def load_partitions(path: str) -> list[np.ndarray]:
    try:
        with np.load(path) as z:
            sizes, flat = z["sizes"], z["index"]
    except (OSError, KeyError, ValueError) as e:
        raise PartitionError(f"{path}: unreadable partition file ({e})") from e
    if sizes.sum() != len(flat) or (sizes < 0).any():
        raise PartitionError(f"{path}: partition sizes do not add up to the index length")
    return np.split(flat, np.cumsum(sizes)[:-1])
