"""Benchmark the main job and the Simulation Engine set-up (issue 3 targets).

    FEDRNN_DATA_DIR=../shared/data python benchmarks/bench_simulate.py [--part default|plain|scale|all]

* ``default``: ``python -m fedrnn.simulate --clients 100`` (teacher cached): wall time
  (target <= 180 s) and per-core efficiency = clients' training CPU seconds / (round-loop
  wall x cores).
* ``plain``: the same training (100 clients, 10 per round, ``--rounds``, the default local
  work) on plain Flower 1.42 apps (``benchmarks/plain_flower.py``): the *tuned* app (one
  SuperNode per client, 1 CPU and 1 torch thread per client, teacher and data cached per
  worker) is the baseline; the *default-resources* app is a second row. fedrnn, tuned and
  default alternate ``--repeat`` times; target: fedrnn >= 2x faster than the tuned app
  (median walls). Each fedrnn run's client jobs are also replayed back to back in one
  process (``benchmarks/serial_jobs.py``): T(serial) / T(run) is the engine's parallel gain.
* ``growth``: 10, 50 and 100 clients per round (of 100, the scale config's fixed work per
  client, Amazon target): wall time and peak memory, plotted to ``benchmarks/results/growth.png``.
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
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from fedrnn.federation.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "simulate.json"


def busy_core_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores): Ray's processes are not our children."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


RAY_START_FAILED = "timed out during startup"  # Ray gives its raylet 30 s, which a loaded machine can miss


def run_measured(cmd: list[str], cwd: Path = ROOT, attempts: int = 3) -> dict:
    """``_run_measured``, retried (up to ``attempts``) when Ray itself failed to start: no work was done."""
    for attempt in range(attempts):
        try:
            return _run_measured(cmd, cwd) | {"ray_start_retries": attempt}
        except RuntimeError as e:
            if RAY_START_FAILED not in str(e) or attempt == attempts - 1:
                raise
            if "--out" in cmd:  # the failed start left a run directory behind; a new run needs it gone
                shutil.rmtree(cmd[cmd.index("--out") + 1], ignore_errors=True)
    raise AssertionError("unreachable")


def _run_measured(cmd: list[str], cwd: Path = ROOT) -> dict:
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
        "loop_wall_seconds": summary["wall_seconds"],
        "efficiency_per_core": summary["efficiency_per_core"],
        "client_train_seconds": summary["client_train_seconds"],
        "client_cpu_seconds": summary["client_cpu_seconds"],
        "target_accuracy": summary["final"].get("target_accuracy"),
        "profile": round_profile(out, summary["cores"]),
    }


def round_profile(run_dir: Path, cores: int) -> dict:
    """Where a round's wall time goes, summed over the run's rounds: clients' training (their CPU
    seconds spread over the cores), evaluation (server-side and federated), and the rest (engine:
    messages, Ray, aggregation, checkpoints, and cores idling while the slowest client finishes)."""
    rows = [r for r in RunDir(run_dir).read_metrics() if r["round"] >= 1]
    wall = sum(r["round_seconds"] for r in rows)
    compute = sum(r["client_cpu_seconds"] for r in rows) / cores
    evaluation = sum(r.get("eval_seconds", 0.0) for r in rows)
    return {"rounds": len(rows), "round_seconds": wall, "client_compute_seconds_per_core": compute,
            "evaluation_seconds": evaluation, "engine_and_idle_seconds": wall - compute - evaluation}


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
print("RESULT", json.dumps(run_plain(cfg, rounds, per_round, clients, tuned=sys.argv[5] == "tuned")))
"""


def plain_app(prepared: dict, rounds: int, variant: str) -> dict:
    """One run of a plain Flower app (``benchmarks/plain_flower.py``): ``tuned`` or ``default`` resources."""
    load = os.getloadavg()[0]
    m = run_measured([sys.executable, "-c", PLAIN, json.dumps(prepared), str(rounds), "10", "100", variant])
    line = next(ln for ln in m["log_tail"].splitlines() if ln.startswith("RESULT"))
    plain = json.loads(line[len("RESULT ") :])
    cores = psutil.cpu_count()
    return {"wall_seconds": m["wall_seconds"], "loop_wall_seconds": plain["wall_seconds"],
            "busy_core_seconds": m["busy_core_seconds"], "client_train_seconds": plain["client_train_seconds"],
            "client_cpu_seconds": plain["client_cpu_seconds"],
            "efficiency_per_core": plain["client_cpu_seconds"] / (plain["wall_seconds"] * cores),
            "load_average_1min_before": load}


def serial(run_dir: Path) -> dict:
    """The fedrnn run's client jobs back to back in one process (``benchmarks/serial_jobs.py``)."""
    load = os.getloadavg()[0]
    m = run_measured([sys.executable, str(ROOT / "benchmarks" / "serial_jobs.py"), str(run_dir)])
    return json.loads(m["log_tail"].strip().splitlines()[-1]) | {"load_average_1min_before": load}


def part_plain(tmp: Path, rounds: int = 20, repeat: int = 3, default_every: int = 1) -> dict:
    """fedrnn, the tuned plain app and (every ``default_every``-th pair) the default-resources app,
    alternated ``repeat`` times in one invocation; speed-ups are ratios of medians. Each fedrnn
    run's client jobs are also replayed back to back in one process (``serial``) for T(serial) / T(run).
    Timings on the shared 2-core machine vary with the others' load: each run records the 1-minute
    load average before it, so pairs measured under different loads can be told apart.
    """
    runs: list[dict] = []
    for i in range(repeat):
        fed_out = tmp / f"fedrnn-plain-cmp-{i}"
        load = os.getloadavg()[0]
        fed = simulate(fed_out, "--clients", "100", "--rounds", str(rounds),
                       "--config", str(ROOT / "benchmarks" / "plain_compare.toml"))
        prepared = {
            "teacher-path": str((Path(os.environ.get("FEDRNN_CACHE_DIR", ROOT / "cache")) / "teacher").resolve()),
            "target-path": _target_path(),
            "partitions-path": str(fed_out / "partitions.npz"),
            "mode": "fine-tune",
            "lr": 1e-3,
            "local-epochs": 3,
            "batch-size": 16,
            "holdout-fraction": 0.2,
            "seed": 0,
        }
        row = {"fedrnn": fed | {"load_average_1min_before": load}, "tuned": plain_app(prepared, rounds, "tuned")}
        if default_every and i % default_every == 0:
            row["default"] = plain_app(prepared, rounds, "default")
        row["serial"] = serial(fed_out)
        runs.append(row)
        print(f"pair {i}:", json.dumps(row), flush=True)
    med = {app: float(statistics.median(r[app]["wall_seconds"] for r in runs if app in r))
           for app in ("fedrnn", "tuned", "default") if any(app in r for r in runs)}
    fed_loop = float(statistics.median(r["fedrnn"]["loop_wall_seconds"] for r in runs))
    return {
        "rounds": rounds,
        "runs": runs,
        "median_wall_seconds": med,
        "speedup_vs_tuned": med["tuned"] / med["fedrnn"],
        "speedup_vs_default": med["default"] / med["fedrnn"] if "default" in med else None,
        # T(the same client jobs back to back in one process) / T(fedrnn's round loop)
        "serial_over_run": float(statistics.median(r["serial"]["serial_job_seconds"] for r in runs)) / fed_loop,
        "efficiency_per_core": {app: float(statistics.median(r[app]["efficiency_per_core"] for r in runs if app in r))
                                for app in med},
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


def part_growth(tmp: Path, per_round: tuple[int, ...] = (10, 50, 100), rounds: int = 3) -> dict:
    """Wall time and peak memory (driver + Ray) against clients per round: 10, 50, 100 of 100 Amazon
    clients, each doing the scale config's fixed work (one local step of batch 2), so what grows is
    the engine's per-client cost. Plots ``benchmarks/results/growth.png``."""
    cfg = str(ROOT / "benchmarks" / "scale.toml")
    rows = {}
    for k in per_round:
        load = os.getloadavg()[0]
        r = simulate(tmp / f"growth-{k}", "--config", cfg, "--target", "amazon", "--clients", "100",
                     "--clients-per-round", str(k), "--rounds", str(rounds))
        rows[str(k)] = r | {"load_average_1min_before": load, "seconds_per_round": r["loop_wall_seconds"] / rounds}
        print(f"growth {k}:", json.dumps(rows[str(k)]), flush=True)
    _plot_growth(rows, RESULTS.parent / "growth.png")
    return {"rounds": rounds, "clients": 100, "per_round": rows, "plot": "benchmarks/results/growth.png"}


def _plot_growth(rows: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [int(k) for k in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(ks, [rows[str(k)]["seconds_per_round"] for k in ks], "o-")
    a.set(xlabel="clients per round", ylabel="round-loop seconds per round", title="wall time", ylim=(0, None))
    b.plot(ks, [rows[str(k)]["peak_rss_mb"] for k in ks], "o-")
    b.set(xlabel="clients per round", ylabel="peak RSS, MB (driver + Ray)", title="memory", ylim=(0, None))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["default", "plain", "scale", "growth", "all"], default="all")
    p.add_argument("--repeat", type=int, default=3, help="alternated fedrnn/plain pairs in the plain part")
    p.add_argument("--rounds", type=int, default=20, help="rounds of the plain part's job")
    p.add_argument("--default-every", type=int, default=1,
                   help="run the default-resources app in every k-th pair only (0 = never)")
    a = p.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    parts = {"default": part_default, "plain": lambda tmp: part_plain(tmp, a.rounds, a.repeat, a.default_every),
             "scale": part_scale, "growth": part_growth}
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
