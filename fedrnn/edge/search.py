"""Device-aware student search: ``python -m fedrnn.edge.search --device-class rpi-zero-2w`` (or ``--all``).

For each device class, the student (cell, embedding and hidden sizes, layers, vocabulary size,
max length, hidden-unit pruning ratio, int8 or float) with the best Amazon accuracy under the
class's budgets (:mod:`fedrnn.edge.budgets`: p95 batch-1 latency, inference RAM, download, and
the model file's bytes when ``--max-model-bytes`` caps them).

How:

* **One study for all classes.** Accuracy, host latency and bytes of a student do not depend
  on the device; only the budgets do. So one Optuna study (multi-objective TPE: maximise
  validation accuracy, minimise host p95 latency and model bytes) samples students, with the
  constraint "within the budgets of at least one requested class" (``Trial.set_constraint``),
  and each class then reads the trials feasible for it.
* **Seeding.** ``--enqueue JSON`` (repeatable) makes the study try given students first, e.g.
  ones found in earlier runs (Optuna's ``enqueue_trial``); they count among ``--trials``.
* **Two fidelities.** Sampled trials are *low fidelity*: a short distillation
  (``--low-steps``). Up to ``--max-promote`` of them are *promoted*: re-run from scratch with
  the full distillation (``--full-steps``) and added to the study as full-fidelity trials; first
  each class's low-fidelity choice (rule below), then each class's feasible trials from the most
  accurate down, in turns (a short distillation ranks students only roughly). Only full-fidelity
  trials are chosen.
* **A trial** shrinks the teacher's tokenizer to the sampled vocabulary
  (:func:`fedrnn.edge.prune.shrink_tokenizer`, frequencies from the transfer and Amazon train
  texts), distils a fresh student from cached teacher logits on unlabelled IMDB reviews (its
  embedding starts as the teacher's rows for the kept tokens, PCA-projected to its width); with
  a pruning ratio it distils two thirds of the steps at the sampled width, prunes hidden units
  (:func:`fedrnn.edge.prune.prune_hidden`) and fine-tunes the rest. It is then exported
  (``fedrnn.edge.export.export_student``: float + int8 ONNX, parity checked) and measured, as
  float32 and as int8 (two rows per trial, so a class can get either from one distillation), on
  the deployed file: validation accuracy on held-out Amazon *train* reviews (the test split is
  used only to report the chosen students), p95 batch-1 onnxruntime latency on one thread
  over validation reviews (thread CPU time, the lower of two passes: the machine may be shared), bytes, and the
  inference-memory estimate.
* **Choice rule** (``--rule one-se``, default): among feasible trials, the smallest model whose
  validation accuracy is within one standard error of the best (Breiman et al.'s one-SE rule:
  differences inside the validation noise do not justify more bytes). ``--rule max``: the most
  accurate.

Writes per class an export directory ``EXPORT_ROOT/<class>/`` (as ``fedrnn.edge.export``
writes it) and, under ``--out``, ``pareto_<class>.png`` (accuracy vs device latency, model
bytes as colour), ``trials.csv``, ``table.csv`` / ``table.md`` (one row per class) and
``summary.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
import torch

from fedrnn.devices.profiles import PROFILES
from fedrnn.edge.budgets import Budget, BudgetError, budget_for, resolve_class
from fedrnn.edge.predict import Predictor
from fedrnn.edge.trials import (
    Fidelity,
    SearchData,
    Space,
    load_search_data,
    params_key,
    run_trial,
    teacher_accuracy,
)

RULES = ("one-se", "max")


def violation(budget: Budget, row: dict[str, Any]) -> float:
    """How far over its worst budget a trial is for ``budget``'s class (<= 0: feasible)."""
    return max(budget.violations(row["host_p95_ms"], row["ram_bytes"], row["download_bytes"],
                                 row["model_bytes"]).values())


def feasible(budget: Budget, row: dict[str, Any]) -> bool:
    return violation(budget, row) <= 0


def choose(rows: list[dict[str, Any]], budget: Budget, rule: str, n_val: int) -> dict[str, Any] | None:
    """The trial a class gets under ``rule`` (see module docstring), or None if none is feasible."""
    ok = [r for r in rows if feasible(budget, r)]
    if not ok:
        return None
    best = max(ok, key=lambda r: (r["val_accuracy"], -r["model_bytes"]))
    if rule == "max":
        return best
    se = math.sqrt(best["val_accuracy"] * (1 - best["val_accuracy"]) / n_val)
    close = [r for r in ok if r["val_accuracy"] >= best["val_accuracy"] - se]
    return min(close, key=lambda r: (r["model_bytes"], -r["val_accuracy"]))


def promotions(low: list[dict[str, Any]], budgets: Sequence[Budget], rule: str, n_val: int,
               limit: int) -> list[dict[str, Any]]:
    """The low-fidelity students to re-run at full fidelity, at most ``limit``: each class's choice
    under ``rule`` first, then each class's feasible trials from the most accurate down, in turns.

    A short distillation ranks students only roughly (small vocabularies learn fastest), so a
    class is given several of its best rather than only its best.
    """
    ranked = [sorted((r for r in low if feasible(b, r)), key=lambda r: (-r["val_accuracy"], r["model_bytes"]))
              for b in budgets]
    order = [choose(low, b, rule, n_val) for b in budgets]
    order += [rows[i] for i in range(max(map(len, ranked), default=0)) for rows in ranked if i < len(rows)]
    out: dict[str, dict[str, Any]] = {}
    for r in order:
        if r is not None and len(out) < limit:
            params = {name: r[name] for name in Space.__annotations__}
            out.setdefault(params_key(params), params)
    return list(out.values())


def search(
    data: SearchData, budgets: Sequence[Budget], *, trials: int, space: Space, fid: Fidelity, workdir: Path,
    rule: str = "one-se", seed: int = 0, timeout_s: float | None = None, max_promote: int = 6, log: Any = print,
    enqueue: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """Run the two-fidelity study; returns all trial rows and each class's chosen full-fidelity row.

    ``enqueue``: students (all of the space's keys) to try first, counted in ``trials`` (Optuna's
    ``enqueue_trial``: seeding a study with configurations known from earlier work).
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if not budgets:
        raise ValueError("no device class to search for")
    rows: list[dict[str, Any]] = []

    def record(params: dict[str, Any], fidelity: str, steps: int) -> dict[str, Any]:
        """Run a trial; both of its variants (int8 and float32) become rows; returns the int8 one."""
        n = len({r["trial"] for r in rows})
        variants = run_trial(data, params, steps, fid, workdir / f"trial-{n:03d}-{fidelity}", seed + n)
        for int8, metrics in variants.items():
            row = {"trial": n, "fidelity": fidelity, **params, "int8": int8, **metrics}
            row["violation"] = min(violation(b, row) for b in budgets)
            rows.append(row)
            log(f"trial {n} ({fidelity}, {'int8' if int8 else 'float'}): {params} -> val acc "
                f"{row['val_accuracy']:.4f}, host p95 {row['host_p95_ms']:.3f} ms, {row['model_bytes']:,} B, "
                f"{row['seconds']:.0f} s")
        return rows[-2]

    def objective(trial: optuna.Trial) -> tuple[float, float, float]:
        params = {name: trial.suggest_categorical(name, list(getattr(space, name))) for name in Space.__annotations__}
        row = record(params, "low", fid.low_steps)  # Optuna sees the int8 variant, a quarter of the bytes
        trial.set_constraint("budget_violation", row["violation"])
        return row["val_accuracy"], row["host_p95_ms"], float(row["model_bytes"])

    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=min(8, trials))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"], sampler=sampler)
    for params in enqueue:
        study.enqueue_trial(params)
    study.optimize(objective, n_trials=trials, timeout=timeout_s)

    n_val = len(data.val_texts)
    low = [r for r in rows if r["fidelity"] == "low"]
    for params in promotions(low, budgets, rule, n_val, max_promote):
        record(params, "full", fid.full_steps)
    full = [r for r in rows if r["fidelity"] == "full"]
    return {"rows": rows, "chosen": {b.device_class: choose(full, b, rule, n_val) for b in budgets}}


# ------------------------------------------------------------------------------------------- CLI


def pareto_plot(rows: list[dict[str, Any]], budget: Budget, chosen: dict[str, Any] | None, path: Path) -> None:
    """Accuracy vs the class's device latency, model bytes as colour; infeasible trials hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=90)
    sizes = [r["model_bytes"] for r in rows]
    norm = LogNorm(vmin=min(sizes), vmax=max(max(sizes), min(sizes) * 1.01))
    cmap = plt.get_cmap("viridis")
    for r in rows:
        x, y, c = budget.device_latency_ms(r["host_p95_ms"]), 100 * r["val_accuracy"], cmap(norm(r["model_bytes"]))
        ok = feasible(budget, r)
        ax.scatter(x, y, s=60 if r["fidelity"] == "full" else 25, marker="D" if r["fidelity"] == "full" else "o",
                   facecolors=c if ok else "none", edgecolors=c, linewidths=1.2)
    if chosen is not None:
        ax.scatter(budget.device_latency_ms(chosen["host_p95_ms"]), 100 * chosen["val_accuracy"], s=260,
                   marker="*", facecolors="none", edgecolors="red", linewidths=1.5, label="chosen")
        ax.legend(loc="lower right")
    ax.axvline(budget.latency_p95_ms, color="grey", linestyle="--")
    ax.set_xscale("log")
    ax.set_xlabel(f"p95 batch-1 latency on {budget.device_class} (ms, host x {1 / budget.relative_speed:.1f})")
    ax.set_ylabel("Amazon validation accuracy (%)")
    ax.set_title(f"{budget.device_class}: dots low, diamonds full fidelity; hollow = over a budget", fontsize=9)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="model file bytes")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--device-class", action="append", help=f"a class of {list(PROFILES)} (repeatable)")
    which.add_argument("--all", action="store_true", help="every device class")
    p.add_argument("--teacher", default=None, help="teacher checkpoint (default: $FEDRNN_CACHE_DIR/teacher)")
    p.add_argument("--data-dir", default=None)
    # the defaults fit all classes in about 30 minutes on 2 cores (low trials take 1-2 min, full ones about 5)
    p.add_argument("--trials", type=int, default=12, help="low-fidelity trials sampled by Optuna")
    p.add_argument("--timeout-s", type=float, default=720.0,
                   help="stop sampling low-fidelity trials after this many seconds")
    p.add_argument("--max-promote", type=int, default=3, help="low-fidelity trials re-run at full fidelity")
    p.add_argument("--low-steps", type=int, default=Fidelity.low_steps)
    p.add_argument("--full-steps", type=int, default=Fidelity.full_steps)
    p.add_argument("--cosine", action="store_true", help="decay each distillation's learning rate (cosine)")
    p.add_argument("--transfer-size", type=int, default=8000, help="unlabelled IMDB reviews to distil on")
    p.add_argument("--val-size", type=int, default=1000, help="Amazon train reviews to choose students on")
    p.add_argument("--rule", choices=RULES, default="one-se")
    p.add_argument("--enqueue", action="append", default=[], type=json.loads, metavar="JSON",
                   help="a student to try first, as a JSON object of every space key (repeatable)")
    p.add_argument("--max-model-bytes", type=int, default=None,
                   help="also cap the model file at this many bytes for every class (default: no cap)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="simulations/results/student_search")
    p.add_argument("--export-root", default="runs/student_search", help="per-class export dirs (git-ignored)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    try:
        classes = list(PROFILES) if a.all else list(dict.fromkeys(resolve_class(c) for c in a.device_class))
    except BudgetError as e:
        raise SystemExit(f"error: {e}") from e
    for name in ("trials", "low_steps", "full_steps", "transfer_size", "val_size", "max_promote", "max_model_bytes"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    for params in a.enqueue:
        bad = {k for k in Space.__annotations__ if params.get(k) not in getattr(Space(), k)} | (
            set(params) - set(Space.__annotations__))
        if bad:
            raise SystemExit(f"error: --enqueue {json.dumps(params)}: {', '.join(sorted(bad))} missing or outside "
                             f"the space {asdict(Space())}")
    cache = Path(os.environ.get("FEDRNN_CACHE_DIR", "cache"))
    teacher_dir = Path(a.teacher) if a.teacher else cache / "teacher"
    if not (teacher_dir / "model.safetensors").is_file():
        raise SystemExit(f"error: no teacher checkpoint in {teacher_dir} (run python -m fedrnn.model.pretrain)")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    export_root = Path(a.export_root)
    data = load_search_data(teacher_dir, a.data_dir, a.transfer_size, a.val_size, a.seed, Path("cache") / "edge")
    t_data = time.perf_counter() - t0
    budgets = [budget_for(PROFILES[c], a.max_model_bytes) for c in classes]
    fid = Fidelity(low_steps=a.low_steps, full_steps=a.full_steps, cosine=a.cosine)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.0f} s] {msg}", flush=True)

    result = search(data, budgets, trials=a.trials, space=Space(), fid=fid, workdir=export_root / "trials",
                    rule=a.rule, seed=a.seed, timeout_s=a.timeout_s, max_promote=a.max_promote, log=log,
                    enqueue=a.enqueue)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher_test = teacher_accuracy(data, data.test_texts, data.test_labels, data.teacher_max_len)
    table = []
    for b in budgets:
        row = result["chosen"][b.device_class]
        pareto_plot(result["rows"], b, row, out / f"pareto_{b.device_class}.png")
        entry: dict[str, Any] = {"device_class": b.device_class, "budget": b.to_dict(), "chosen": None}
        if row is not None:
            dest = export_root / b.device_class
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(row["export_dir"], dest)
            pred = Predictor(dest, quantized=row["int8"]).predict_proba(data.test_texts).argmax(1)
            entry["chosen"] = {k: v for k, v in row.items() if k != "export_dir"} | {
                "export_dir": str(dest), "device_p95_ms": b.device_latency_ms(row["host_p95_ms"]),
                "test_accuracy": float((pred == data.test_labels).mean()),
            }
            entry["chosen"]["gap_points"] = 100 * (teacher_test - entry["chosen"]["test_accuracy"])
        table.append(entry)
    summary = {
        "command": " ".join(["python -m fedrnn.edge.search", *(sys.argv[1:] if argv is None else argv)]),
        "teacher": str(teacher_dir), "teacher_test_accuracy": teacher_test,
        "test_examples": len(data.test_texts), "val_examples": len(data.val_texts),
        "fidelity": asdict(fid), "rule": a.rule, "trials_low": a.trials, "max_promote": a.max_promote,
        "enqueued": a.enqueue, "max_model_bytes": a.max_model_bytes,
        "transfer_size": a.transfer_size, "space": asdict(Space()),
        "seconds": {"data": t_data, "total": time.perf_counter() - t0},
        "loadavg_end": os.getloadavg(), "cpus": os.cpu_count(),
        "classes": table,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    write_tables(result["rows"], table, teacher_test, out)
    log(f"wrote {out} ({len(result['rows'])} trials, {summary['seconds']['total']:.0f} s)")
    return summary


TABLE_COLUMNS = ("device_class", "cell", "embed_dim", "final_hidden", "num_layers", "vocab_size", "max_len",
                 "prune_ratio", "int8", "model_bytes", "download_bytes", "ram_bytes", "device_p95_ms",
                 "val_accuracy", "test_accuracy", "gap_points")


def write_tables(rows: list[dict[str, Any]], table: list[dict[str, Any]], teacher_test: float, out: Path) -> None:
    with (out / "trials.csv").open("w", newline="") as f:
        fields = [k for k in rows[0] if k != "export_dir"]
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = [
        f"Teacher Amazon test accuracy {100 * teacher_test:.2f} %.",
        "",
        "| " + " | ".join(TABLE_COLUMNS) + " |",
        "|" + "---|" * len(TABLE_COLUMNS),
    ]
    with (out / "table.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(TABLE_COLUMNS)
        for entry in table:
            c = entry["chosen"] or {}
            cells = [entry["device_class"], *(c.get(k, "none feasible") for k in TABLE_COLUMNS[1:])]
            w.writerow(cells)
            lines.append("| " + " | ".join(_fmt(x) for x in cells) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    return str(x)


if __name__ == "__main__":
    main()
