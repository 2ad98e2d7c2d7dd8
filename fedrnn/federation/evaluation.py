"""Server-side evaluation of the global model: target test (overall and per natural group)
and source retention on a fixed IMDB test subset.

Per-group accuracy (``target_accuracy/<group>``, and the worst group) is reported where the
test set has at most ``GROUPS_MAX`` groups: categories, sources or user-chosen groups, not movies.
"""

from __future__ import annotations

import numpy as np

from fedrnn.data.target import TargetData
from fedrnn.model.rnn import SentimentRNN
from fedrnn.model.training import predict_logits, scores

GROUPS_MAX = 32  # per-group metrics only where groups are few


class ServerEvaluator:
    def __init__(self, data: TargetData, test_examples: int = 0, seed: int = 0) -> None:
        test, groups = data.test, data.test_groups
        if test_examples and test_examples < len(test):
            idx = np.sort(np.random.default_rng([seed, 5]).permutation(len(test))[:test_examples])
            test, groups = test.subset(idx), groups[idx]
        self.test, self.groups, self.retention = test, groups, data.retention
        uniq = np.unique(groups)
        self.group_names = [str(g) for g in uniq] if 1 < len(uniq) <= GROUPS_MAX else []

    def __call__(self, model: SentimentRNN) -> dict[str, float]:
        logits = predict_logits(model, self.test)
        target = scores(logits, self.test)
        out = {"target_loss": target["loss"], "target_accuracy": target["accuracy"]}
        pred = logits.argmax(1).numpy()
        for g in self.group_names:
            mask = self.groups == g
            out[f"target_accuracy/{g}"] = float((pred[mask] == self.test.labels[mask]).mean())
        if self.group_names:
            out["target_accuracy_worst_group"] = min(out[f"target_accuracy/{g}"] for g in self.group_names)
        if len(self.retention):
            kept = scores(predict_logits(model, self.retention), self.retention)
            out |= {"retention_loss": kept["loss"], "retention_accuracy": kept["accuracy"]}
        return out
