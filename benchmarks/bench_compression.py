"""Float32 against int8 on the wire in a real simulation: accuracy cost and bytes saved.

    FEDRNN_DATA_DIR=... python benchmarks/bench_compression.py [--teacher cache/teacher] [--rounds 4]

Runs ``python -m fedrnn.simulate`` once per variant on the same config and seed (so the same
clients are sampled every round), only ``[compression]`` differing:

* ``float32``: the baseline, FedAvg with float32 both ways;
* ``int8-stochastic``: int8 broadcast, int8 updates with stochastic rounding;
* ``int8-error-feedback``: int8 broadcast, int8 updates rounded to nearest with error feedback.

Bytes are the rounds' ``bytes_down`` / ``bytes_up`` (``fedrnn.federation.wire.record_nbytes`` of what was
sent and received); accuracy is the server-side target accuracy after the last round, and the
mean over all rounds. Results go to ``benchmarks/results/compression.json``; each run keeps its
metrics, config and plots under ``--work`` (its checkpoints, ~10 MB a round, are deleted).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedrnn.config import dump_toml
from fedrnn.federation.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent
VARIANTS: dict[str, dict[str, Any]] = {
    "float32": {},
    "int8-stochastic": {"downlink": "int8", "uplink": "int8", "rounding": "stochastic"},
    "int8-error-feedback": {"downlink": "int8", "uplink": "int8", "error_feedback": True},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="cache/teacher")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--clients-per-round", type=int, default=5)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--max-steps", type=int, default=4, help="local steps per client and round")
    p.add_argument("--test-examples", type=int, default=400, help="Amazon test reviews for server evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="benchmarks/results/compression-runs", help="where the run directories go")
    p.add_argument("--out", default="benchmarks/results/compression.json")
    return p.parse_args(argv)


def write_config(path: Path, a: argparse.Namespace, compression: dict[str, Any]) -> None:
    sections = {
        "run": {"clients": a.clients, "rounds": a.rounds, "clients_per_round": a.clients_per_round,
                "target": "amazon", "mode": "fine-tune", "strategy": "fedavg", "seed": a.seed},
        "client": {"batch_size": 16, "lr": 0.001, "max_steps": a.max_steps},
        "server": {"retention_examples": 0, "target_test_examples": a.test_examples},
        "simulation": {"actors": 2, "threads_per_actor": 1},
        "compression": compression,
    }
    path.write_text(dump_toml({name: values for name, values in sections.items() if values}))


def summarize(run: Path) -> dict[str, Any]:
    rows = RunDir(run).read_metrics()
    rounds = [r for r in rows if r["round"] >= 1]
    return {
        "target_accuracy_final": rounds[-1]["target_accuracy"],
        "target_accuracy_mean": sum(r["target_accuracy"] for r in rounds) / len(rounds),
        "target_accuracy_round0": rows[0]["target_accuracy"],
        "target_loss_final": rounds[-1]["target_loss"],
        "bytes_down": sum(r["bytes_down"] for r in rounds),
        "bytes_up": sum(r["bytes_up"] for r in rounds),
        "uplink_rejected": sum(r.get("uplink_rejected", 0) for r in rounds),
        "trained": sum(r["trained"] for r in rounds),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    results: dict[str, Any] = {}
    for name, compression in VARIANTS.items():
        config, run = work / f"{name}.toml", work / name
        write_config(config, a, compression)
        if (run / "state.json").is_file():
            raise SystemExit(f"{run} already holds a run; remove {work} or pass another --work")
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "fedrnn.simulate", "--config", str(config), "--teacher", a.teacher,
                            "--out", str(run)], env=env, cwd=ROOT, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{name} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
        results[name] = {"compression": compression, "seconds": time.perf_counter() - t0, **summarize(run)}
        for bulky in ("checkpoints", "client_state"):
            shutil.rmtree(run / bulky, ignore_errors=True)
        (run / "state.safetensors").unlink(missing_ok=True)
        print(f"{name}: {results[name]}", flush=True)
    base = results["float32"]
    for res in results.values():
        res["bytes_down_saved_ratio"] = base["bytes_down"] / res["bytes_down"]
        res["bytes_up_saved_ratio"] = base["bytes_up"] / res["bytes_up"]
        res["accuracy_cost_points_final"] = 100 * (base["target_accuracy_final"] - res["target_accuracy_final"])
        res["accuracy_cost_points_mean"] = 100 * (base["target_accuracy_mean"] - res["target_accuracy_mean"])
    out = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "args": vars(a), "results": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")
    return out


if __name__ == "__main__":
    main()
