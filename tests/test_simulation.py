"""End to end: a real Flower simulation on Ray with a tiny teacher and real data.

Runs ``python -m fedrnn.simulate`` as a subprocess (as a user would), including a kill -9
mid-run and ``--resume``, whose final metrics must equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from processes import kill_after_round
from safetensors.numpy import load_file

from fedrnn.federation.rundir import RunDir
from fedrnn.federation.wire import record_nbytes, to_record
from fedrnn.model.checkpoint import load_checkpoint
from fedrnn.model.rnn import trainable_names

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 420


def _cmd(out: Path, teacher: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fedrnn.simulate",
        "--config",
        str(ROOT / "configs" / "tiny.toml"),
        "--teacher",
        str(teacher),
        "--out",
        str(out),
        *extra,
    ]


def _env(cache_dir: Path) -> dict[str, str]:
    return {**os.environ, "FEDRNN_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(ROOT)}



@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: tuple[Path, dict]) -> Path:
    out = tmp_path_factory.mktemp("sim") / "run"
    cache = out.parent / "cache"
    r = subprocess.run(
        _cmd(out, tiny_teacher[0], "--rounds", "3"),
        env=_env(cache),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


# The tiny 3-round run's metrics (``finished_run``: configs/tiny.toml, 3 rounds, the tiny teacher), recorded
# before the architecture change (commit 9ceba97).
# A refactor must reproduce them; only a deliberate change to training or evaluation may re-record them.
PINNED = [  # round, target accuracy, target loss, retention accuracy, train loss, clients' held-out accuracy
    (0, 0.671875, 0.653510332107544, 0.703125, None, None),
    (1, 0.6640625, 0.6661683320999146, 0.703125, 0.6779021422068278, 0.641493484377861),
    (2, 0.671875, 0.6445455551147461, 0.734375, 0.7548254375395022, 0.6171161830425262),
    (3, 0.640625, 0.6551086902618408, 0.703125, 0.7209451297918956, 0.5709386467933655),
]


def test_metrics_are_pinned(finished_run: Path) -> None:
    keys = ("round", "target_accuracy", "target_loss", "retention_accuracy", "train_loss", "fed_eval_accuracy_mean")
    got = [tuple(r.get(k) for k in keys) for r in RunDir(finished_run).read_metrics()]
    assert len(got) == len(PINNED)
    for row, want in zip(got, PINNED, strict=True):
        assert row == pytest.approx(want, abs=1e-5), f"round {want[0]}: {row} != {want}"


def test_run_writes_everything(finished_run: Path) -> None:
    rows = RunDir(finished_run).read_metrics()
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for r in rows[1:]:
        assert r["trained"] == 4 and r["failures"] == 0
        assert 0.0 <= r["target_accuracy"] <= 1.0 and 0.0 <= r["retention_accuracy"] <= 1.0
        assert r["fed_eval_clients"] == 4 and r["fed_eval_accuracy_p10"] <= r["fed_eval_accuracy_mean"]
        assert {f"target_accuracy/{c}" for c in ("books", "dvd", "electronics", "kitchen")} <= set(r)
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["final"]["round"] == 3 and summary["client_train_seconds"] > 0
    # per-core efficiency: client CPU seconds over (wall x cores) cannot pass 1, whatever the load
    assert 0 < summary["efficiency_per_core"] <= 1 and summary["cores"] == 2
    assert 0 < summary["client_cpu_seconds"] <= summary["client_train_seconds"] * 1.05
    for r in rows[1:]:  # float32 both ways: the float32 reference is what travelled
        assert r["bytes_down"] == r["bytes_down_float32"] and r["bytes_up"] == r["bytes_up_float32"]
        assert r["bytes_down_extra"] == 0 and 0 < r["eval_seconds"] < r["round_seconds"]
    for name in ("accuracy.png", "loss.png", "config.json", "partitions.npz"):
        assert (finished_run / name).stat().st_size > 0
    # the last 2 rounds (server.keep_checkpoints default) and the best by target accuracy
    assert sorted(p.name for p in (finished_run / "checkpoints").iterdir()) == [
        "best.json",
        "best.safetensors",
        "round_002.safetensors",
        "round_003.safetensors",
    ]
    best = RunDir(finished_run).best()
    assert best["target_accuracy"] == max(r["target_accuracy"] for r in rows[1:])
    assert best["target_accuracy"] == next(r["target_accuracy"] for r in rows if r["round"] == best["round"])


def test_only_trainable_tensors_travel(finished_run: Path, tiny_teacher: tuple[Path, dict]) -> None:
    model, _, _ = load_checkpoint(tiny_teacher[0])
    sd = model.state_dict()
    names = trainable_names(model, "fine-tune")
    fine_tune = record_nbytes(to_record({n: sd[n].numpy() for n in names}))  # serialized, headers included
    raw = sum(sd[n].numel() * 4 for n in names)
    assert raw < fine_tune < raw + 200 * len(names)
    for r in RunDir(finished_run).read_metrics()[1:]:
        assert r["bytes_down"] == 4 * fine_tune  # 4 clients, exactly the fine-tune tensors
        assert r["bytes_up"] == 4 * fine_tune
    assert raw < sum(v.numel() * 4 for v in sd.values()) / 2
    # frozen tensors really stayed frozen: the embedding and lower layer equal the teacher's
    final = load_file(str(finished_run / "checkpoints" / "round_003.safetensors"))
    assert np.array_equal(final["embedding.weight"], sd["embedding.weight"].numpy())
    assert np.array_equal(final["rnn.0.fwd.weight_hh_l0"], sd["rnn.0.fwd.weight_hh_l0"].numpy())
    assert not np.array_equal(final["head.weight"], sd["head.weight"].numpy())


def test_same_seed_same_metrics_and_resume_after_kill(
    finished_run: Path, tmp_path: Path, tiny_teacher: tuple[Path, dict]
) -> None:
    out = tmp_path / "killed"
    done = kill_after_round(_cmd(out, tiny_teacher[0], "--rounds", "3"), out, _env(finished_run.parent / "cache"),
                            ROOT, TIMEOUT)
    assert 1 <= done < 3
    r = subprocess.run(
        [sys.executable, "-m", "fedrnn.simulate", "--resume", str(out)],
        env=_env(finished_run.parent / "cache"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resuming" in r.stdout
    resumed, reference = RunDir(out).read_metrics(), RunDir(finished_run).read_metrics()
    assert [x["round"] for x in resumed] == [0, 1, 2, 3]
    keys = (
        "target_accuracy",
        "target_loss",
        "retention_accuracy",
        "train_loss",
        "fed_eval_accuracy_mean",
        "clients",
        "bytes_down",
    )
    for a, b in zip(resumed, reference, strict=True):
        assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}
    # the retained checkpoints of the resumed run are those of the uninterrupted one, bit for bit
    for name in ("round_002.safetensors", "round_003.safetensors", "best.safetensors"):
        assert (out / "checkpoints" / name).read_bytes() == (finished_run / "checkpoints" / name).read_bytes()
    assert not (out / "checkpoints" / "round_001.safetensors").exists()
    assert RunDir(out).best() == RunDir(finished_run).best()


def test_bad_config_value_is_named(tmp_path: Path, tiny_teacher: tuple[Path, dict]) -> None:
    r = subprocess.run(
        _cmd(tmp_path / "x", tiny_teacher[0], "--alpha", "-2"),
        env=_env(tmp_path),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "run.alpha" in r.stderr


def test_missing_data_dir_is_named(tmp_path: Path, tiny_teacher: tuple[Path, dict]) -> None:
    """Bad input found while preparing (here: no data) ends the run with one line naming it, not a traceback."""
    r = subprocess.run(
        _cmd(tmp_path / "x", tiny_teacher[0]),
        env={**_env(tmp_path / "cache"), "FEDRNN_DATA_DIR": str(tmp_path / "no-data")},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    assert f"error: data directory {tmp_path / 'no-data'} (from $FEDRNN_DATA_DIR) does not exist" in r.stderr
    assert "Traceback" not in r.stderr
