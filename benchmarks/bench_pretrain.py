"""Benchmark teacher pretraining: the previous recipe against the short-text recipe, side by side.

    FEDRNN_DATA_DIR=../shared/data python benchmarks/bench_pretrain.py [--out-dir cache/bench_pretrain]
    FEDRNN_DATA_DIR=../shared/data python benchmarks/bench_pretrain.py --train-limit 5000 --eval-limit 2000 \
        --full-new cache/bench_pretrain/short_text

The second form compares both recipes on a seeded subset of IMDB train (when the shared machine
is too loaded for two full pretrainings) and adds the accuracies of a full-scale run of the new
recipe (``python -m fedrnn.model.pretrain --out DIR``) read from ``DIR/metrics.json``.

Both recipes run at the same time, as two processes with the same torch thread count, so a
change in the shared machine's load hits both alike; each one's wall time *and* CPU seconds
(user + system, from ``wait4``) are recorded, with the load average sampled every few seconds,
and each run records its own training CPU seconds (``time.process_time``: data, tokenizer, epochs,
early-stopping validation; not the final evaluations). CPU seconds are the load-independent
measure; wall times on a shared machine are pessimistic.
Each run writes its teacher checkpoint (the new one is the default teacher's recipe) and its
zero-shot accuracies: IMDB test, Amazon categories, rt_polarity, uci_sentences (never trained on).

Targets (issues 14 and 16): the new recipe >= 2x faster than the previous one, IMDB test >= 0.89,
rt_polarity >= 0.76, uci_sentences >= 0.84. Writes benchmarks/results/pretrain.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "pretrain.json"
RECIPES = {"previous": ["--previous-recipe"], "short_text": []}
TARGETS = {"speedup": 2.0, "imdb_test_accuracy": 0.89, "rt_polarity_zero_shot_accuracy": 0.76,
           "uci_sentences_zero_shot_accuracy": 0.84}


def run_both(out_dir: Path, threads: int, extra: list[str], deadline_s: float) -> dict[str, dict[str, Any]]:
    """Start both pretrainings at once; wall and CPU seconds of each, as each finishes.

    A run still going ``deadline_s`` after the start is stopped: its CPU seconds so far are then a
    lower bound on what it needs (``finished`` false), so the speed-up computed from them is too.
    """
    procs: dict[int, tuple[str, subprocess.Popen, float]] = {}
    for name, flags in RECIPES.items():
        cmd = [sys.executable, "-m", "fedrnn.model.pretrain", "--out", str(out_dir / name),
               "--threads", str(threads), *flags, *extra]
        log = (out_dir / f"{name}.log").open("w")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        procs[p.pid] = (name, p, time.perf_counter())
    done: dict[str, dict[str, Any]] = {}
    t_start = time.perf_counter()
    while procs:
        pid, status, usage = os.wait4(-1, os.WNOHANG)
        if pid == 0:
            if time.perf_counter() - t_start > deadline_s:
                for _, proc, _ in procs.values():
                    proc.terminate()
                deadline_s = float("inf")
            time.sleep(1.0)
            continue
        if pid not in procs:
            continue
        name, _, t0 = procs.pop(pid)
        finished = os.waitstatus_to_exitcode(status) == 0
        if not finished and deadline_s != float("inf"):
            raise SystemExit(f"{name} pretraining failed; see {out_dir / (name + '.log')}")
        metrics = json.loads((out_dir / name / "metrics.json").read_text()) if finished else {}
        done[name] = {"wall_seconds": time.perf_counter() - t0, "cpu_seconds": usage.ru_utime + usage.ru_stime,
                      "finished": finished, "metrics": metrics}
    return done


def wait_for(path: Path, timeout_s: float) -> Path:
    """``path`` once it exists (a full-scale run still finishing), waiting at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} did not appear within {timeout_s:.0f} s")
        time.sleep(10.0)
    return path


def sample_load(stop: threading.Event, into: list[float]) -> None:
    while not stop.wait(5.0):
        into.append(os.getloadavg()[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="cache/bench_pretrain", help="where both teachers are written")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (both runs share the machine)")
    p.add_argument("--train-limit", type=int, help="subsample IMDB train (a quick check, not a result)")
    p.add_argument("--eval-limit", type=int)
    p.add_argument("--out", default=str(RESULTS), help="where the JSON goes")
    p.add_argument("--full-new", help="checkpoint dir of a full-scale short-text pretraining to report too")
    p.add_argument("--deadline-s", type=float, default=float("inf"),
                   help="stop a run still going after this long; its CPU seconds become a lower bound")
    p.add_argument("--collect", action="store_true",
                   help="write the results of runs this script started in --out-dir whose invocation was stopped "
                        "(each run's own training CPU seconds; the whole-process CPU seconds are then unknown)")
    a = p.parse_args()
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = [f"--{k.replace('_', '-')}={v}" for k, v in (("train_limit", a.train_limit), ("eval_limit", a.eval_limit))
             if v is not None]
    loads: list[float] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample_load, args=(stop, loads), daemon=True)
    load_start = os.getloadavg()
    sampler.start()
    if a.collect:
        runs = {name: {"finished": (out_dir / name / "metrics.json").is_file(), "wall_seconds": None,
                       "cpu_seconds": None, "metrics": json.loads(wait_for(out_dir / name / "metrics.json",
                                                                            3600.0).read_text())}
                for name in RECIPES}
    else:
        runs = run_both(out_dir, a.threads, extra, a.deadline_s)
    stop.set()
    keys = ("imdb_test_accuracy", "imdb_val_accuracy", "train_seconds", "train_cpu_seconds",
            "amazon_zero_shot_accuracy", "amazon_zero_shot_mean", "rt_polarity_zero_shot_accuracy",
            "uci_sentences_zero_shot_accuracy", "uci_sentences_zero_shot_by_group", "parameters", "history", "config")
    result: dict[str, Any] = {
        name: {"finished": r["finished"], "wall_seconds": r["wall_seconds"], "cpu_seconds": r["cpu_seconds"],
               "epochs_run": len(r["metrics"].get("history", [])), **{k: r["metrics"].get(k) for k in keys},
               "checkpoint": str(out_dir / name)}
        for name, r in runs.items()
    }
    old, new = result["previous"], result["short_text"]
    if not new["finished"]:
        raise SystemExit("the short-text recipe did not finish before --deadline-s; nothing to compare")
    # training = data, tokenizer, epochs and early-stopping validation; not the final test and zero-shot evaluations
    result["speedup"] = {"is_lower_bound": not old["finished"]}
    if old["finished"]:
        result["speedup"] |= {"train_cpu_seconds": old["train_cpu_seconds"] / new["train_cpu_seconds"],
                              "train_wall_seconds": old["train_seconds"] / new["train_seconds"]}
    if old["cpu_seconds"] is not None:  # whole processes, evaluations included
        result["speedup"] |= {"cpu_seconds": old["cpu_seconds"] / new["cpu_seconds"],
                              "wall_seconds": old["wall_seconds"] / new["wall_seconds"]}
    result["scale"] = {"train_limit": a.train_limit, "eval_limit": a.eval_limit}
    accuracy_of = new  # the full-scale run's accuracies where there is one
    if a.full_new:
        full = json.loads(wait_for(Path(a.full_new) / "metrics.json", 3600.0).read_text())
        accuracy_of = result["short_text_full_scale"] = {k: full.get(k) for k in keys} | {
            "checkpoint": a.full_new, "epochs_run": len(full["history"])}
    speed = result["speedup"].get("train_cpu_seconds", result["speedup"].get("cpu_seconds", 0.0))
    result["targets"] = TARGETS
    result["meets_targets"] = {
        "speedup_train_cpu": speed >= TARGETS["speedup"],
        **{k: (accuracy_of[k] or 0) >= v for k, v in TARGETS.items() if k != "speedup"},
    }
    result["load_average"] = {"at_start_1_5_15min": load_start, "at_end_1_5_15min": os.getloadavg(),
                              "sampled_1min_mean": sum(loads) / max(len(loads), 1),
                              "sampled_1min_max": max(loads, default=0.0), "samples": len(loads)}
    result["machine"] = {"cpus": os.cpu_count(), "torch_threads_per_run": a.threads,
                         "python": platform.python_version(), "torch": torch.__version__,
                         "note": "2-core machine shared with other jobs; both runs concurrent, same threads"}
    result["command"] = "FEDRNN_DATA_DIR=../shared/data python benchmarks/bench_pretrain.py " + " ".join(sys.argv[1:])
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("previous", "short_text", "short_text_full_scale")},
                     indent=2))
    for name in ("previous", "short_text"):
        r = result[name]
        print(f"{name}: finished {r['finished']} imdb {r['imdb_test_accuracy']} "
              f"rt {r['rt_polarity_zero_shot_accuracy']} uci {r['uci_sentences_zero_shot_accuracy']} "
              f"training cpu {r['train_cpu_seconds']:.0f}s wall {r['train_seconds']:.0f}s")


if __name__ == "__main__":
    main()
