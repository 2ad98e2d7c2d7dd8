"""What a client does with a message: build the model, train or evaluate locally, report.

Shared by the simulated ClientApp and the real one on a Raspberry Pi; only where the
client's data comes from differs (a shard of the prepared target pool, or the device's
own review file).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from fedrnn.data.loaders import load_review_file
from fedrnn.data.partitions import load_partitions, split_holdout
from fedrnn.data.target import load_target
from fedrnn.data.tokenizer import Encoded, encode
from fedrnn.federation.messages import EvalReport, TrainReport
from fedrnn.model.checkpoint import load_checkpoint
from fedrnn.model.rnn import ModelConfig, SentimentRNN, set_trainable
from fedrnn.model.training import FrozenBottom, evaluate, train_steps


@dataclass(frozen=True)
class Base:
    """The pretrained teacher every client starts from (frozen parts never travel)."""

    cfg: ModelConfig
    state: dict[str, torch.Tensor]
    max_len: int
    teacher_dir: str


@functools.lru_cache(maxsize=2)
def load_base(teacher_dir: str) -> Base:
    model, _, meta = load_checkpoint(teacher_dir)
    return Base(model.cfg, {k: v.clone() for k, v in model.state_dict().items()}, int(meta["max_len"]), teacher_dir)


def build_model(base: Base, arrays: dict[str, np.ndarray], mode: str, dp: bool = False) -> SentimentRNN:
    """The teacher with the received tensors in place; only the mode's tensors trainable."""
    model = SentimentRNN(base.cfg, dp=dp)
    state = dict(base.state)
    for name, value in arrays.items():
        state[name] = torch.from_numpy(np.array(value, dtype=np.float32, copy=True))
    model.load_state_dict(state)
    set_trainable(model, mode)
    return model


@functools.lru_cache(maxsize=1)
def _partitions(path: str) -> list[np.ndarray]:
    return load_partitions(path)


def shard_data(
    target_path: str, partitions_path: str, client_id: int, holdout: float, seed: int
) -> tuple[Encoded, Encoded]:
    """A simulated client's local train and held-out data."""
    shards = _partitions(partitions_path)
    if not 0 <= client_id < len(shards):
        raise ValueError(f"client-id {client_id} out of range: the run has {len(shards)} clients")
    train_idx, hold_idx = split_holdout(shards[client_id], holdout, seed, client_id)
    pool = load_target(target_path).pool
    return pool.subset(train_idx), pool.subset(hold_idx)


@functools.lru_cache(maxsize=2)
def device_data(data_path: str, teacher_dir: str, holdout: float, seed: int) -> tuple[Encoded, Encoded]:
    """A real device's own review file, tokenized with the teacher's tokenizer."""
    reviews = load_review_file(data_path)
    _, tok, meta = load_checkpoint(teacher_dir)
    enc = encode(tok, reviews.texts, reviews.labels, int(meta["max_len"]))
    train_idx, hold_idx = split_holdout(np.arange(len(enc)), holdout, seed, 0)
    return enc.subset(train_idx), enc.subset(hold_idx)


@dataclass
class LocalTrainConfig:
    lr: float
    epochs: int
    batch_size: int
    max_steps: int  # 0 = whole epochs
    proximal_mu: float
    clip_norm: float
    seed: int
    frozen_cache_mb: int = 0  # > 0: replay the frozen bottom layer's outputs across epochs (training.FrozenBottom)


def local_train(model: SentimentRNN, data: Encoded, cfg: LocalTrainConfig,
                names: list[str]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Train the trainable tensors; returns the tensors ``names`` and the metrics a reply carries.

    FedProx's proximal term (mu/2 * ||w - w_global||^2) is added when ``proximal_mu`` > 0.
    Trains on the GPU when this process sees one: a Ray worker does only when
    ``[simulation] gpus_per_actor`` > 0 (Ray hides GPUs from workers that asked for none).
    """
    if torch.cuda.is_available():
        model.cuda()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    anchors = [p.detach().clone() for _, p in trainable]
    optimizer = torch.optim.Adam([p for _, p in trainable], lr=cfg.lr)

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, labels)
        if cfg.proximal_mu > 0:
            drift = sum(((p - a) ** 2).sum() for (_, p), a in zip(trainable, anchors, strict=True))
            loss = loss + cfg.proximal_mu / 2 * drift
        return loss

    t0, cpu0 = time.perf_counter(), time.process_time()
    batches = -(-len(data) // cfg.batch_size)
    passes = cfg.epochs if not cfg.max_steps else min(cfg.epochs, cfg.max_steps / max(batches, 1))
    # worth it only when the job sees its reviews more than once
    frozen = (FrozenBottom.build(model, data, cfg.frozen_cache_mb * 2**20)
              if cfg.frozen_cache_mb and passes > 1 else None)
    build, build_cpu = time.perf_counter() - t0, time.process_time() - cpu0  # part of the client's compute
    stats = train_steps(model, data, optimizer, cfg.batch_size, rng, max_steps=cfg.max_steps or None,
                        epochs=cfg.epochs, clip_norm=cfg.clip_norm, loss_fn=loss_fn, frozen=frozen)
    state = model.state_dict()
    arrays = {n: state[n].cpu().numpy().astype(np.float32, copy=True) for n in names}
    metrics = {TrainReport.key("train_loss"): stats.loss, TrainReport.key("train_accuracy"): stats.accuracy,
               TrainReport.key("train_seconds"): stats.seconds + build,
               TrainReport.key("train_cpu_seconds"): stats.cpu_seconds + build_cpu,
               TrainReport.key("steps"): float(stats.steps),
               TrainReport.key("samples"): float(stats.examples)}
    return arrays, metrics


def local_evaluate(model: SentimentRNN, data: Encoded) -> dict[str, float]:
    m = evaluate(model, data)
    if math.isnan(m["loss"]):
        return {}
    return {EvalReport.key("eval_loss"): m["loss"], EvalReport.key("eval_accuracy"): m["accuracy"]}
