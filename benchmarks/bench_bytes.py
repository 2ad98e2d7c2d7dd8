"""Wire bytes per client and round against float32 FedAvg in the same transfer mode, and a run's checkpoint size.

    python benchmarks/bench_bytes.py

Exact, not timed: the default ``ModelConfig()`` shapes (what the pretrained teacher has), each
mode's travelling tensors serialized as Flower ``ArrayRecord``s (``fedrnn.federation.wire.record_nbytes``,
headers included) as float32, int8 (per-row float32 scales) and int4 (per-block float16 scales),
and the default ``[distill]`` student as int8: the extra downlink a round that ships it adds per
client. Then the checkpoint retention of a 20-round run: ``RunDir.save_round`` with the full
default model every round, ``keep`` = 2 and a best round early in the run (the worst case: the
best is not among the last two), and the directory's size on disk (``du``). Results go to
``benchmarks/results/bytes.json``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from fedrnn.config import DistillSection
from fedrnn.edge.distill import make_student
from fedrnn.edge.quantize import encode
from fedrnn.federation.rundir import RunDir
from fedrnn.federation.wire import record_nbytes, to_record
from fedrnn.model.rnn import TRANSFER_MODES, ModelConfig, SentimentRNN, trainable_names

ROOT = Path(__file__).resolve().parent.parent


def wire_bytes(model: SentimentRNN) -> dict[str, dict[str, float]]:
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out = {}
    for mode in TRANSFER_MODES:
        tensors = {n: sd[n] for n in trainable_names(model, mode)}
        fp32, int8, int4 = (record_nbytes(to_record(p)) for p in (tensors, encode(tensors), encode(tensors, bits=4)))
        out[mode] = {"float32": fp32, "int8": int8, "int4": int4, "int8_ratio": fp32 / int8, "int4_ratio": fp32 / int4}
    return out


def student_bytes(teacher: ModelConfig) -> dict[str, int]:
    d = DistillSection()
    student = make_student(teacher, d.embed_dim, d.hidden_size, d.num_layers, d.cell)
    state = {k: v.detach().numpy() for k, v in student.state_dict().items()}
    return {"student_float32": record_nbytes(to_record(state)), "student_int8": record_nbytes(to_record(encode(state)))}


def checkpoint_dir_size(model: SentimentRNN, rounds: int = 20, keep: int = 2) -> dict[str, object]:
    state = model.state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        rd = RunDir(Path(tmp) / "run", keep=keep)
        rd.create({})
        scores = {r: (0.9 if r == 5 else 0.5 + r / 100) for r in range(5, rounds + 1, 5)}  # best at round 5
        trainable = {n: state[n].numpy() for n in trainable_names(model, "fine-tune")}
        for rnd in range(1, rounds + 1):
            rd.save_round(rnd, state, {f"global/{k}": v for k, v in trainable.items()}, {"totals": {}},
                          scores.get(rnd))
        du = subprocess.run(["du", "-sb", str(rd.path)], capture_output=True, text=True, check=True)
        files = sorted(p.name for p in rd.checkpoints.iterdir())
        return {"rounds": rounds, "keep": keep, "du_bytes": int(du.stdout.split()[0]), "checkpoint_files": files,
                "full_model_bytes": (rd.checkpoints / "best.safetensors").stat().st_size}


def main() -> None:
    torch.manual_seed(0)
    model = SentimentRNN(ModelConfig())
    result = {"command": "python " + " ".join(sys.argv), "model": ModelConfig().to_dict(),
              "per_client_and_round": wire_bytes(model), **student_bytes(model.cfg),
              "checkpoints": checkpoint_dir_size(model)}
    ft = result["per_client_and_round"]["fine-tune"]
    student = result["student_int8"]  # travels on top of the training broadcast in a round that ships it
    result["fine_tune_downlink_in_a_shipping_round"] = {
        "float32_broadcast_plus_student": ft["float32"] + student, "int8_broadcast_plus_student": ft["int8"] + student,
        "int4_broadcast_plus_student": ft["int4"] + student,
        "int8_ratio_vs_float32_broadcast_alone": ft["float32"] / (ft["int8"] + student),
        "int4_ratio_vs_float32_broadcast_alone": ft["float32"] / (ft["int4"] + student),
    }
    out = ROOT / "benchmarks" / "results" / "bytes.json"
    out.write_text(json.dumps(result, indent=2, default=lambda o: float(o) if isinstance(o, np.floating) else o) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
