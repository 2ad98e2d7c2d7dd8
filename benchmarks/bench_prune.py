"""Pruning the distilled student: sizes, batch-1 latency, Amazon and short-text accuracy.

    FEDRNN_DATA_DIR=... python benchmarks/bench_prune.py [--teacher cache/teacher]

Rows, each measured on the deployed ONNX file through ``fedrnn.edge.predict.Predictor`` (raw
text in):

* **unpruned**: today's student shape (``bench_student.py``: LSTM, embedding 32, hidden 64,
  the teacher's 16,000-token vocabulary), distilled ``--steps`` batches from cached teacher
  logits on unlabelled IMDB reviews (``fedrnn.edge.search.load_search_data``);
* **pruned**: that student with ``--prune-ratio`` of its hidden units removed (coupled gates,
  head inputs; ``fedrnn.edge.prune.prune_hidden``) and its vocabulary cut to ``--vocab``
  tokens (``shrink_tokenizer`` + ``prune_vocab``, frequencies from the transfer and Amazon
  train texts), then fine-tuned by distillation for ``--finetune-steps`` batches;
* **pruned, no fine-tune**: the same cut before the fine-tune, to show what it recovers;
* each as float32 and int8 ONNX, and the fp32 teacher in torch for reference.

Accuracy: the Amazon test split (1,600 reviews) and rt_polarity (10,662 one-sentence movie
reviews, the short-text set). Latency: p95 and median of batch-1 onnxruntime on one thread over
``--latency-reviews`` Amazon test reviews (tokenization excluded), lower of two passes. The
machine may be shared: the JSON records the load average. Results: ``benchmarks/results/prune.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedrnn.data.loaders import load_review_file, resolve_data_dir
from fedrnn.data.tokenizer import encode
from fedrnn.edge.distill import distill
from fedrnn.edge.export import export_student
from fedrnn.edge.predict import FLOAT_MODEL, INT8_MODEL, TOKENIZER, Predictor
from fedrnn.edge.prune import prune_hidden, prune_vocab
from fedrnn.edge.trials import latency_p95_ms, load_search_data, teacher_accuracy
from fedrnn.model.checkpoint import save_checkpoint
from fedrnn.model.rnn import ModelConfig, SentimentRNN, num_parameters


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="cache/teacher")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--transfer-size", type=int, default=8000)
    p.add_argument("--steps", type=int, default=600, help="distillation steps of the unpruned student")
    p.add_argument("--finetune-steps", type=int, default=300, help="distillation steps after pruning")
    p.add_argument("--prune-ratio", type=float, default=0.5, help="fraction of hidden units removed")
    p.add_argument("--vocab", type=int, default=4000, help="vocabulary size after pruning")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--latency-reviews", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="cache/bench_prune")
    p.add_argument("--out", default="benchmarks/results/prune.json")
    return p.parse_args(argv)


def measure(name: str, export: Path, data: Any, short: Any, lat_ids: Any, int8: bool) -> dict[str, Any]:
    pred = Predictor(export, quantized=int8, threads=1)
    model_file = export / (INT8_MODEL if int8 else FLOAT_MODEL)
    amazon = float((pred.predict_proba(data.test_texts).argmax(1) == data.test_labels).mean())
    short_acc = float((pred.predict_proba(short.texts).argmax(1) == short.labels).mean())
    return {
        "variant": name, "int8": int8, "model_bytes": model_file.stat().st_size,
        "tokenizer_bytes": (export / TOKENIZER).stat().st_size,
        "host_p95_ms": latency_p95_ms(pred, lat_ids, len(lat_ids)), "amazon_accuracy": amazon,
        "short_text_accuracy": short_acc,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    work = Path(a.work)
    data = load_search_data(Path(a.teacher), a.data_dir, a.transfer_size, 1000, a.seed, Path("cache") / "edge")
    short = load_review_file(resolve_data_dir(a.data_dir) / "rt_polarity" / "sentences.jsonl.gz")
    tok = data.tokenizer
    kw = dict(batch_size=64, temperature=2.0, lr=5e-3, teacher_logits=data.teacher_logits)
    transfer = encode(tok, data.transfer_texts, np.full(len(data.transfer_texts), -1), a.max_len)

    torch.manual_seed(a.seed)
    student = SentimentRNN(ModelConfig(vocab_size=tok.get_vocab_size(), embed_dim=32, hidden_size=64, num_layers=1,
                                       dropout=0.1))
    stats = distill(data.teacher, student, transfer, a.steps, rng=np.random.default_rng(a.seed), **kw)
    small_tok, old_ids = data.shrunk(a.vocab), data.kept_ids(a.vocab)  # the search's own vocabulary cut
    hidden = max(1, round(64 * (1 - a.prune_ratio)))
    cut = prune_vocab(prune_hidden(student, hidden), old_ids)
    tuned = copy.deepcopy(cut)
    small_transfer = encode(small_tok, data.transfer_texts, np.full(len(data.transfer_texts), -1), a.max_len)
    ft = distill(data.teacher, tuned, small_transfer, a.finetune_steps, rng=np.random.default_rng(a.seed + 1), **kw)

    rows = []
    lat = {}
    for name, model, t in (("unpruned", student, tok), ("pruned, no fine-tune", cut, small_tok),
                           ("pruned", tuned, small_tok)):
        d = work / name.replace(", ", "-").replace(" ", "-")
        save_checkpoint(d / "checkpoint", model, t, a.max_len)
        export = d / "export"
        export_student(d / "checkpoint", export)
        if t not in lat:
            test = encode(t, data.test_texts, data.test_labels, a.max_len)
            lat[t] = test.subset(np.random.default_rng(a.seed).permutation(len(test))[: a.latency_reviews])
        for int8 in (False, True):
            row = measure(name, export, data, short, lat[t], int8)
            row |= {"parameters": num_parameters(model), "model": model.cfg.to_dict()}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "model"}), flush=True)
    teacher = {
        "amazon_accuracy": teacher_accuracy(data, data.test_texts, data.test_labels, data.teacher_max_len),
        "short_text_accuracy": teacher_accuracy(data, list(short.texts), short.labels, data.teacher_max_len),
        "parameters": num_parameters(data.teacher), "weights_file_bytes": (Path(a.teacher) / "model.safetensors")
        .stat().st_size,
    }
    result = {
        "command": "python benchmarks/bench_prune.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "teacher": teacher, "rows": rows,
        "distill": {"unpruned": stats.to_dict(), "finetune": ft.to_dict()},
        "settings": {k: v for k, v in vars(a).items()}, "short_text_examples": len(short),
        "amazon_test_examples": len(data.test_texts), "loadavg_end": os.getloadavg(), "cpus": os.cpu_count(),
        "seconds": time.perf_counter() - t0,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} in {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
