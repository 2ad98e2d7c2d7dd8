"""Benchmark the default teacher: IMDB test accuracy and pretraining wall time on this machine.

    FEDRNN_DATA_DIR=../shared/data python benchmarks/bench_pretrain.py [--out cache/teacher]

Targets (issue 2): IMDB test accuracy >= 0.89, wall time <= 15 minutes on 2 cores.
Writes benchmarks/results/pretrain.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from fedrnn.model.pretrain import PretrainConfig, pretrain

RESULTS = Path(__file__).resolve().parent / "results" / "pretrain.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="cache/teacher")
    a = p.parse_args()
    t0 = time.perf_counter()
    m = pretrain(PretrainConfig(), a.out, quiet=True)
    wall = time.perf_counter() - t0
    result = {
        "imdb_test_accuracy": m["imdb_test_accuracy"],
        "amazon_zero_shot_accuracy": m["amazon_zero_shot_accuracy"],
        "amazon_zero_shot_mean": m["amazon_zero_shot_mean"],
        "parameters": m["parameters"],
        "wall_seconds_total": wall,
        "epochs_run": len(m["history"]),
        "history": m["history"],
        "targets": {"imdb_test_accuracy": 0.89, "wall_seconds": 900},
        "meets_targets": m["imdb_test_accuracy"] >= 0.89 and wall <= 900,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "command": "FEDRNN_DATA_DIR=../shared/data python benchmarks/bench_pretrain.py",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))


if __name__ == "__main__":
    main()
