"""Benchmark the main job and the Simulation Engine set-up (issue 3 targets).

    FEDRNN_DATA_DIR=../shared/data python benchmarks/bench_simulate.py [--part default|plain|scale|all]

* ``default``: ``python -m fedrnn.simulate --clients 100`` (teacher cached): wall time
  (target <= 180 s) and simulation efficiency = clients' local training seconds / wall
  seconds (target >= 0.8).
* ``plain``: the same training (100 clients, 10 per round, 20 rounds, the default local work)
  on a plain Flower app with default client resources (``benchmarks/plain_flower.py``)
  against fedrnn, alternated ``--repeat`` times; target: fedrnn >= 2x faster. Also records
  the machine's busy CPU seconds during each run: fedrnn's busy seconds / cores is a floor
  on its wall time, hence a bound on the speed-up any scheduling could reach.
* ``scale``: 100 vs 10,000 clients at 10 per round, identical work per sampled client
  (IMDB target, one local step of batch 2, no federated evaluation): wall time and peak
  memory of the whole process tree (driver + Ray); target: 10,000 within 1.2x of 100. Run it
  with the IMDB target cache already prepared (any earlier IMDB run), or the first
  measurement also pays for tokenizing 25,000 reviews.

Each measurement runs in a fresh subprocess (its own Ray). Results merge into
benchmarks/results/simulate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "simulate.json"


def busy_core_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores): Ray's processes are not our children."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def run_measured(cmd: list[str], cwd: Path = ROOT) -> dict:
    """Run a command: wall time, machine-wide busy CPU seconds (a floor on the wall time is
    busy / cores) and peak summed RSS of its whole process tree (sampled at 5 Hz)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    busy0 = busy_core_seconds()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, _ = proc.communicate(timeout=1800)
    done.set()
    t.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-4000:]}")
    wall, busy = time.perf_counter() - t0, busy_core_seconds() - busy0
    return {"wall_seconds": wall, "busy_core_seconds": busy, "cores": psutil.cpu_count(), "peak_rss_mb": peak / 2**20,
            "log_tail": out[-600:]}


def simulate(out: Path, *args: str) -> dict:
    m = run_measured([sys.executable, "-m", "fedrnn.simulate", "--out", str(out), *args])
    summary = json.loads((out / "summary.json").read_text())
    m.pop("log_tail")
    return {
        **m,
        "efficiency_loop": summary["simulation_efficiency"],
        "efficiency_total": summary["client_train_seconds"] / m["wall_seconds"],
        "client_train_seconds": summary["client_train_seconds"],
        "target_accuracy": summary["final"].get("target_accuracy"),
    }


def part_default(tmp: Path) -> dict:
    r = simulate(tmp / "default", "--clients", "100")
    return {
        **r,
        "command": "python -m fedrnn.simulate --clients 100",
        "targets": {"wall_seconds": 180, "efficiency": 0.8},
    }


PLAIN = f"""
import json, sys
sys.path.insert(0, {str(ROOT / "benchmarks")!r})  # a site-packages "benchmarks" package would shadow ours
from plain_flower import run_plain
cfg, rounds, per_round, clients = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print("RESULT", json.dumps(run_plain(cfg, rounds, per_round, clients)))
"""


def part_plain(tmp: Path, rounds: int = 20, repeat: int = 1) -> dict:
    """fedrnn and the plain app, alternated ``repeat`` times (timings on a shared 2-core machine
    vary by 10-15% run to run); the speed-up is the ratio of the medians."""
    runs: list[dict] = []
    for i in range(repeat):
        fed_out = tmp / f"fedrnn-plain-cmp-{i}"
        fed = simulate(
            fed_out,
            "--clients",
            "100",
            "--rounds",
            str(rounds),
            "--config",
            str(ROOT / "benchmarks" / "plain_compare.toml"),
        )
        prepared = {
            "teacher-path": str((ROOT / "cache" / "teacher").resolve()),
            "target-path": _target_path(),
            "partitions-path": str(fed_out / "partitions.npz"),
            "mode": "fine-tune",
            "lr": 1e-3,
            "local-epochs": 3,
            "batch-size": 16,
            "holdout-fraction": 0.2,
            "seed": 0,
        }
        m = run_measured([sys.executable, "-c", PLAIN, json.dumps(prepared), str(rounds), "10", "100"])
        line = next(ln for ln in m["log_tail"].splitlines() if ln.startswith("RESULT"))
        plain = json.loads(line[len("RESULT ") :])
        runs.append(
            {
                "fedrnn_wall_seconds": fed["wall_seconds"],
                "plain_wall_seconds": m["wall_seconds"],
                "fedrnn_busy_core_seconds": fed["busy_core_seconds"],
                "plain_busy_core_seconds": m["busy_core_seconds"],
                "fedrnn_client_train_seconds": fed["client_train_seconds"],
                "plain_client_train_seconds": plain["client_train_seconds"],
            }
        )
    median = {k: float(statistics.median(r[k] for r in runs)) for k in runs[0]}
    return {
        "rounds": rounds,
        "runs": runs,
        "median": median,
        "speedup": median["plain_wall_seconds"] / median["fedrnn_wall_seconds"],
        # the most any engine could gain over the plain app with fedrnn's CPU work on these cores
        "speedup_bound": median["plain_wall_seconds"] / (median["fedrnn_busy_core_seconds"] / psutil.cpu_count()),
        "target_speedup": 2.0,
    }


def _target_path() -> str:
    cache = Path(os.environ.get("FEDRNN_CACHE_DIR", ROOT / "cache")) / "target"
    return str(next(cache.glob("amazon-*-ret500.npz")).resolve())  # plain_compare.toml keeps 500 retention


def part_scale(tmp: Path) -> dict:
    cfg = str(ROOT / "benchmarks" / "scale.toml")
    small = simulate(tmp / "scale-100", "--config", cfg, "--clients", "100")
    large = simulate(tmp / "scale-10000", "--config", cfg, "--clients", "10000")
    return {
        "clients_100": small,
        "clients_10000": large,
        "time_ratio": large["wall_seconds"] / small["wall_seconds"],
        "memory_ratio": large["peak_rss_mb"] / small["peak_rss_mb"],
        "target_ratio": 1.2,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["default", "plain", "scale", "all"], default="all")
    p.add_argument("--repeat", type=int, default=3, help="alternated fedrnn/plain pairs in the plain part")
    a = p.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    parts = {"default": part_default, "plain": lambda tmp: part_plain(tmp, repeat=a.repeat), "scale": part_scale}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in parts.items():
            if a.part in (name, "all"):
                results[name] = fn(Path(tmp)) | {
                    "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "load_average_before": os.getloadavg(),
                }
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                RESULTS.write_text(json.dumps(results, indent=2) + "\n")
                print(name, json.dumps(results[name], indent=2))


if __name__ == "__main__":
    main()
