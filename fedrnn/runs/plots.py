"""PNG plots of a run's ``metrics.jsonl`` (accuracy and loss against round, or another x such as simulated hours)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)

ACCURACY_SERIES = {
    "target_accuracy": "target test",
    "retention_accuracy": "IMDB retention",
    "fed_eval_accuracy_mean": "clients' held-out (mean)",
    "fed_eval_accuracy_p10": "clients' held-out (10th pct)",
}
LOSS_SERIES = {"target_loss": "target test", "train_loss": "client training", "retention_loss": "IMDB retention"}


def _series(rows: list[dict[str, Any]], key: str, x_key: str) -> tuple[list[float], list[float]]:
    pts = [(r[x_key], r[key]) for r in rows if r.get(key) is not None and r.get(x_key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(
    rows: list[dict[str, Any]],
    out_dir: str | Path,
    x_key: str = "round",
    x_label: str = "round",
    suffix: str = "",
    kinds: tuple[str, ...] = ("accuracy", "loss"),
) -> list[Path]:
    """``accuracy{suffix}.png`` and/or ``loss{suffix}.png`` against ``x_key`` (rows without it are skipped).

    Device-fleet runs also get one accuracy line per device class (``class_accuracy/<class>``).
    """
    out = Path(out_dir)
    written = []
    classes = sorted({k for r in rows for k in r if k.startswith("class_accuracy/")})
    accuracy = ACCURACY_SERIES | {k: f"class {k.split('/', 1)[1]} users" for k in classes}
    for name, series, ylabel in (("accuracy", accuracy, "accuracy"), ("loss", LOSS_SERIES, "cross-entropy")):
        if name not in kinds:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for key, label in series.items():
            xs, ys = _series(rows, key, x_key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=label)
        ax.set_xlabel(x_label)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / f"{name}{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_run_dir(rows: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """A run's plots: accuracy and loss against round, and for a device-fleet run accuracy against simulated hours."""
    written = plot_run(rows, out_dir)
    if any("sim_time_h" in r for r in rows):
        timed = [r if r["round"] else {**r, "sim_time_h": 0.0} for r in rows]
        written += plot_run(timed, out_dir, "sim_time_h", "simulated wall-clock hours", suffix="_vs_sim_hours",
                            kinds=("accuracy",))
    return written
