"""How faithful an attribution is: deletion and insertion curves and their AOPC.

A faithful ranking names the words the model actually relies on. *Deletion* masks the top
``f`` of a review's words (by the ranking) and records ``p_target``; a faithful ranking makes it
fall fast. *Insertion* starts from the review with every word masked and unmasks the top ``f``;
a faithful ranking makes ``p_target`` rise fast. AOPC (area over the perturbation curve,
Samek et al. 2017; ERASER's comprehensiveness, DeYoung et al. 2020, for deletion) averages
``p(review) - p(top f deleted)``, resp. ``p(top f inserted) - p(nothing)``, over the non-zero
fractions of ``FRACTIONS``: higher is more faithful for both. Masking is ``fedrnn.edge.explain.mask_words``,
the same the attributions use, and the curves of one review cost one batched model call.
"""

from __future__ import annotations

import numpy as np

from fedrnn.edge.explain import ProbFn, Segmented, mask_words

FRACTIONS = (0.0, 0.01, 0.05, 0.1, 0.2, 0.5)  # ERASER's bins (1, 5, 10, 20, 50 %), plus the unperturbed review


def counts(n_words: int, fractions: tuple[float, ...] = FRACTIONS) -> np.ndarray:
    """Words perturbed at each fraction: at least one for any fraction > 0, so short reviews still move."""
    return np.array([0 if f == 0 else min(n_words, max(1, int(np.ceil(f * n_words)))) for f in fractions])


def curves(
    prob_fn: ProbFn, seg: Segmented, scores: np.ndarray, target: int, fractions: tuple[float, ...] = FRACTIONS
) -> tuple[np.ndarray, np.ndarray]:
    """``p_target`` after deleting, and after inserting, the top-scored fraction of the visible words."""
    n = len(seg.visible)
    if len(scores) != n:
        raise ValueError(f"{len(scores)} scores for {n} visible words")
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(-np.asarray(scores), kind="stable")] = np.arange(n)
    top = rank[None, :] < counts(n, fractions)[:, None]  # [F, n]: word among the top k of this fraction
    probs = prob_fn(*mask_words(seg, np.vstack([top, ~top])))[:, target]
    return probs[: len(fractions)], probs[len(fractions) :]


def aopc(deletion: np.ndarray, insertion: np.ndarray) -> dict[str, float]:
    """Deletion and insertion AOPC of one review's curves (both: higher = more faithful)."""
    return {
        "deletion_aopc": float(np.mean(deletion[0] - deletion[1:])),
        "insertion_aopc": float(np.mean(insertion[1:] - insertion[0])),
    }
