"""How much two attributions of the same review agree: rank correlation and top-word overlap.

Used to ask whether two methods on one model, or one method on two models (teacher and int8
student, before and after federated fine-tuning), point at the same words.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

TOP = 5


def agreement(a: np.ndarray, b: np.ndarray, top: int = TOP) -> tuple[float, float]:
    """Spearman correlation of two score vectors (NaN if either is constant or has < 3 words) and the share
    of the ``top`` most influential words (largest |score|) that both name."""
    if len(a) != len(b):
        raise ValueError(f"score vectors differ in length: {len(a)} and {len(b)}")
    k = min(top, len(a))
    rho = float(spearmanr(a, b).statistic) if len(a) > 2 and np.ptp(a) > 0 and np.ptp(b) > 0 else float("nan")
    if k == 0:
        return rho, float("nan")
    top_a, top_b = set(np.argsort(-np.abs(a))[:k].tolist()), set(np.argsort(-np.abs(b))[:k].tolist())
    return rho, len(top_a & top_b) / k
