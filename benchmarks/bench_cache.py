"""What the frozen-bottom cache saves on the default job's client work, without any engine.

    FEDRNN_DATA_DIR=... python benchmarks/bench_cache.py [--rounds 2] [--repeat 2]

Replays the client jobs of ``benchmarks/plain_compare.toml`` (100 clients, 10 a round, 3 local
epochs, fine-tune) back to back in one process (``benchmarks/serial_jobs.py``), with
``client.frozen_cache_mb`` = 0 (live) and 256 (cached), alternated ``--repeat`` times. Reports
CPU seconds (what the shared machine's load distorts least) and wall seconds, with the load
average before each run. Results go to ``benchmarks/results/cache.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serial_jobs import serial_jobs  # noqa: E402

from fedrnn.config import load_config  # noqa: E402
from fedrnn.runs.lifecycle import new_run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cache.json"))
    a = p.parse_args()
    runs: dict[str, list[dict]] = {"live": [], "cached": []}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        for name, mb in (("live", 0), ("cached", 256)):
            cfg = load_config(ROOT / "benchmarks" / "plain_compare.toml",
                              {"run": {"rounds": a.rounds}, "client": {"frozen_cache_mb": mb}})
            dirs[name] = new_run(Path(tmp) / name, cfg).dir.path
        for _ in range(a.repeat):
            for name, path in dirs.items():
                load = os.getloadavg()[0]
                runs[name].append(serial_jobs(path) | {"load_average_1min_before": load})
                print(name, runs[name][-1], flush=True)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in ("serial_job_seconds", "serial_cpu_seconds")}
           for name, rs in runs.items()}
    out = {"command": " ".join(["python", *sys.argv]), "rounds": a.rounds, "runs": runs, "median": med,
           "cpu_saving": 1 - med["cached"]["serial_cpu_seconds"] / med["live"]["serial_cpu_seconds"],
           "cpu_speedup": med["live"]["serial_cpu_seconds"] / med["cached"]["serial_cpu_seconds"]}
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
