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


class FrozenBottom:
    """The frozen lower recurrent layer's output for each review of a training set, computed once
    and replayed in every epoch instead of running the embedding and that layer again.

    Fine-tune mode trains only the top layer and the head, so epochs 2..n recompute exactly what
    epoch 1 computed below them, except for dropout: replaying needs the frozen part to be
    deterministic, so with the cache the frozen layers run in eval mode (no dropout on the
    embedding; the dropout between the frozen and the trained layer still applies). Results
    therefore differ slightly from the live computation, not just by rounding; the run's
    ``client.frozen_cache_mb = 0`` switches it off. ``build`` returns None (live computation)
    unless the model is unidirectional with a frozen embedding and bottom layer, or when the
    outputs would take more than ``max_bytes``.
    """

    def __init__(self, outputs: list[torch.Tensor]) -> None:
        self.outputs = outputs

    @classmethod
    def build(cls, model: nn.Module, data: Encoded, max_bytes: int) -> FrozenBottom | None:
        cfg = model.cfg
        frozen = [*model.embedding.parameters(), *model.rnn[0].parameters()]
        if cfg.bidirectional or cfg.num_layers < 2 or any(p.requires_grad for p in frozen):
            return None
        if int(data.lengths.sum()) * cfg.hidden_size * 4 > max_bytes:
            return None
        outputs: list[torch.Tensor] = [torch.empty(0, cfg.hidden_size)] * len(data)
        with torch.no_grad():
            for index in length_bucketed_batches(data.lengths, 256, None):
                ids, lengths, _ = to_tensors(data, index)
                h = model.rnn[0]["fwd"](model.embedding(ids))[0]
                for row, i in enumerate(index):
                    outputs[i] = h[row, : int(lengths[row])].clone()
        return cls(outputs)

    def batch(self, index: np.ndarray) -> torch.Tensor:
        """The bottom layer's outputs for a batch, right-padded to its longest review (as ``to_tensors``)."""
        return nn.utils.rnn.pad_sequence([self.outputs[i] for i in index], batch_first=True)


class _Replay(nn.Module):
    """Stands in for the frozen bottom layer during training: returns the cached output of the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.out: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        return self.out, None


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    examples: int
    steps: int
    seconds: float
    cpu_seconds: float = 0.0  # this process's CPU time while training (all its threads)


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
    frozen: FrozenBottom | None = None,
) -> EpochStats:
    """Run up to ``epochs`` passes (or ``max_steps`` steps) of supervised training.

    ``frozen``: the bottom layer's cached outputs, replayed instead of computed (``FrozenBottom``).
    """
    if frozen is not None:
        layer, replay = model.rnn[0], _Replay()
        live, layer["fwd"] = layer["fwd"], replay
        try:
            return _train_steps(model, data, optimizer, batch_size, rng, max_steps, epochs, clip_norm, loss_fn,
                                scheduler, on_step, lambda index: setattr(replay, "out", frozen.batch(index)))
        finally:
            layer["fwd"] = live
    return _train_steps(model, data, optimizer, batch_size, rng, max_steps, epochs, clip_norm, loss_fn, scheduler,
                        on_step, None)


def _train_steps(
    model: nn.Module,
    data: Encoded,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    rng: np.random.Generator,
    max_steps: int | None,
    epochs: int,
    clip_norm: float | None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    on_step: Callable[[int, float], None] | None,
    before_batch: Callable[[np.ndarray], None] | None,
) -> EpochStats:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = loss_fn or F.cross_entropy
    device = params[0].device if params else torch.device("cpu")  # batches go where the model is (CPU or GPU)
    t0, cpu0, steps, seen, correct, total_loss = time.perf_counter(), time.process_time(), 0, 0, 0, 0.0
    for _ in range(epochs):
        for index in length_bucketed_batches(data.lengths, batch_size, rng):
            if max_steps is not None and steps >= max_steps:
                break
            ids, lengths, labels = (t.to(device) for t in to_tensors(data, index))
            if before_batch is not None:
                before_batch(index)
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
    return EpochStats(total_loss / max(seen, 1), correct / max(seen, 1), seen, steps, time.perf_counter() - t0,
                      time.process_time() - cpu0)


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

