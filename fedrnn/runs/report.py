"""Compare runs: ``python -m fedrnn.report RUN_DIR [RUN_DIR ...] [--out PREFIX]``.

Prints one table row per run (its config's main knobs, rounds done, final and best target
accuracy, retention, clients' held-out accuracy, traffic, failures, wall time), writes the same
table to ``PREFIX.csv`` and a plot overlaying the runs' target accuracy against round to
``PREFIX.png`` (default prefix: ``report``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from fedrnn.federation.rundir import RunDir  # noqa: E402
from fedrnn.io import write_csv  # noqa: E402
from fedrnn.model.checkpoint import read_json  # noqa: E402
from fedrnn.runs.console import accuracy, duration  # noqa: E402

COLUMNS = ("run", "strategy", "mode", "clients", "rounds", "final target", "best target", "retention",
           "clients' acc", "MB up", "failed", "wall")


def load_run(path: str | Path) -> tuple[RunDir, dict[str, Any], list[dict[str, Any]]]:
    """(run dir, its config, its metric rows); a directory without a run is an error naming it."""
    rd = RunDir(path)
    if not (rd.path / "config.json").is_file() or not rd.metrics_path.is_file():
        raise FileNotFoundError(f"{rd.path}: not a fedrnn run directory (no config.json and metrics.jsonl)")
    return rd, rd.config(), rd.read_metrics()


def summary_row(rd: RunDir, cfg: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, str]:
    """One table row (strings) for a run."""
    evaluated = [r for r in rows if r.get("target_accuracy") is not None]
    last = evaluated[-1] if evaluated else {}
    best = max((r["target_accuracy"] for r in evaluated), default=None)
    summary = read_json(rd.path / "summary.json") if (rd.path / "summary.json").is_file() else {}
    wall = summary.get("wall_seconds")
    done = max((r["round"] for r in rows), default=0)
    return dict(zip(COLUMNS, (
        rd.path.name, cfg["run"]["strategy"], cfg["run"]["mode"], str(cfg["run"]["clients"]),
        f"{done}/{cfg['run']['rounds']}", accuracy(last.get("target_accuracy")), accuracy(best),
        accuracy(last.get("retention_accuracy")), accuracy(last.get("fed_eval_accuracy_mean")),
        f"{sum(r.get('bytes_up', 0) for r in rows) / 1e6:.1f}", str(sum(r.get("failures", 0) for r in rows)),
        duration(wall) if isinstance(wall, (int, float)) else "-",
    ), strict=True))


def plot_runs(runs: list[tuple[RunDir, list[dict[str, Any]]]], out: Path) -> Path:
    """Target accuracy against round, one line per run."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for rd, rows in runs:
        pts = [(r["round"], r["target_accuracy"]) for r in rows if r.get("target_accuracy") is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=rd.path.name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("target test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> Table:
    p = argparse.ArgumentParser(prog="python -m fedrnn.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (from fedrnn.simulate or flwr run)")
    p.add_argument("--out", default="report", help="write PREFIX.csv (the table) and PREFIX.png (the plot); "
                                                    "default: %(default)s")
    a = p.parse_args(argv)
    try:
        loaded = [load_run(path) for path in a.runs]
    except FileNotFoundError as e:
        p.error(str(e))
    table = Table(title="fedrnn runs")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("run", "strategy", "mode") else "right")
    rows = [summary_row(rd, cfg, metrics) for rd, cfg, metrics in loaded]
    for row in rows:
        table.add_row(*row.values())
    console = Console()
    console.print(table)
    write_csv(f"{a.out}.csv", rows)
    plot = plot_runs([(rd, metrics) for rd, _, metrics in loaded], Path(f"{a.out}.png"))
    console.print(f"table: {a.out}.csv  plot: {plot}", highlight=False)
    return table
