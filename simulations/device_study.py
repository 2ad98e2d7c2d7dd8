"""Device study: simulated time to a target accuracy under each straggler policy and device fleet.

    FEDRNN_DATA_DIR=../shared/data OMP_NUM_THREADS=1 python simulations/device_study.py [--rounds 8]

Fleets (100 clients, 10 per round, fine-tuning the IMDB teacher on Amazon reviews):
  rpi     ``configs/rpi-fleet.toml``'s mix: 20% Zero 2 W, 30% Pi 3B+, 30% Pi 4, 20% Pi 5, Wi-Fi, always on
  phones  50% Helio G85 / 50% Exynos 1380 phones, 70% on 4G and 30% on 3G, online at night
          (22:00-07:00 local, phases +-3 h); the clock starts at 21:00 UTC, so early rounds only
          reach the phones whose night has begun
  trace   ``configs/fleets/example_trace.csv`` (10 clients, 5 per round, with 10% of the pool so a
          client holds as many reviews as in the 100-client fleets)
Policies: ``drop`` and ``partial`` with a per-fleet deadline (about the time of the median
device, so a real share of the clients straggles), and ``wait``.

The host throughput is measured once (fine-tune, batch 16, the pool's mean review length) and
given to every run, so all runs share one clock. Time to target = simulated hours until the
global model's target-test accuracy first reaches the teacher's zero-shot accuracy on the same
test subset plus ``--gain`` (default 2 points).

Writes ``simulations/results/device_study.csv`` (one row per run), ``device_study_rounds.csv``
(one row per round), ``device_study.png`` and ``device_study.md`` (the table, also printed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedrnn.config import dump_toml  # noqa: E402
from fedrnn.data.target import load_target, prepare_target  # noqa: E402
from fedrnn.devices import measure_host_throughput  # noqa: E402
from fedrnn.federation.local import build_model, load_base  # noqa: E402
from fedrnn.federation.prepare import cache_dir  # noqa: E402
from fedrnn.federation.rundir import RunDir  # noqa: E402
from fedrnn.io import write_csv  # noqa: E402
from fedrnn.model.checkpoint import load_checkpoint  # noqa: E402
from fedrnn.runs.plots import plt  # noqa: E402  (Agg backend already chosen)

RESULTS = ROOT / "simulations" / "results"
POLICIES = ("drop", "partial", "wait")
FLEETS = {
    "rpi": {"mix": {"rpi-zero2w": 0.2, "rpi3b+": 0.3, "rpi4": 0.3, "rpi5": 0.2}, "network": "wifi",
            "availability": "always", "deadline_s": 4.0},
    "phones": {"mix": {"phone-low": 0.5, "phone-mid": 0.5}, "network_mix": {"4g": 0.7, "3g": 0.3},
               "availability": "diurnal", "start_hour": 21.0, "deadline_s": 4.0},
    "trace": {"trace": str(ROOT / "configs" / "fleets" / "example_trace.csv"), "deadline_s": 4.0},
}
RUN_OVERRIDES = {"trace": {"clients": 10, "clients_per_round": 5, "data_fraction": 0.1}}


def host_throughput(teacher: str, retention: int) -> tuple[float, int]:
    """Fine-tune samples/s of the teacher on this host at the pool's mean review length (one thread)."""
    _, tok, meta = load_checkpoint(teacher)
    target = prepare_target("amazon", tok, int(meta["max_len"]), retention, cache_dir() / "target",
                            os.environ.get("FEDRNN_DATA_DIR"))
    seq_len = max(1, round(float(np.mean(load_target(str(target)).pool.lengths))))
    torch.set_num_threads(1)
    model = build_model(load_base(teacher), {}, "fine-tune")
    return measure_host_throughput(model, 16, seq_len, steps=8), seq_len


def config_for(fleet: str, policy: str, a: argparse.Namespace, host_sps: float) -> dict:
    devices = {k: v for k, v in FLEETS[fleet].items() if k != "deadline_s"}
    devices |= {"enabled": True, "policy": policy, "host_samples_per_s": host_sps, "class_eval_examples": 100}
    if policy != "wait":
        devices["deadline_s"] = FLEETS[fleet]["deadline_s"]
    run = {"clients": 100, "rounds": a.rounds, "clients_per_round": 10, "target": "amazon", "alpha": 1.0,
           "mode": "fine-tune", "strategy": "fedavg", "seed": a.seed, "teacher": a.teacher}
    return {
        "run": run | RUN_OVERRIDES.get(fleet, {}),
        "client": {"local_epochs": 1, "batch_size": 16, "lr": a.lr},
        "server": {"target_test_examples": a.test_examples, "retention_examples": a.retention,
                   "fraction_evaluate": 0.0},
        "simulation": {"actors": 2, "threads_per_actor": 1},
        "devices": devices,
    }


def run(name: str, cfg: dict, work: Path) -> list[dict]:
    """One simulation (skipped if already finished); its metrics rows."""
    out = work / name
    if not (out / "summary.json").is_file():
        work.mkdir(parents=True, exist_ok=True)
        (work / f"{name}.toml").write_text(dump_toml(cfg))
        args = ["--resume", str(out)] if (out / "state.json").is_file() else [  # no round done: start over
            "--config", str(work / f"{name}.toml"), "--out", str(out), "--overwrite"]
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "fedrnn.simulate", *args], cwd=ROOT, capture_output=True,
                           text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if r.returncode != 0:
            raise SystemExit(f"{name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        print(f"{name}: {time.perf_counter() - t0:.0f} s wall", flush=True)
    return RunDir(out).read_metrics()


def time_to_target(rows: list[dict], target: float) -> tuple[float | None, int | None]:
    """(simulated hours, round) when accuracy first reaches ``target``; accuracies are float32 fractions of
    the test set, so a tolerance keeps e.g. 305/400 from missing a 0.7625 target by 2e-8."""
    for r in rows[1:]:
        if r.get("target_accuracy") is not None and r["target_accuracy"] >= target - 1e-6:
            return r["sim_time_h"], r["round"]
    return None, None


def summarize(fleet: str, policy: str, rows: list[dict], gain: float) -> dict:
    zero_shot = rows[0]["target_accuracy"]
    hours, rnd = time_to_target(rows, zero_shot + gain)
    trained = rows[1:]
    selected = sum(len(r["selected"]) for r in trained)
    classes = sorted({k.split("/", 1)[1] for r in trained for k in r if k.startswith("class_accuracy/")})
    return {
        "fleet": fleet, "policy": policy, "deadline_s": FLEETS[fleet]["deadline_s"] if policy != "wait" else None,
        "zero_shot": zero_shot, "target": zero_shot + gain, "time_to_target_h": hours, "round_reached": rnd,
        "final_accuracy": trained[-1]["target_accuracy"], "sim_hours": trained[-1]["sim_time_h"],
        "mean_round_s": float(np.mean([r["round_sim_seconds"] + r["idle_sim_seconds"] for r in trained])),
        "participation": sum(r["trained"] for r in trained) / max(selected, 1),
        "stragglers": sum(r["stragglers"] for r in trained), "late": sum(r["late"] for r in trained),
        "partial": sum(r["partial"] for r in trained), "dropouts": sum(r["dropouts"] for r in trained),
        "memory_adapted": sum(len(r["memory_adapted"]) for r in trained),
        "bytes_up_mb": sum(r["bytes_up"] for r in trained) / 1e6,
    } | dict(zip(("worst_class_accuracy", "worst_class"),
                 min((trained[-1][f"class_accuracy/{c}"], c) for c in classes) if classes else (None, None),
                 strict=True))


def plot(curves: dict[tuple[str, str], list[dict]], summaries: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, len(FLEETS), figsize=(5.0 * len(FLEETS), 3.8))
    for ax, fleet in zip(axes, FLEETS, strict=True):
        for policy in POLICIES:
            rows = curves[(fleet, policy)]
            xs = [0.0] + [r["sim_time_h"] * 60 for r in rows[1:]]
            ax.plot(xs, [r["target_accuracy"] for r in rows], marker="o", markersize=3, label=policy)
        target = next(s["target"] for s in summaries if s["fleet"] == fleet)
        ax.axhline(target, color="grey", ls="--", lw=1, label="target (zero-shot + gain)")
        ax.set_title(f"{fleet} fleet")
        ax.set_xlabel("simulated wall-clock minutes")
        ax.set_ylabel("Amazon target accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(x: float | None, spec: str) -> str:
    return "not reached" if x is None else format(x, spec)


def table(summaries: list[dict]) -> str:
    lines = ["| fleet | policy | deadline s | time to target (sim min) | round | final acc | mean round (sim s) "
             "| participation | stragglers (late/partial) | dropouts | worst class final |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        ttt = None if s["time_to_target_h"] is None else s["time_to_target_h"] * 60
        worst = f"{s['worst_class']} {s['worst_class_accuracy']:.3f}" if s["worst_class"] else "-"
        lines.append(
            f"| {s['fleet']} | {s['policy']} | {s['deadline_s'] or '-'} | {fmt(ttt, '.2f')} | "
            f"{s['round_reached'] or '-'} | {s['final_accuracy']:.3f} | {s['mean_round_s']:.1f} | "
            f"{s['participation']:.2f} | {s['stragglers']} ({s['late']}/{s['partial']}) | {s['dropouts']} | {worst} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_teacher = ROOT / "cache" / "teacher"
    if not (default_teacher / "model.safetensors").is_file():
        default_teacher = ROOT / "cache" / "teacher-first"
    p.add_argument("--teacher", default=str(default_teacher))
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gain", type=float, default=0.02, help="target = zero-shot accuracy + gain")
    p.add_argument("--test-examples", type=int, default=400)
    p.add_argument("--retention", type=int, default=500)
    p.add_argument("--host-samples-per-s", type=float, default=0.0, help="0 = measure once now")
    p.add_argument("--work", default=str(ROOT / "runs" / "device_study"))
    p.add_argument("--fleets", default=",".join(FLEETS))
    a = p.parse_args()
    a.teacher = str(Path(a.teacher).resolve())
    host_sps, seq_len = (a.host_samples_per_s, None) if a.host_samples_per_s else host_throughput(a.teacher,
                                                                                                   a.retention)
    print(f"host throughput: {host_sps:.1f} samples/s (fine-tune, batch 16, {seq_len} tokens)", flush=True)
    curves, summaries = {}, []
    fleets = a.fleets.split(",")
    for fleet in fleets:
        for policy in POLICIES:
            rows = run(f"{fleet}-{policy}", config_for(fleet, policy, a, host_sps), Path(a.work))
            curves[(fleet, policy)] = rows
            summaries.append(summarize(fleet, policy, rows, a.gain) | {"host_samples_per_s": host_sps})
    write_csv(RESULTS / "device_study.csv", summaries)
    keys = ("round", "sim_time_h", "round_sim_seconds", "idle_sim_seconds", "target_accuracy", "trained",
            "stragglers", "dropouts", "bytes_up")
    per_round = [
        {"fleet": fleet, "policy": policy, **{k: r.get(k, 0.0 if k == "sim_time_h" else None) for k in keys},
         "class_accuracy": json.dumps({k.split("/", 1)[1]: round(v, 4) for k, v in r.items()
                                       if k.startswith("class_accuracy/")})}
        for (fleet, policy), rows in curves.items() for r in rows
    ]
    write_csv(RESULTS / "device_study_rounds.csv", per_round)
    if set(fleets) == set(FLEETS):
        plot(curves, summaries, RESULTS / "device_study.png")
    md = table(summaries)
    gain_note = (f"Target = zero-shot accuracy on the {a.test_examples}-review test subset + {a.gain * 100:g} points; "
                 f"host throughput {host_sps:.1f} samples/s; {a.rounds} rounds; teacher {a.teacher}.")
    (RESULTS / "device_study.md").write_text(md + "\n\n" + gain_note + "\n")
    print(md)
    print(gain_note)
    if any(math.isnan(s["final_accuracy"]) for s in summaries):
        raise SystemExit("a run ended without a final accuracy")


if __name__ == "__main__":
    main()
