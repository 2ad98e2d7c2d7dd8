"""Float32 against int8 and int4 on the wire in a real simulation: accuracy cost and bytes saved.

    FEDRNN_DATA_DIR=... python benchmarks/bench_compression.py [--teacher cache/teacher] [--seeds 0 1 2]

Every variant runs on the same config and seeds (so the same clients are sampled every round),
only ``[compression]`` differing, long enough for rounding to matter: ``--rounds`` (20) rounds
of ``--local-epochs`` (3) whole local epochs, fine-tune mode. All runs go through one Flower
simulation (``fedrnn.runs.lifecycle.run_batch``: Ray starts once):

* ``float32``: the baseline, FedAvg with float32 both ways;
* ``int8-error-feedback``: int8 broadcast (per-row float32 scales), int8 updates with error feedback;
* ``int4-error-feedback``: int4 broadcast and int4 updates with error feedback (per-block float16
  scales, ``fedrnn.edge.quantize``), the >= 4x-both-ways option.

Bytes are the rounds' ``bytes_down`` / ``bytes_up`` (what was sent and received) against
``bytes_down_float32`` / ``bytes_up_float32`` (what float32 FedAvg sends in the same mode).
Accuracy is the server-side target accuracy after the last round, mean ± sd over seeds, and
the cost is the paired (same seed) difference to float32. Sized for a shared 2-core machine:
``--clients-per-round`` and ``--data-fraction`` (a seeded subsample of the Amazon pool) keep
it within the time available; the JSON records the sizing. Results go to
``benchmarks/results/compression.json``; each run keeps its metrics and config under ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from fedrnn.config import config_from_dict
from fedrnn.federation.rundir import RunDir
from fedrnn.runs.lifecycle import run_batch

VARIANTS: dict[str, dict[str, Any]] = {
    "float32": {},
    "int8-error-feedback": {"downlink": "int8", "uplink": "int8", "error_feedback": True},
    "int4-error-feedback": {"downlink": "int4", "uplink": "int4", "error_feedback": True},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="cache/teacher")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--clients-per-round", type=int, default=4)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-epochs", type=int, default=3)
    p.add_argument("--data-fraction", type=float, default=0.5, help="share of the Amazon pool given to clients")
    p.add_argument("--test-examples", type=int, default=800, help="Amazon test reviews for server evaluation")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--work", default="benchmarks/results/compression-runs", help="where the run directories go")
    p.add_argument("--out", default="benchmarks/results/compression.json")
    return p.parse_args(argv)


def config(a: argparse.Namespace, seed: int, compression: dict[str, Any]) -> dict[str, Any]:
    return {
        "run": {"clients": a.clients, "rounds": a.rounds, "clients_per_round": a.clients_per_round,
                "target": "amazon", "mode": "fine-tune", "strategy": "fedavg", "seed": seed,
                "teacher": str(Path(a.teacher).resolve()), "data_fraction": a.data_fraction},
        "client": {"batch_size": 16, "lr": 0.001, "local_epochs": a.local_epochs},
        "server": {"retention_examples": 0, "target_test_examples": a.test_examples, "eval_every": a.rounds,
                   "fraction_evaluate": 0.0, "keep_checkpoints": 1},
        "simulation": {"actors": 2, "threads_per_actor": 1},
        "compression": compression,
    }


def summarize(run: Path) -> dict[str, Any]:
    rows = RunDir(run).read_metrics()
    rounds = [r for r in rows if r["round"] >= 1]
    total = {k: sum(r[k] for r in rounds) for k in ("bytes_down", "bytes_up", "bytes_down_float32",
                                                    "bytes_up_float32", "trained")}
    return {
        "target_accuracy_final": rounds[-1]["target_accuracy"],
        "target_accuracy_round0": rows[0]["target_accuracy"],
        "target_loss_final": rounds[-1]["target_loss"],
        **total,
        "down_ratio_vs_float32": total["bytes_down_float32"] / total["bytes_down"],
        "up_ratio_vs_float32": total["bytes_up_float32"] / total["bytes_up"],
        "uplink_rejected": sum(r.get("uplink_rejected", 0) for r in rounds),
    }


def _mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    work = Path(a.work)
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"{work} is not empty; remove it or pass another --work")
    configs = {f"{name}-seed{seed}": config_from_dict(config(a, seed, VARIANTS[name]))
               for name in a.variants for seed in a.seeds}
    t0, load = time.perf_counter(), os.getloadavg()
    run_batch(configs, work)
    seconds = time.perf_counter() - t0
    runs = {arm: summarize(work / arm) for arm in configs}
    for arm in configs:
        for bulky in ("checkpoints", "client_state"):
            shutil.rmtree(work / arm / bulky, ignore_errors=True)
        (work / arm / "state.safetensors").unlink(missing_ok=True)
    results: dict[str, Any] = {}
    for name in a.variants:
        mine = [runs[f"{name}-seed{s}"] for s in a.seeds]
        final = {arm: r["target_accuracy_final"] for arm, r in runs.items()}
        cost = ([100 * (final[f"float32-seed{s}"] - final[f"{name}-seed{s}"]) for s in a.seeds]
                if "float32" in a.variants else [])
        results[name] = {
            "compression": VARIANTS[name],
            "target_accuracy_final": _mean_sd([r["target_accuracy_final"] for r in mine]),
            "accuracy_cost_points_vs_float32": _mean_sd(cost) if cost else None,
            "down_ratio_vs_float32": mine[0]["down_ratio_vs_float32"],
            "up_ratio_vs_float32": mine[0]["up_ratio_vs_float32"],
            "bytes_down_per_run": mine[0]["bytes_down"], "bytes_up_per_run": mine[0]["bytes_up"],
            "uplink_rejected": sum(r["uplink_rejected"] for r in mine),
            "per_seed": dict(zip(map(str, a.seeds), mine, strict=True)),
        }
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "per_seed"}), flush=True)
    out = {"command": " ".join(["python", *sys.argv]), "args": vars(a), "seconds": seconds,
           "load_average_before": load, "load_average_after": os.getloadavg(), "results": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")
    return out


if __name__ == "__main__":
    main()
