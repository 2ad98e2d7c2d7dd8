"""Checkpoint retention of a run directory: the last N rounds plus the best, pruned only after state.json moves on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedrnn.federation.rundir import RunDir
from fedrnn.model.checkpoint import load_tensors


def _save(rd: RunDir, rnd: int, score: float | None) -> None:
    rd.save_round(rnd, {"w": torch.full((3,), float(rnd))}, {"global/w": np.full(3, rnd, np.float32)},
                  {"totals": {}}, score)


def _rounds(rd: RunDir) -> list[str]:
    return sorted(p.name for p in rd.checkpoints.glob("round_*"))


def test_keeps_the_last_n_and_the_best(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run", keep=2)
    rd.create({})
    for rnd, score in [(1, 0.5), (2, None), (3, 0.8), (4, 0.7), (5, None), (6, 0.75)]:
        _save(rd, rnd, score)
    assert _rounds(rd) == ["round_005.safetensors", "round_006.safetensors"]
    assert rd.best() == {"round": 3, "target_accuracy": 0.8}
    assert torch.equal(load_tensors(rd.checkpoints / "best.safetensors")["w"], torch.full((3,), 3.0))
    state, arrays = rd.load_state()
    assert state["round"] == 6 and np.array_equal(arrays["global/w"], np.full(3, 6, np.float32))


def test_keep_zero_keeps_every_round_and_a_kill_leftover_is_pruned(tmp_path: Path) -> None:
    every = RunDir(tmp_path / "all", keep=0)
    every.create({})
    for rnd in range(1, 5):
        _save(every, rnd, None)
    assert len(_rounds(every)) == 4 and every.best() == {}
    # a run killed before pruning left old rounds behind: the next save removes all of them
    rd = RunDir(tmp_path / "all", keep=1)
    _save(rd, 5, 0.1)
    assert _rounds(rd) == ["round_005.safetensors"]
    assert rd.best()["round"] == 5


def test_bad_keep_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep must be >= 0"):
        RunDir(tmp_path, keep=-1)
