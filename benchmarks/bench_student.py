"""The compact int8 student against its fp32 teacher: size, batch-1 CPU latency, Amazon accuracy.

    FEDRNN_DATA_DIR=... python benchmarks/bench_student.py [--teacher cache/teacher] [--student DIR]

Without ``--student`` the student is distilled here first: ``fedrnn.edge.distill.make_student``
over the teacher's tokenizer, trained with ``fedrnn.edge.distill.distill`` for ``--steps`` batches
on ``--transfer-size`` unlabelled IMDB reviews (labels never used), saved to
``--student-out``. The student is then exported with ``fedrnn.edge.export.export_student``
(float ONNX + onnxruntime dynamic int8) to ``--export-out``.

Measured, with the goals of issue 6:

* **size**: bytes of the teacher's fp32 weights file (``model.safetensors``) against the
  deployable int8 student file (``model.int8.onnx``, graph included); goal >= 10x smaller;
* **latency**: one review at a time (batch 1) on ``--threads`` CPU threads: the fp32
  teacher in torch (``inference_mode``) against the int8 student in onnxruntime, both on
  the same pre-tokenized Amazon test reviews (tokenization excluded from both; the
  student's end-to-end time with tokenization is reported separately). Each model is timed
  twice, interleaved, keeping the faster median (the machine may be shared); goal >= 3x;
* **accuracy** on the fixed Amazon test split (1,600 reviews, ``fedrnn.data.loaders.amazon_split``):
  teacher in torch against the int8 student through ``fedrnn.edge.predict.Predictor`` (the
  deployed path, raw text in); goal: student within 1.5 points;
* **downlink**: bytes of one broadcast to one client as the federation counts them
  (``fedrnn.federation.wire.record_nbytes``: array data plus each array's .npy header): the fp32 teacher
  (full model, as FedAvg over the whole model sends it; and only the ``--mode`` trainable
  tensors, as fedrnn's fine-tuning sends them) against the int8 student that
  ``fedrnn.plugins.distill`` ships (every tensor, embedding included) and the int8 trainable
  tensors (``compression.downlink = "int8"``); goal: >= 4x fewer than fp32 FedAvg.

Results go to ``benchmarks/results/student.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from tokenizers import Tokenizer

from fedrnn.data.loaders import amazon_split, load_amazon, load_imdb
from fedrnn.data.tokenizer import Encoded, encode
from fedrnn.edge.distill import agreement, distill, make_student
from fedrnn.edge.export import export_student, resolve_checkpoint
from fedrnn.edge.predict import FLOAT_MODEL, INT8_MODEL, Predictor
from fedrnn.edge.quantize import encode as int8_encode
from fedrnn.federation.wire import record_nbytes, to_record
from fedrnn.model.checkpoint import WEIGHTS, load_checkpoint, save_checkpoint
from fedrnn.model.rnn import TRANSFER_MODES, SentimentRNN, num_parameters, trainable_names
from fedrnn.model.training import evaluate

GOALS = {"size_ratio_min": 10.0, "latency_ratio_min": 3.0, "accuracy_gap_max_points": 1.5, "downlink_ratio_min": 4.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="cache/teacher", help="teacher checkpoint directory")
    p.add_argument("--student", default=None, help="student checkpoint or run dir; default: distill one here")
    p.add_argument("--student-out", default="cache/student", help="where a distilled student is saved")
    p.add_argument("--export-out", default="cache/student-export", help="where the ONNX export is written")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--steps", type=int, default=3000, help="distillation steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--transfer-size", type=int, default=50000, help="unlabelled IMDB reviews to distill on")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--embed-dim", type=int, default=32)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=1)
    p.add_argument("--cell", choices=("lstm", "gru"), default="lstm")
    p.add_argument("--latency-reviews", type=int, default=200, help="Amazon test reviews timed one by one")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for the latency runs (both models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=TRANSFER_MODES, default="fine-tune", help="transfer mode of the fp32 FedAvg run")
    p.add_argument("--out", default="benchmarks/results/student.json")
    return p.parse_args(argv)


def distill_student(
    a: argparse.Namespace, teacher: torch.nn.Module, tok: Tokenizer, max_len: int
) -> tuple[Path, dict[str, Any]]:
    rng = np.random.default_rng(a.seed)
    unsup = load_imdb("unsup", a.data_dir)
    idx = rng.permutation(len(unsup))[: a.transfer_size]
    transfer = encode(tok, [unsup.texts[i] for i in idx], np.full(len(idx), -1), max_len)
    torch.manual_seed(a.seed)
    student = make_student(teacher.cfg, a.embed_dim, a.hidden_size, a.num_layers, a.cell)
    stats = distill(teacher, student, transfer, a.steps, a.batch_size, a.temperature, a.lr, rng)
    info = {"transfer_reviews": len(transfer), **stats.to_dict(), "teacher": str(a.teacher)}
    save_checkpoint(a.student_out, student, tok, max_len, metrics={"distill": info})
    return Path(a.student_out), info


def _median_ms(fn: Callable[[int], object], n: int, warmup: int = 10) -> dict[str, float]:
    for i in range(min(warmup, n)):
        fn(i)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - t0) * 1000)
    return {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90)),
            "mean_ms": float(np.mean(times))}


def latency(teacher: torch.nn.Module, student: Predictor, data: Encoded, texts: list[str], threads: int) -> dict:
    """Batch-1 latency of teacher (torch fp32) and student (onnxruntime int8) on the same reviews."""
    torch.set_num_threads(threads)
    ids = [torch.from_numpy(data.ids[i : i + 1, : data.lengths[i]].astype(np.int64)) for i in range(len(data))]
    lens = [torch.from_numpy(data.lengths[i : i + 1]) for i in range(len(data))]

    def run_teacher(i: int) -> object:
        with torch.inference_mode():
            return teacher(ids[i], lens[i])

    runs: dict[str, list[dict[str, float]]] = {"teacher_torch_fp32": [], "student_onnx_int8": []}
    for _ in range(2):  # interleaved, keep the faster: another process may have stolen the CPU once
        runs["teacher_torch_fp32"].append(_median_ms(run_teacher, len(data)))
        runs["student_onnx_int8"].append(
            _median_ms(lambda i: student.logits(data.ids[i : i + 1], data.lengths[i : i + 1]), len(data)))
    out = {k: min(v, key=lambda r: r["median_ms"]) for k, v in runs.items()}
    out["student_onnx_int8_with_tokenizer"] = _median_ms(lambda i: student.predict_proba([texts[i]]), len(data))
    out["ratio_teacher_over_student"] = out["teacher_torch_fp32"]["median_ms"] / out["student_onnx_int8"]["median_ms"]
    out["reviews"], out["threads"] = len(data), threads
    out["median_tokens"] = float(np.median(data.lengths))
    return out


def downlink(teacher: SentimentRNN, student: SentimentRNN, mode: str) -> dict[str, Any]:
    """Bytes of one broadcast to one client, counted like the federation counts ``bytes_down``."""
    full = {k: v.numpy() for k, v in teacher.state_dict().items()}
    trainable = {n: full[n] for n in trainable_names(teacher, mode)}
    out: dict[str, Any] = {
        "teacher_full_fp32": record_nbytes(to_record(full)),
        f"teacher_{mode}_fp32": record_nbytes(to_record(trainable)),
        f"teacher_{mode}_int8": record_nbytes(to_record(int8_encode(trainable))),
        "student_int8": record_nbytes(to_record(int8_encode({k: v.numpy() for k, v in student.state_dict().items()}))),
        "mode": mode,
    }
    out["ratio_full_fp32_over_student_int8"] = out["teacher_full_fp32"] / out["student_int8"]
    out[f"ratio_{mode}_fp32_over_student_int8"] = out[f"teacher_{mode}_fp32"] / out["student_int8"]
    out[f"ratio_{mode}_fp32_over_int8"] = out[f"teacher_{mode}_fp32"] / out[f"teacher_{mode}_int8"]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    t_start = time.perf_counter()
    teacher, tok, tcfg = load_checkpoint(a.teacher)
    if a.student is None:
        student_dir, distill_info = distill_student(a, teacher, tok, tcfg["max_len"])
    else:
        student_dir, distill_info = resolve_checkpoint(a.student), None
    export_cfg = export_student(student_dir, a.export_out)
    student_torch, _, _ = load_checkpoint(student_dir)
    _, test = amazon_split(load_amazon(a.data_dir))
    enc = encode(tok, test.texts, test.labels, tcfg["max_len"])

    int8 = Predictor(a.export_out, quantized=True, threads=a.threads)
    int8_pred = int8.predict_proba(test.texts).argmax(1)
    float_pred = Predictor(a.export_out, quantized=False).predict_proba(test.texts).argmax(1)
    teacher_acc = evaluate(teacher, enc)["accuracy"]
    accuracy = {
        "teacher_torch_fp32": teacher_acc,
        "student_torch_fp32": evaluate(student_torch, enc)["accuracy"],
        "student_onnx_fp32": float((float_pred == test.labels).mean()),
        "student_onnx_int8": float((int8_pred == test.labels).mean()),
        "student_torch_agreement_with_teacher": agreement(student_torch, teacher, enc),
        "examples": len(test),
    }
    accuracy["gap_points"] = 100 * (teacher_acc - accuracy["student_onnx_int8"])

    teacher_file = Path(a.teacher) / WEIGHTS
    sizes = {
        "teacher_fp32_weights_file_bytes": teacher_file.stat().st_size,
        "teacher_fp32_parameter_bytes": 4 * num_parameters(teacher),
        "student_int8_onnx_bytes": export_cfg["bytes"][INT8_MODEL],
        "student_fp32_onnx_bytes": export_cfg["bytes"][FLOAT_MODEL],
        "teacher_parameters": num_parameters(teacher),
        "student_parameters": num_parameters(student_torch),
    }
    sizes["ratio"] = sizes["teacher_fp32_weights_file_bytes"] / sizes["student_int8_onnx_bytes"]
    down = downlink(teacher, student_torch, a.mode)

    pick = np.random.default_rng(a.seed).permutation(len(test))[: a.latency_reviews]
    lat = latency(teacher, int8, enc.subset(pick), [test.texts[i] for i in pick], a.threads)

    result = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "onnxruntime": ort.__version__},
        "teacher": {"dir": str(a.teacher), "model": teacher.cfg.to_dict()},
        "student": {"dir": str(student_dir), "export": str(a.export_out), "model": student_torch.cfg.to_dict(),
                    "distill": distill_info, "export_parity": export_cfg["parity"]},
        "sizes": sizes, "latency": lat, "accuracy": accuracy, "downlink": down,
        "goals": {
            **GOALS,
            "size_met": sizes["ratio"] >= GOALS["size_ratio_min"],
            "latency_met": lat["ratio_teacher_over_student"] >= GOALS["latency_ratio_min"],
            "accuracy_met": accuracy["gap_points"] <= GOALS["accuracy_gap_max_points"],
            "downlink_met": down["ratio_full_fp32_over_student_int8"] >= GOALS["downlink_ratio_min"],
        },
        "seconds": time.perf_counter() - t_start,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"size {sizes['ratio']:.1f}x smaller ({sizes['teacher_fp32_weights_file_bytes']:,} -> "
          f"{sizes['student_int8_onnx_bytes']:,} B); batch-1 latency {lat['teacher_torch_fp32']['median_ms']:.2f} -> "
          f"{lat['student_onnx_int8']['median_ms']:.2f} ms ({lat['ratio_teacher_over_student']:.1f}x); Amazon accuracy "
          f"teacher {accuracy['teacher_torch_fp32']:.4f}, int8 student {accuracy['student_onnx_int8']:.4f} "
          f"(gap {accuracy['gap_points']:.2f} points); downlink {down['teacher_full_fp32']:,} -> "
          f"{down['student_int8']:,} B ({down['ratio_full_fp32_over_student_int8']:.1f}x); goals {result['goals']}; "
          f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
