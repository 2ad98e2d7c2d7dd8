"""Training and evaluation loops shared by pretraining, clients and the server.

Batches are length-bucketed and trimmed to their longest review, so the recurrence runs
over little padding; results never depend on the batching (see ``SentimentRNN``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedrnn.data.tokenizer import Encoded


def length_bucketed_batches(
    lengths: np.ndarray, batch_size: int, rng: np.random.Generator | None, bucket: int = 50
) -> list[np.ndarray]:
    """Index batches of similar length. With ``rng``: shuffled within and across buckets."""
    n = len(lengths)
    order = rng.permutation(n) if rng is not None else np.arange(n)
    batches = []
    span = batch_size * bucket
    for start in range(0, n, span):
        chunk = order[start : start + span]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def to_tensors(data: Encoded, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lengths = data.lengths[index]
    width = int(lengths.max())
    ids = torch.from_numpy(np.ascontiguousarray(data.ids[index, :width]).astype(np.int64))
    return ids, torch.from_numpy(lengths.astype(np.int64)), torch.from_numpy(data.labels[index].astype(np.int64))


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    examples: int
    steps: int
    seconds: float


def train_steps(
    model: nn.Module,
    data: Encoded,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    rng: np.random.Generator,
    max_steps: int | None = None,
    epochs: int = 1,
    clip_norm: float | None = 1.0,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> EpochStats:
    """Run up to ``epochs`` passes (or ``max_steps`` steps) of supervised training."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = loss_fn or F.cross_entropy
    device = params[0].device if params else torch.device("cpu")  # batches go where the model is (CPU or GPU)
    t0, steps, seen, correct, total_loss = time.perf_counter(), 0, 0, 0, 0.0
    for _ in range(epochs):
        for index in length_bucketed_batches(data.lengths, batch_size, rng):
            if max_steps is not None and steps >= max_steps:
                break
            ids, lengths, labels = (t.to(device) for t in to_tensors(data, index))
            optimizer.zero_grad(set_to_none=True)
            logits = model(ids, lengths)
            loss = loss_fn(logits, labels)
            loss.backward()
            if clip_norm:
                nn.utils.clip_grad_norm_(params, clip_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            steps += 1
            seen += len(index)
            total_loss += float(loss.detach()) * len(index)
            correct += int((logits.argmax(1) == labels).sum())
            if on_step is not None:
                on_step(steps, float(loss.detach()))
    return EpochStats(total_loss / max(seen, 1), correct / max(seen, 1), seen, steps, time.perf_counter() - t0)


@torch.no_grad()
def predict_logits(model: nn.Module, data: Encoded, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    out = torch.empty(len(data), model.cfg.num_classes)
    device = next(model.parameters()).device
    for index in length_bucketed_batches(data.lengths, batch_size, None):
        ids, lengths, _ = to_tensors(data, index)
        out[torch.from_numpy(index)] = model(ids.to(device), lengths.to(device)).cpu()
    return out


def evaluate(model: nn.Module, data: Encoded, batch_size: int = 256) -> dict[str, float]:
    """Loss and accuracy; an empty set gives NaN loss and accuracy rather than a crash."""
    if len(data) == 0:
        return {"loss": math.nan, "accuracy": math.nan, "examples": 0}
    return scores(predict_logits(model, data, batch_size), data) | {"examples": len(data)}


def scores(logits: torch.Tensor, data: Encoded) -> dict[str, float]:
    """Cross-entropy and accuracy of ``logits`` against ``data``'s labels."""
    labels = torch.from_numpy(data.labels.astype(np.int64))
    return {
        "loss": float(F.cross_entropy(logits, labels)),
        "accuracy": float((logits.argmax(1) == labels).float().mean()),
    }

