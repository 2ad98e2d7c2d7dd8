"""One search trial: a student sampled from the space, distilled, pruned, exported and measured on the
deployed ONNX file; and the data every trial shares (``fedrnn.edge.search`` runs the study).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from fedrnn.data.tokenizer import Encoded, encode
from fedrnn.devices.memory import estimate_inference_memory
from fedrnn.edge.distill import dataset_logits, distill, init_embedding_from
from fedrnn.edge.export import export_student
from fedrnn.edge.predict import EXPORT_CONFIG, FLOAT_MODEL, INT8_MODEL, TOKENIZER, Predictor
from fedrnn.edge.prune import prune_hidden, shrink_tokenizer, text_token_counts
from fedrnn.model.checkpoint import save_checkpoint
from fedrnn.model.rnn import ModelConfig, SentimentRNN


@dataclass(frozen=True)
class Space:
    """The choices a trial samples from."""

    cell: tuple[str, ...] = ("lstm", "gru")
    embed_dim: tuple[int, ...] = (16, 24, 32, 48)
    hidden_size: tuple[int, ...] = (32, 48, 64, 96, 128)
    num_layers: tuple[int, ...] = (1, 2)
    vocab_size: tuple[int, ...] = (1000, 2000, 4000, 5000, 8000, 16000)
    max_len: tuple[int, ...] = (64, 128, 256, 400)  # 400: what the teacher reads
    prune_ratio: tuple[float, ...] = (0.0, 0.25, 0.5)


@dataclass(frozen=True)
class Fidelity:
    low_steps: int = 120
    full_steps: int = 600
    batch_size: int = 64
    lr: float = 5e-3
    temperature: float = 2.0
    latency_reviews: int = 100
    cosine: bool = False  # decay the learning rate over each distillation phase


@dataclass
class SearchData:
    """The teacher, its targets on the transfer set, and the labelled validation/test reviews."""

    teacher: SentimentRNN
    tokenizer: Tokenizer
    teacher_max_len: int
    transfer_texts: list[str]
    teacher_logits: torch.Tensor  # one row per transfer text
    count_texts: list[str]  # texts whose token frequencies choose the kept vocabulary
    val_texts: list[str]
    val_labels: np.ndarray
    test_texts: list[str]
    test_labels: np.ndarray
    _vocab: dict[int, tuple[Tokenizer, np.ndarray]] = field(default_factory=dict)
    _encoded: dict[tuple[int, int], tuple[Encoded, Encoded]] = field(default_factory=dict)
    _counts: np.ndarray | None = None

    def shrunk(self, vocab_size: int) -> Tokenizer:
        """The teacher's tokenizer cut to ``vocab_size`` tokens (itself when not smaller), cached."""
        full = self.tokenizer.get_vocab_size()
        if vocab_size >= full:
            return self.tokenizer
        if vocab_size not in self._vocab:
            if self._counts is None:
                self._counts = text_token_counts(self.tokenizer, self.count_texts)
            self._vocab[vocab_size] = shrink_tokenizer(self.tokenizer, self._counts, vocab_size)
        return self._vocab[vocab_size][0]

    def kept_ids(self, vocab_size: int) -> np.ndarray:
        """The teacher token ids the ``vocab_size`` tokenizer keeps, in its id order (all ids when not smaller)."""
        self.shrunk(vocab_size)
        return self._vocab[vocab_size][1] if vocab_size in self._vocab else np.arange(self.tokenizer.get_vocab_size())

    def encoded(self, vocab_size: int, max_len: int) -> tuple[Encoded, Encoded]:
        """(transfer, validation) encoded with the shrunk tokenizer at ``max_len``, cached."""
        key = (vocab_size, max_len)
        if key not in self._encoded:
            tok = self.shrunk(vocab_size)
            self._encoded[key] = (
                encode(tok, self.transfer_texts, np.full(len(self.transfer_texts), -1), max_len),
                encode(tok, self.val_texts, self.val_labels, max_len),
            )
        return self._encoded[key]


def params_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


def run_trial(
    data: SearchData, params: dict[str, Any], steps: int, fid: Fidelity, out: Path, seed: int
) -> dict[bool, dict[str, Any]]:
    """Distil, prune, export and measure one student, as float32 and as int8 (one export holds both);
    returns each variant's metrics keyed by ``int8`` (see module docstring)."""
    t0 = time.perf_counter()
    transfer, val = data.encoded(params["vocab_size"], params["max_len"])
    tok = data.shrunk(params["vocab_size"])
    cfg = ModelConfig(
        vocab_size=tok.get_vocab_size(),
        embed_dim=params["embed_dim"], hidden_size=params["hidden_size"], num_layers=params["num_layers"],
        dropout=0.1, pooling="meanmax", cell=params["cell"],
    )
    torch.manual_seed(seed)
    student = SentimentRNN(cfg)
    init_embedding_from(student, data.teacher.embedding.weight, data.kept_ids(params["vocab_size"]))
    rng = np.random.default_rng(seed)
    kw = dict(batch_size=fid.batch_size, temperature=fid.temperature, lr=fid.lr, rng=rng,
              teacher_logits=data.teacher_logits, cosine=fid.cosine)
    final_hidden = max(1, round(params["hidden_size"] * (1 - params["prune_ratio"])))
    if final_hidden < params["hidden_size"]:
        first = max(1, (2 * steps) // 3)
        distill(data.teacher, student, transfer, first, **kw)
        student = prune_hidden(student, final_hidden)
        stats = distill(data.teacher, student, transfer, max(1, steps - first), **kw)
    else:
        stats = distill(data.teacher, student, transfer, steps, **kw)
    save_checkpoint(out / "checkpoint", student, tok, params["max_len"])
    export = out / "export"
    export_student(out / "checkpoint", export)  # export_onnx runs torch's exporter in its own process
    tok_bytes = (export / TOKENIZER).stat().st_size
    shared = {"final_hidden": final_hidden, "steps": steps, "distill_loss_end": stats.loss_end,
              "export_dir": str(export)}
    variants: dict[bool, dict[str, Any]] = {}
    for int8 in (True, False):
        predictor = Predictor(export, quantized=int8, threads=1)
        val_pred = np.concatenate([
            predictor.logits(val.ids[i : i + 256], val.lengths[i : i + 256]).argmax(1) for i in range(0, len(val), 256)
        ])
        model_bytes = (export / (INT8_MODEL if int8 else FLOAT_MODEL)).stat().st_size
        variants[int8] = shared | {
            "val_accuracy": float((val_pred == val.labels).mean()),
            "host_p95_ms": latency_p95_ms(predictor, val, fid.latency_reviews),
            "model_bytes": model_bytes,
            "download_bytes": model_bytes + tok_bytes + (export / EXPORT_CONFIG).stat().st_size,
            "ram_bytes": estimate_inference_memory(student.cfg, params["max_len"], model_bytes, tok_bytes),
        }
    for v in variants.values():
        v["seconds"] = time.perf_counter() - t0  # the trial's whole cost, both variants measured
    return variants


def latency_p95_ms(predictor: Predictor, data: Encoded, reviews: int, warmup: int = 10) -> float:
    """p95 of batch-1 latency over the first ``reviews`` reviews, the lower of two passes.

    Timed as CPU time of the calling thread (``time.thread_time``): with one intra-op thread
    onnxruntime computes on the caller, so this is the compute a dedicated device core spends,
    and other processes on a shared host do not inflate it as they inflate wall time.
    """
    n = min(reviews, len(data))
    rows = [(data.ids[i : i + 1, : data.lengths[i]], data.lengths[i : i + 1]) for i in range(n)]
    for ids, lengths in rows[:warmup]:
        predictor.logits(ids, lengths)
    passes = []
    for _ in range(2):
        times = []
        for ids, lengths in rows:
            t = time.thread_time()
            predictor.logits(ids, lengths)
            times.append((time.thread_time() - t) * 1000)
        passes.append(float(np.percentile(times, 95)))
    return min(passes)


def load_search_data(teacher_dir: Path, data_dir: str | None, transfer_size: int, val_size: int, seed: int,
                     cache_dir: Path) -> SearchData:
    """Teacher, cached teacher logits on ``transfer_size`` unlabelled IMDB reviews, Amazon val/test."""
    from fedrnn.data.loaders import amazon_split, load_amazon, load_imdb
    from fedrnn.model.checkpoint import WEIGHTS, load_checkpoint

    teacher, tok, tcfg = load_checkpoint(teacher_dir)
    rng = np.random.default_rng(seed)
    unsup = load_imdb("unsup", data_dir)
    transfer_texts = [unsup.texts[i] for i in rng.permutation(len(unsup))[:transfer_size]]
    pool, test = amazon_split(load_amazon(data_dir))
    val_idx = rng.permutation(len(pool))[:val_size]
    digest = hashlib.sha256((teacher_dir / WEIGHTS).read_bytes()).hexdigest()[:12]
    cache = cache_dir / f"teacher-logits-{digest}-n{transfer_size}-s{seed}.npy"
    if cache.is_file():
        logits = torch.from_numpy(np.load(cache))
    else:
        enc = encode(tok, transfer_texts, np.full(len(transfer_texts), -1), tcfg["max_len"])
        logits = dataset_logits([teacher.eval()], enc)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, logits.numpy())
    return SearchData(
        teacher=teacher.eval(), tokenizer=tok, teacher_max_len=tcfg["max_len"], transfer_texts=transfer_texts,
        teacher_logits=logits,
        count_texts=transfer_texts + list(pool.texts), val_texts=[pool.texts[i] for i in val_idx],
        val_labels=pool.labels[val_idx], test_texts=list(test.texts), test_labels=test.labels,
    )


def teacher_accuracy(data: SearchData, texts: list[str], labels: np.ndarray, max_len: int) -> float:
    from fedrnn.model.training import evaluate

    return float(evaluate(data.teacher, encode(data.tokenizer, texts, labels, max_len))["accuracy"])


