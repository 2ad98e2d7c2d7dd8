"""A run's directory: resolved config, per-round metrics, checkpoints, resumable state, plots.

Layout of ``runs/NAME/``::

    config.json          resolved configuration (what --resume reuses)
    metrics.jsonl        one JSON object per completed round
    summary.json         final metrics and totals
    checkpoints/round_NNN.safetensors   full global model of the last ``keep`` rounds (server.keep_checkpoints)
    checkpoints/best.safetensors + best.json   the round with the best target accuracy so far
    state.json + state.safetensors      what resuming needs (round, clocks, strategy moments, ...)
    partitions.npz       the clients' shards (indices into the target pool)
    accuracy.png, loss.png
    student/, client_state/             the distilled student; int8 error-feedback residuals

Writes are atomic (temp file + rename) and ``state.json`` is written last, so a kill -9 at
any point leaves the previous round's state intact; metric lines past that round are
dropped on resume. Older round checkpoints are deleted only after ``state.json`` names a
newer round, so the round a resume restarts from is always on disk; the best checkpoint is a
hard link to its round's file where the file system allows (no second copy on disk).
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
BEST, BEST_JSON = "best.safetensors", "best.json"


class RunDir:
    def __init__(self, path: str | os.PathLike[str], keep: int = 0) -> None:
        """``keep``: round checkpoints to keep (the last ones); 0 keeps every round's."""
        if keep < 0:
            raise ValueError(f"keep must be >= 0 (0 = every round), got {keep}")
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.keep = keep

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

    def round_checkpoint(self, rnd: int) -> Path:
        return self.checkpoints / f"round_{rnd:03d}.safetensors"

    def save_round(
        self, rnd: int, model_state: dict[str, torch.Tensor], arrays: dict[str, np.ndarray], state: dict[str, Any],
        score: float | None = None,
    ) -> None:
        """Checkpoint the model, then the resumable arrays, then (last) the JSON state; then prune.

        ``score`` (the round's target accuracy, if it was evaluated) decides the best checkpoint.
        """
        save_tensors(model_state, self.round_checkpoint(rnd))
        if score is not None and score > self.best().get("target_accuracy", float("-inf")):
            self._save_best(rnd, score)
        save_tensors(
            {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, self.path / "state.safetensors"
        )
        write_json(self.path / "state.json", {"round": rnd, **state})
        self._prune(rnd)

    def best(self) -> dict[str, Any]:
        """``{"round", "target_accuracy"}`` of the best checkpoint so far ({} before any evaluated round)."""
        path = self.checkpoints / BEST_JSON
        return read_json(path) if path.is_file() else {}

    def _save_best(self, rnd: int, score: float) -> None:
        tmp = self.checkpoints / (BEST + ".tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(self.round_checkpoint(rnd), tmp)
        except OSError:  # no hard links here (some network or FAT file systems): a copy
            shutil.copyfile(self.round_checkpoint(rnd), tmp)
        os.replace(tmp, self.checkpoints / BEST)
        write_json(self.checkpoints / BEST_JSON, {"round": rnd, "target_accuracy": score})

    def _prune(self, rnd: int) -> None:
        """Delete round checkpoints older than the last ``keep`` (every one left by an earlier kill too)."""
        if not self.keep:
            return
        for p in self.checkpoints.glob("round_*.safetensors"):
            number = p.name[len("round_") : -len(".safetensors")]
            if number.isdigit() and int(number) <= rnd - self.keep:
                p.unlink(missing_ok=True)

    def load_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
        if not (self.path / "state.json").is_file():
            return None
        state = read_json(self.path / "state.json")
        arrays = {k: v.numpy() for k, v in load_tensors(self.path / "state.safetensors").items()}
        return state, arrays

    def config(self) -> dict[str, Any]:
        return read_json(self.path / "config.json")
