"""The fixed, seeded review samples that the faithfulness measurement and the explanation study explain.

Attribution costs one model call per word (occlusion) or ``IG_STEPS`` forward and backward passes
(integrated gradients) per review, so studies on 2 CPU cores explain a few hundred reviews, not
the 25,000 of IMDB test. The samples are seeded and stratified where the data has strata
(Amazon: equal numbers per category), so reruns explain the same reviews.
"""

from __future__ import annotations

import numpy as np

from fedrnn.data.loaders import AMAZON_CATEGORIES, amazon_split, load_amazon, load_imdb
from fedrnn.data.reviews import Reviews


def imdb_test_sample(n: int, seed: int = 0, data_dir: str | None = None) -> Reviews:
    """``n`` random IMDB test reviews (both labels, as they come)."""
    test = load_imdb("test", data_dir)
    return test.subset(np.sort(np.random.default_rng(seed).permutation(len(test))[:n]))


def amazon_test_sample(n_per_category: int, seed: int = 0, data_dir: str | None = None) -> Reviews:
    """``n_per_category`` random reviews of each category of the fixed Amazon target test split."""
    test = amazon_split(load_amazon(data_dir))[1]
    rng = np.random.default_rng(seed)
    idx = [rng.permutation(np.flatnonzero(test.groups == c))[:n_per_category] for c in AMAZON_CATEGORIES]
    return test.subset(np.concatenate(idx))
