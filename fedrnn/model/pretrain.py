"""Pretrain the IMDB teacher: ``python -m fedrnn.model.pretrain --out cache/teacher``.

Trains the tokenizer and the LSTM on IMDB train, early-stops on a validation slice carved
by movie id, and writes a checkpoint directory with IMDB test accuracy and the zero-shot
accuracy on each Amazon category (the transfer gap the federated stage has to close).
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fedrnn.data.loaders import AMAZON_CATEGORIES, amazon_split, imdb_validation_split, load_amazon, load_imdb
from fedrnn.data.tokenizer import encode, train_tokenizer
from fedrnn.model.checkpoint import save_checkpoint
from fedrnn.model.rnn import ModelConfig, SentimentRNN, num_parameters
from fedrnn.model.training import evaluate, train_steps


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    max_len: int = 400
    epochs: int = 6
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-5
    patience: int = 2
    val_fraction: float = 0.1
    train_limit: int | None = None  # subsample IMDB train (tests); None = all 25,000
    eval_limit: int | None = None  # subsample the test sets (tests)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_len", "epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"pretrain.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"pretrain.lr must be > 0, got {self.lr}")


def _limit(n: int | None, size: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.permutation(size)[:n]) if n is not None and n < size else np.arange(size)


def pretrain(cfg: PretrainConfig, out: str | Path, data_dir: str | None = None, quiet: bool = False) -> dict[str, Any]:
    """Train and save the teacher; returns its metrics (also in ``out/metrics.json``)."""
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    imdb_train = load_imdb("train", data_dir)
    imdb_train = imdb_train.subset(_limit(cfg.train_limit, len(imdb_train), rng))
    train, val = imdb_validation_split(imdb_train, cfg.val_fraction, seed=cfg.seed)
    test = load_imdb("test", data_dir)
    test = test.subset(_limit(cfg.eval_limit, len(test), rng))
    _, amazon_test = amazon_split(load_amazon(data_dir))

    tok = train_tokenizer(train.texts, vocab_size=cfg.model.vocab_size)
    model_cfg = ModelConfig(**{**cfg.model.to_dict(), "vocab_size": tok.get_vocab_size()})
    enc_train = encode(tok, train.texts, train.labels, cfg.max_len)
    enc_val = encode(tok, val.texts, val.labels, cfg.max_len)

    model = SentimentRNN(model_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(enc_train) // cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=steps_per_epoch * cfg.epochs, pct_start=0.1
    )
    best_acc, best_state, stale, history = -1.0, None, 0, []
    with Progress(
        TextColumn("[bold]pretrain[/] epoch {task.fields[epoch]}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.3f} val {task.fields[val]}"),
        TimeElapsedColumn(),
        disable=quiet,
    ) as progress:
        task = progress.add_task("train", total=steps_per_epoch, epoch=1, loss=0.0, val="-")
        for epoch in range(1, cfg.epochs + 1):
            progress.update(task, completed=0, epoch=epoch)
            stats = train_steps(
                model,
                enc_train,
                optimizer,
                cfg.batch_size,
                rng,
                scheduler=scheduler,
                on_step=lambda s, loss: progress.update(task, completed=s, loss=loss),
            )
            val_metrics = evaluate(model, enc_val)
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": stats.loss,
                    "train_accuracy": stats.accuracy,
                    "val_accuracy": val_metrics["accuracy"],
                    "seconds": stats.seconds,
                }
            )
            progress.update(task, val=f"{val_metrics['accuracy']:.4f}")
            if val_metrics["accuracy"] > best_acc:
                best_acc, best_state, stale = val_metrics["accuracy"], copy.deepcopy(model.state_dict()), 0
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
    model.load_state_dict(best_state)
    train_seconds = time.perf_counter() - t_start

    metrics: dict[str, Any] = {
        "imdb_test_accuracy": evaluate(model, encode(tok, test.texts, test.labels, cfg.max_len))["accuracy"],
        "imdb_val_accuracy": best_acc,
        "parameters": num_parameters(model),
        "train_seconds": train_seconds,
        "train_examples": len(enc_train),
        "history": history,
        "config": asdict(cfg),
        "torch_threads": torch.get_num_threads(),
    }
    zero_shot = {}
    for cat in AMAZON_CATEGORIES:
        part = amazon_test.subset(np.flatnonzero(amazon_test.groups == cat))
        zero_shot[cat] = evaluate(model, encode(tok, part.texts, part.labels, cfg.max_len))["accuracy"]
    metrics["amazon_zero_shot_accuracy"] = zero_shot
    metrics["amazon_zero_shot_mean"] = float(np.mean(list(zero_shot.values())))
    save_checkpoint(out, model, tok, cfg.max_len, metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="cache/teacher", help="checkpoint directory to write")
    parser.add_argument("--data-dir", default=None, help="data directory (default: $FEDRNN_DATA_DIR or ./data)")
    d = PretrainConfig()
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--max-len", type=int, default=d.max_len)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--hidden-size", type=int, default=d.model.hidden_size)
    parser.add_argument("--embed-dim", type=int, default=d.model.embed_dim)
    parser.add_argument("--num-layers", type=int, default=d.model.num_layers)
    parser.add_argument("--bidirectional", action="store_true")
    parser.add_argument("--vocab-size", type=int, default=d.model.vocab_size)
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--seed", type=int, default=d.seed)
    a = parser.parse_args(argv)
    model = ModelConfig(
        vocab_size=a.vocab_size,
        embed_dim=a.embed_dim,
        hidden_size=a.hidden_size,
        num_layers=a.num_layers,
        bidirectional=a.bidirectional,
    )
    cfg = PretrainConfig(
        model=model,
        max_len=a.max_len,
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        train_limit=a.train_limit,
        seed=a.seed,
    )
    metrics = pretrain(cfg, a.out, a.data_dir)
    print(
        f"IMDB test accuracy {metrics['imdb_test_accuracy']:.4f}, {metrics['parameters']:,} parameters, "
        f"{metrics['train_seconds']:.0f} s; Amazon zero-shot {metrics['amazon_zero_shot_accuracy']}"
    )


if __name__ == "__main__":
    main()
