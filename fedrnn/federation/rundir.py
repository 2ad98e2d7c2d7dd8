"""A run's directory: resolved config, per-round metrics, checkpoints, resumable state, plots.

Layout of ``runs/NAME/``::

    config.json          resolved configuration (what --resume reuses)
    metrics.jsonl        one JSON object per completed round
    summary.json         final metrics and totals
    checkpoints/round_NNN.safetensors   full global model after each round
    state.json + state.safetensors      what resuming needs (round, clocks, strategy moments, ...)
    partitions.npz       the clients' shards (indices into the target pool)
    accuracy.png, loss.png
    student/, client_state/             the distilled student; int8 error-feedback residuals

Writes are atomic (temp file + rename) and ``state.json`` is written last, so a kill -9 at
any point leaves the previous round's state intact; metric lines past that round are
dropped on resume.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedrnn.io import write_json
from fedrnn.model.checkpoint import load_tensors, read_json, save_tensors

# Everything a run writes into its directory (a new kind of run file belongs here, so --overwrite clears it).
RUN_FILES = ("config.json", "metrics.jsonl", "metrics.jsonl.tmp", "metrics.csv", "clients.jsonl", "summary.json",
             "state.json", "state.safetensors", "partitions.npz")
RUN_SUBDIRS = ("checkpoints", "student", "client_state")
RUN_PLOTS = ("accuracy*.png", "loss*.png")


class RunDir:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"

    def create(self, config: dict[str, Any]) -> None:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        write_json(self.path / "config.json", config)

    def holds_run(self) -> list[str]:
        """The files that show a run was started here (empty if none): a new run must not mix with it."""
        return [name for name in ("config.json", "metrics.jsonl") if (self.path / name).is_file()]

    def clear(self) -> None:
        """Delete a previous run's files (only those; anything else in the directory stays)."""
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        for name in RUN_SUBDIRS:
            shutil.rmtree(self.path / name, ignore_errors=True)
        for pattern in RUN_PLOTS:
            for plot in self.path.glob(pattern):
                plot.unlink()

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def partitions_path(self) -> Path:
        return self.path / "partitions.npz"

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        rows = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill: everything before it is whole
        return rows

    def truncate_metrics(self, last_round: int) -> None:
        """Keep only rounds <= ``last_round`` (a kill may have left a later line)."""
        keep = [r for r in self.read_metrics() if r["round"] <= last_round]
        tmp = self.metrics_path.with_name("metrics.jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True, default=float) + "\n" for r in keep))
        os.replace(tmp, self.metrics_path)

    def save_round(
        self, rnd: int, model_state: dict[str, torch.Tensor], arrays: dict[str, np.ndarray], state: dict[str, Any]
    ) -> None:
        """Checkpoint the model, then the resumable arrays, then (last) the JSON state."""
        save_tensors(model_state, self.checkpoints / f"round_{rnd:03d}.safetensors")
        save_tensors(
            {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, self.path / "state.safetensors"
        )
        write_json(self.path / "state.json", {"round": rnd, **state})

    def load_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
        if not (self.path / "state.json").is_file():
            return None
        state = read_json(self.path / "state.json")
        arrays = {k: v.numpy() for k, v in load_tensors(self.path / "state.safetensors").items()}
        return state, arrays

    def config(self) -> dict[str, Any]:
        return read_json(self.path / "config.json")
