"""[personalize]: what each device owner sees after federation, and what a local head buys them.

After the last round, for every client of the run (not only the last round's), the global model
is measured on the client's own held-out data ("before"). With ``head_epochs`` > 0 each client
then fine-tunes a copy of the head on its own training split, the body frozen, and is measured
again ("after"). The run reports the distribution over clients: mean, 10th percentile and worst,
because a device owner sees their own accuracy, not the population's average.

Fine-tuning the head alone keeps it cheap enough for any device: the body's pooled features of
the client's reviews are computed once (eval mode), and only the small linear head trains on them.
In a simulation the server holds every virtual client's shard, so ``Personalization`` does this
for each client right after the last round's aggregate; it is on in every simulated run (with
``head_epochs = 0`` it reports the "before" distribution only). Real devices are not asked.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from flwr.serverapp import Grid
from torch import nn
from torch.nn import functional as F

from fedrnn.config import PersonalizeSection
from fedrnn.data.partitions import load_partitions, split_holdout
from fedrnn.data.tokenizer import Encoded
from fedrnn.federation.plugin import Arrays, RoundInfo, RoundPlugin, RunContext
from fedrnn.model.rnn import SentimentRNN
from fedrnn.model.training import length_bucketed_batches, to_tensors


@torch.no_grad()
def features(model: SentimentRNN, data: Encoded, batch_size: int = 256) -> torch.Tensor:
    """The body's pooled features of every example (the head's input), in eval mode."""
    model.eval()
    out = torch.empty(len(data), model.head.in_features)
    for index in length_bucketed_batches(data.lengths, batch_size, None):
        ids, lengths, _ = to_tensors(data, index)
        out[torch.from_numpy(index)] = model.encode(ids, lengths)
    return out


def fine_tune_head(head: nn.Linear, x: torch.Tensor, y: torch.Tensor, cfg: PersonalizeSection, seed: int) -> nn.Linear:
    """A copy of ``head`` trained ``cfg.head_epochs`` epochs (Adam, mini-batches) on features ``x``."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    head = copy.deepcopy(head).train()
    optimizer = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    for _ in range(cfg.head_epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(order), cfg.batch_size):
            idx = torch.from_numpy(order[start : start + cfg.batch_size])
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(head(x[idx]), y[idx]).backward()
            optimizer.step()
    return head.eval()


def distribution(accuracies: list[float], prefix: str) -> dict[str, float]:
    """Mean, 10th percentile and worst of per-client accuracies, as metric keys under ``prefix``."""
    a = np.asarray(accuracies, dtype=np.float64)
    return {f"{prefix}_mean": float(a.mean()), f"{prefix}_p10": float(np.percentile(a, 10)),
            f"{prefix}_worst": float(a.min())}


def personalize_clients(model: SentimentRNN, pool: Encoded, shards: list[np.ndarray], holdout: float, seed: int,
                        cfg: PersonalizeSection) -> dict[str, Any]:
    """Per-client held-out accuracy of ``model`` before (and, with head epochs, after) local head fine-tuning.

    Each client's train / held-out split is the one it used during the run (``split_holdout``).
    """
    splits = [split_holdout(shard, holdout, seed, k) for k, shard in enumerate(shards)]
    # one bucketed pass over every review any client needs, not one pass per client: with 10,000
    # clients of a couple of reviews each, per-client passes cost 100 s of batch overhead
    parts = [hold for _, hold in splits] + ([train for train, _ in splits] if cfg.head_epochs else [])
    needed = np.unique(np.concatenate([np.asarray(p, dtype=np.int64) for p in parts] or [np.empty(0, np.int64)]))
    x_all = features(model, pool.subset(needed))
    row = np.full(len(pool), -1, dtype=np.int64)
    row[needed] = np.arange(len(needed))
    labels = torch.from_numpy(pool.labels.astype(np.int64))
    before, after = [], []
    for k, (train_idx, hold_idx) in enumerate(splits):
        x_hold, y_hold = x_all[row[hold_idx]], labels[hold_idx]
        with torch.no_grad():
            before.append(float((model.head(x_hold).argmax(1) == y_hold).float().mean()))
        if cfg.head_epochs:
            head = fine_tune_head(model.head, x_all[row[train_idx]], labels[train_idx], cfg, seed * 100_003 + k)
            with torch.no_grad():
                after.append(float((head(x_hold).argmax(1) == y_hold).float().mean()))
    out: dict[str, Any] = {"clients_evaluated": len(before), **distribution(before, "client_accuracy")}
    if after:
        out |= distribution(after, "personalized_accuracy")
        out["personalized_gain_mean"] = out["personalized_accuracy_mean"] - out["client_accuracy_mean"]
    return out


class Personalization(RoundPlugin):
    """After the last round: every client's held-out accuracy, before and after its own head fine-tuning."""

    name = "personalize"

    def __init__(self, cfg: PersonalizeSection) -> None:
        self.cfg = cfg
        self.ctx: RunContext | None = None

    def setup(self, ctx: RunContext) -> None:
        self.ctx = ctx if ctx.simulated else None  # real devices keep their data: nothing to measure here

    def after_aggregate(self, info: RoundInfo, grid: Grid, arrays: Arrays) -> dict[str, Any]:
        ctx = self.ctx
        if ctx is None or info.number != ctx.cfg.run.rounds:
            return {}
        model = ctx.global_model(arrays)
        shards = load_partitions(ctx.files.partitions_path)
        return personalize_clients(model, ctx.target.pool, shards, ctx.cfg.client.holdout_fraction, ctx.cfg.run.seed,
                                   self.cfg)
