"""Fault injection end to end: real Flower simulations on Ray whose clients raise, hang, crash or lie.

Each test runs ``python -m fedrnn.simulate`` in a subprocess with a ``[faults]`` or ``[attack]``
section and checks that the run completes, that every failed or rejected slot is counted,
and that the workers are healthy again in the next round.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 420


def _simulate(tmp_path: Path, teacher: Path, toml: str, *extra: str) -> tuple[list[dict], float, str]:
    """Run a tiny simulation with ``toml`` appended to configs/tiny.toml; (metrics rows, seconds, log)."""
    cfg = tmp_path / "run.toml"
    cfg.write_text((ROOT / "configs" / "tiny.toml").read_text() + "\n" + toml)
    out = tmp_path / "run"
    env = {**os.environ, "FEDRNN_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "fedrnn.simulate", "--config", str(cfg), "--teacher", str(teacher),
                        "--out", str(out), *extra], env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    seconds = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, seconds, r.stdout + r.stderr


def test_raising_hanging_and_crashing_clients_are_survived(tmp_path: Path, tiny_teacher: tuple[Path, dict]) -> None:
    """Round 1: client 0 raises, client 1 kills its Ray actor, client 2 hangs 600 s; client 3 is honest.

    The server stops waiting after server.timeout_s, the hung job is aborted by its own deadline
    (else the run could not end before the hang does), the dead actor is restarted by Ray, and
    round 2 runs all four clients again with no failure.
    """
    hang_s, timeout_s = 600.0, 20.0
    rows, seconds, _ = _simulate(tmp_path, tiny_teacher[0], f"""
[run]
clients = 4
clients_per_round = 4
rounds = 2
[server]
timeout_s = {timeout_s}
[faults]
raise_clients = [0]
crash_clients = [1]
hang_clients = [2]
hang_s = {hang_s}
rounds = [1]
""")
    r1, r2 = rows[1], rows[2]
    assert r1["clients"] == [0, 1, 2, 3] and r1["failures"] == 3 and r1["trained"] == 1
    assert r1["round_seconds"] >= timeout_s  # the server waited for the hung client, but only that long
    assert r2["failures"] == 0 and r2["trained"] == 4 and r2["rejected"] == 0  # every worker is back
    assert r1["target_accuracy"] is not None and r2["target_accuracy"] is not None
    assert seconds < hang_s / 2


def test_scaled_updates_are_rejected_and_counted(tmp_path: Path, tiny_teacher: tuple[Path, dict]) -> None:
    """Two of eight clients boost their update 1000x; the norm check keeps them out of FedAvg."""
    rows, _, log = _simulate(tmp_path, tiny_teacher[0], """
[run]
rounds = 2
[attack]
clients = 2
kind = "scale"
scale = 1000.0
""")
    attacked = [r for r in rows[1:] if r["attackers"]]
    assert attacked, "no attacker was sampled; pick another seed"
    for r in rows[1:]:
        assert r["rejected"] == r["attackers"] and r["attackers_aggregated"] == 0
        assert r["trained"] == 4 - r["attackers"]
        assert all("max_norm_ratio" in why for why in r["rejected_reasons"].values())
    assert "rejected the reply of client" in log
    assert rows[-1]["target_accuracy"] > 0.5  # the global model was never poisoned
