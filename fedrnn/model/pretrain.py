"""Pretrain the IMDB teacher: ``python -m fedrnn.model.pretrain --out cache/teacher``.

Trains the tokenizer and the LSTM on IMDB train, early-stops on a validation slice carved
by movie id, and writes a checkpoint directory with IMDB test accuracy and the zero-shot
accuracy on each Amazon category, rt_polarity and uci_sentences (the transfer gaps the
federated stage has to close). Only IMDB is ever trained on; the others are evaluation sets.

The recipe holds up on short texts and trains fast:
* every epoch adds, beside each whole review, a random span of one or a few of its sentences
  labelled with the review's label, so the model sees one-liners like those devices hold;
* whole reviews are trained on their last ``train_max_len`` tokens (a review's verdict tends
  to come last) and evaluated on up to ``max_len``, which cuts the recurrence's steps;
* ``token_dropout`` replaces random tokens with [UNK], so an unknown word is no surprise;
* fewer epochs under a one-cycle schedule.
``PretrainConfig.previous()`` is the recipe before these changes, kept for the benchmark.
"""

from __future__ import annotations

import argparse
import copy
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fedrnn.data.files import load_labelled_file
from fedrnn.data.loaders import (
    AMAZON_CATEGORIES,
    amazon_split,
    imdb_validation_split,
    load_amazon,
    load_imdb,
    resolve_data_dir,
)
from fedrnn.data.reviews import DataError
from fedrnn.data.tokenizer import UNK, Encoded, encode, train_tokenizer
from fedrnn.model.checkpoint import save_checkpoint
from fedrnn.model.rnn import ModelConfig, SentimentRNN, num_parameters
from fedrnn.model.training import evaluate, predict_logits, train_steps


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    max_len: int = 400  # tokens kept at inference (and by clients)
    train_max_len: int = 128  # tokens of a whole review trained on; 0 = max_len
    spans: int = 2  # random sentence spans per review and epoch, beside the whole review
    span_sentences: int = 2  # at most this many consecutive sentences per span
    span_max_len: int = 64
    token_dropout: float = 0.05  # share of training tokens replaced by [UNK]
    epochs: int = 3
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-5
    patience: int = 2
    val_fraction: float = 0.1
    train_limit: int | None = None  # subsample IMDB train (tests); None = all 25,000
    eval_limit: int | None = None  # subsample the test sets (tests)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_len", "epochs", "batch_size", "patience", "span_sentences", "span_max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"pretrain.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("train_max_len", "spans"):
            if getattr(self, name) < 0:
                raise ValueError(f"pretrain.{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"pretrain.lr must be > 0, got {self.lr}")
        if not 0 <= self.token_dropout < 1:
            raise ValueError(f"pretrain.token_dropout must be in [0, 1), got {self.token_dropout}")

    @classmethod
    def previous(cls, **changes: object) -> PretrainConfig:
        """The recipe before the short-text teacher: whole reviews at 400 tokens, 6 epochs, no spans."""
        return cls(**{"train_max_len": 0, "spans": 0, "token_dropout": 0.0, "epochs": 6, **changes})


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentence_spans(
    texts: Sequence[str], spans: int, most: int, rng: np.random.Generator
) -> tuple[list[str], np.ndarray]:
    """``spans`` random runs of 1..``most`` consecutive sentences of each text, and the text each came from."""
    out, source = [], []
    for i, text in enumerate(texts):
        sentences = _SENTENCE_END.split(text)
        for _ in range(spans):
            start = int(rng.integers(len(sentences)))
            out.append(" ".join(sentences[start : start + int(rng.integers(1, most + 1))]))
            source.append(i)
    return out, np.asarray(source, dtype=np.int64)


def _stack(parts: Sequence[Encoded]) -> Encoded:
    """Concatenate encodings of different widths (right-padded to the widest)."""
    width = max(p.ids.shape[1] for p in parts)
    ids = np.concatenate([np.pad(p.ids, ((0, 0), (0, width - p.ids.shape[1]))) for p in parts])
    return Encoded(ids, np.concatenate([p.lengths for p in parts]), np.concatenate([p.labels for p in parts]))


def epoch_data(cfg: PretrainConfig, tok, texts: Sequence[str], whole: Encoded, rng: np.random.Generator) -> Encoded:
    """One epoch's training set: the whole reviews, fresh sentence spans, fresh [UNK] dropout."""
    parts = [whole]
    if cfg.spans:
        spans, source = sentence_spans(texts, cfg.spans, cfg.span_sentences, rng)
        parts.append(encode(tok, spans, whole.labels[source], cfg.span_max_len))
    data = _stack(parts) if len(parts) > 1 else Encoded(whole.ids.copy(), whole.lengths, whole.labels)
    if cfg.token_dropout:
        inside = np.arange(data.ids.shape[1])[None, :] < data.lengths[:, None]
        data.ids[inside & (rng.random(data.ids.shape) < cfg.token_dropout)] = tok.token_to_id(UNK)
    return data


def zero_shot(model: SentimentRNN, tok, max_len: int, data_dir: str | None,
              limit: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Accuracy on each out-of-domain set found in the data directory (never trained on).

    Amazon per category (its fixed test split), rt_polarity, and uci_sentences overall and per source.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    try:
        _, amazon_test = amazon_split(load_amazon(data_dir))
    except DataError:
        amazon_test = None
    if amazon_test is not None:
        per = {}
        for cat in AMAZON_CATEGORIES:
            part = amazon_test.subset(np.flatnonzero(amazon_test.groups == cat))
            per[cat] = evaluate(model, encode(tok, part.texts, part.labels, max_len))["accuracy"]
        out |= {"amazon_zero_shot_accuracy": per, "amazon_zero_shot_mean": float(np.mean(list(per.values())))}
    root = resolve_data_dir(data_dir)
    for name in ("rt_polarity", "uci_sentences"):
        path = root / name / "sentences.jsonl.gz"
        if not path.is_file():
            continue
        r = load_labelled_file(path).reviews
        r = r.subset(_limit(limit, len(r), rng))
        pred_ok = predict_logits(model, encode(tok, r.texts, r.labels, max_len)).argmax(1).numpy() == r.labels
        out[f"{name}_zero_shot_accuracy"] = float(pred_ok.mean())
        groups = np.asarray([str(g) for g in r.groups])
        if len(set(groups)) > 1:
            out[f"{name}_zero_shot_by_group"] = {g: float(pred_ok[groups == g].mean()) for g in sorted(set(groups))}
    return out


def _limit(n: int | None, size: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.permutation(size)[:n]) if n is not None and n < size else np.arange(size)


def pretrain(cfg: PretrainConfig, out: str | Path, data_dir: str | None = None, quiet: bool = False) -> dict[str, Any]:
    """Train and save the teacher; returns its metrics (also in ``out/metrics.json``)."""
    t_start, cpu_start = time.perf_counter(), time.process_time()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    imdb_train = load_imdb("train", data_dir)
    imdb_train = imdb_train.subset(_limit(cfg.train_limit, len(imdb_train), rng))
    train, val = imdb_validation_split(imdb_train, cfg.val_fraction, seed=cfg.seed)
    test = load_imdb("test", data_dir)
    test = test.subset(_limit(cfg.eval_limit, len(test), rng))

    tok = train_tokenizer(train.texts, vocab_size=cfg.model.vocab_size)
    model_cfg = ModelConfig(**{**cfg.model.to_dict(), "vocab_size": tok.get_vocab_size()})
    enc_train = encode(tok, train.texts, train.labels, cfg.train_max_len or cfg.max_len)
    enc_val = encode(tok, val.texts, val.labels, cfg.max_len)

    model = SentimentRNN(model_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(enc_train) * (1 + cfg.spans) // cfg.batch_size)
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
                epoch_data(cfg, tok, train.texts, enc_train, rng),
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
    train_seconds, train_cpu_seconds = time.perf_counter() - t_start, time.process_time() - cpu_start

    metrics: dict[str, Any] = {
        "imdb_test_accuracy": evaluate(model, encode(tok, test.texts, test.labels, cfg.max_len))["accuracy"],
        "imdb_val_accuracy": best_acc,
        "parameters": num_parameters(model),
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "train_examples": len(enc_train),
        "history": history,
        "config": asdict(cfg),
        "torch_threads": torch.get_num_threads(),
    }
    metrics |= zero_shot(model, tok, cfg.max_len, data_dir, cfg.eval_limit, cfg.seed)
    save_checkpoint(out, model, tok, cfg.max_len, metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="cache/teacher", help="checkpoint directory to write")
    parser.add_argument("--data-dir", default=None, help="data directory (default: $FEDRNN_DATA_DIR or ./data)")
    d = PretrainConfig()
    parser.add_argument("--previous-recipe", action="store_true",
                        help="the recipe before the short-text teacher (whole reviews only, 6 epochs)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--max-len", type=int)
    parser.add_argument("--train-max-len", type=int)
    parser.add_argument("--spans", type=int)
    parser.add_argument("--span-sentences", type=int)
    parser.add_argument("--token-dropout", type=float)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--hidden-size", type=int, default=d.model.hidden_size)
    parser.add_argument("--embed-dim", type=int, default=d.model.embed_dim)
    parser.add_argument("--num-layers", type=int, default=d.model.num_layers)
    parser.add_argument("--bidirectional", action="store_true")
    parser.add_argument("--vocab-size", type=int, default=d.model.vocab_size)
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    a = parser.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model = ModelConfig(
        vocab_size=a.vocab_size,
        embed_dim=a.embed_dim,
        hidden_size=a.hidden_size,
        num_layers=a.num_layers,
        bidirectional=a.bidirectional,
    )
    given = {k: getattr(a, k) for k in ("epochs", "max_len", "train_max_len", "spans", "span_sentences",
                                        "token_dropout", "batch_size", "lr") if getattr(a, k) is not None}
    recipe = PretrainConfig.previous if a.previous_recipe else PretrainConfig
    cfg = recipe(model=model, train_limit=a.train_limit, eval_limit=a.eval_limit, seed=a.seed, **given)
    metrics = pretrain(cfg, a.out, a.data_dir)
    print(
        f"IMDB test accuracy {metrics['imdb_test_accuracy']:.4f}, {metrics['parameters']:,} parameters, "
        f"{metrics['train_seconds']:.0f} s; zero-shot Amazon {metrics.get('amazon_zero_shot_mean')}, "
        f"rt_polarity {metrics.get('rt_polarity_zero_shot_accuracy')}, "
        f"uci_sentences {metrics.get('uci_sentences_zero_shot_accuracy')}"
    )


if __name__ == "__main__":
    main()
