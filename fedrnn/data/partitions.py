"""Non-IID client shards of the target domain.

* Amazon (default): clients are spread over the four product categories (the natural key);
  inside a category each client draws its label mix from Dirichlet(alpha) (label skew) and
  its size from a log-normal (quantity skew). Every client gets at least ``min_examples``.
* IMDB: reviews ordered by (shuffled) movie and cut into contiguous shards, so a client holds
  the reviews of one or a few movies (movies as natural clients), with log-normal sizes.
* Any target, by ``run.partition``: ``natural`` (each value of a column one client, split or
  merged to reach the client count), ``dirichlet`` (label skew, equal sizes) or ``quantity``
  (IID labels, log-normal sizes).

flwr-datasets' ``DirichletPartitioner`` was tried first: at alpha = 0.1 with 25 clients per
category and a minimum shard size it gives up after 10 resampling attempts, so the
allocation here is constructive (it cannot fail) while keeping the same Dirichlet model.
Partitions are disjoint and complete: every pool example belongs to exactly one client.
"""

from __future__ import annotations

import numpy as np

from fedrnn.data.loaders import AMAZON_CATEGORIES
from fedrnn.data.reviews import DataError, Reviews


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


PARTITIONS = ("natural", "dirichlet", "quantity")


def _apportion(counts: np.ndarray, seats: int) -> np.ndarray:
    """``seats`` (>= len(counts)) shared in proportion to ``counts``, at least one each (largest remainders)."""
    share = counts / counts.sum() * seats
    n = np.maximum(1, np.floor(share)).astype(np.int64)
    while n.sum() < seats:
        n[np.argmax(share - n)] += 1
    while n.sum() > seats:
        n[np.argmax(np.where(n > 1, n - share, -np.inf))] -= 1
    return n


def partition_natural(
    keys: np.ndarray, num_clients: int, seed: int, min_examples: int = 4
) -> tuple[list[np.ndarray], list[str]]:
    """Clients from a column's values: each value one client where the numbers allow.

    More values than clients (or values below ``min_examples``): the smallest values are merged
    into the client holding the fewest examples. Fewer values than clients: each value gets a
    number of clients in proportion to its size (at least one) and is split evenly among them.
    Returns the shards and one line per merge/split, for the run log.
    """
    rng = np.random.default_rng([seed, 6])
    keys = np.asarray(keys).astype(str)
    values, counts = np.unique(keys, return_counts=True)
    if len(keys) < num_clients * min_examples:
        raise PartitionError(f"{num_clients} clients x {min_examples} examples minimum needs "
                             f"{num_clients * min_examples}, only {len(keys)} available")
    notes: list[str] = []
    tiny = values[counts < min_examples]
    if len(values) < num_clients and len(tiny):  # too small to be a client alone: pool them into one value
        pooled = "+".join(map(str, tiny[:3])) + ("+..." if len(tiny) > 3 else "")
        keys = np.where(np.isin(keys, tiny), pooled, keys)
        values, counts = np.unique(keys, return_counts=True)
        notes.append(f"{len(tiny)} values with fewer than {min_examples} examples merged into {pooled!r}")
    members = {str(v): rng.permutation(np.flatnonzero(keys == v)) for v in values}
    if len(values) >= num_clients:  # merge: largest values first, each into the currently smallest client
        clients: list[list[str]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for v in values[np.argsort(-counts, kind="stable")].astype(str):
            k = int(np.argmin(sizes))
            clients[k].append(v)
            sizes[k] += len(members[v])
        shards = [np.sort(np.concatenate([members[v] for v in c])) for c in clients]
        merged = [c for c in clients if len(c) > 1]
        if merged:
            notes.append(f"{len(values)} values of the partition column for {num_clients} clients: "
                         f"{len(merged)} clients hold several values (e.g. {', '.join(merged[0][:4])})")
    else:  # split: clients per value in proportion to its size, at least one each
        per_value = _apportion(counts, num_clients)
        shards = []
        for v, n, k in zip(values.astype(str).tolist(), counts, per_value, strict=True):
            shards += [np.sort(part) for part in np.array_split(members[v], k)]
            if k > 1:
                notes.append(f"value {v!r} ({n} examples) split over {k} clients")
    small = [k for k, s in enumerate(shards) if len(s) < min_examples]
    if small:
        raise PartitionError(f"{len(small)} clients would hold fewer than {min_examples} examples "
                             f"(client {small[0]}: {len(shards[small[0]])}); use fewer clients")
    return shards, notes


def partition_dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_examples: int = 4
) -> list[np.ndarray]:
    """Equal-sized clients whose label mixes follow Dirichlet(alpha) (label skew only)."""
    rng = np.random.default_rng([seed, 7])
    labels = np.asarray(labels)
    try:
        return _label_skewed_shards(labels, np.arange(len(labels)), num_clients, alpha, 0.0, min_examples, rng)
    except PartitionError as e:
        raise PartitionError(f"{e}; use fewer clients or a smaller run.min_client_examples") from e


def partition_quantity(n: int, num_clients: int, sigma: float, seed: int, min_examples: int = 4) -> list[np.ndarray]:
    """IID label mixes with log-normal(0, sigma) client sizes (quantity skew only)."""
    rng = np.random.default_rng([seed, 8])
    try:
        sizes = _allocate(rng.lognormal(0.0, sigma, num_clients), n, min_examples)
    except PartitionError as e:
        raise PartitionError(f"{e}; use fewer clients or a smaller run.min_client_examples") from e
    order = rng.permutation(n)
    return [np.sort(part) for part in np.split(order, np.cumsum(sizes)[:-1])]


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
