"""Runs that must stop: every client failing (both entry points), and Ctrl-C (SIGINT) mid-run.

Slow (real Flower simulations on Ray, minutes on a loaded machine): ``pytest -m slow``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_flwr_run_simulation import ROOT, flwr_run, local_superlink, run_env, simulate, tiny_config

from fedrnn.federation.rundir import RunDir

pytestmark = pytest.mark.slow
EVERY_CLIENT_RAISES = "\n[faults]\nraise_clients = [0, 1, 2, 3, 4, 5, 6, 7]\n"
CLIENT_ERROR = "InjectedFault: injected fault: client"


@pytest.mark.timeout(1200)
def test_a_run_whose_clients_all_fail_exits_non_zero_quoting_the_client_error(
        tmp_path: Path, tiny_teacher: tuple[Path, dict]) -> None:
    config, env = tiny_config(tmp_path, tiny_teacher[0], EVERY_CLIENT_RAISES), run_env(tmp_path)
    r = simulate(env, "--config", str(config), "--out", str(tmp_path / "cli"))
    assert r.returncode != 0, r.stdout[-3000:]
    assert "round 1: all 4 clients failed; first failure: round 1, client" in r.stderr, r.stderr[-3000:]
    assert CLIENT_ERROR in r.stderr and "--resume" in r.stderr
    assert "Traceback" not in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]

    with local_superlink(env):
        f = flwr_run(env, f"config='{config}' run-dir='{tmp_path / 'flwr'}'")
        status = subprocess.run([str(Path(sys.executable).parent / "flwr"), "ls", "--format", "json"], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=60)
    out = f.stdout + f.stderr
    assert "round 1: all 4 clients failed; first failure: round 1, client" in out and CLIENT_ERROR in out, out[-5000:]
    # Flower 1.42's `flwr run --stream` exits 0 whatever the run's outcome; the run itself is marked failed.
    assert '"failed"' in status.stdout or "finished:failed" in status.stdout, status.stdout + status.stderr
    assert len(RunDir(tmp_path / "flwr").read_metrics()) == 1  # round 0 only: no failed round was recorded


@pytest.mark.timeout(1800)  # three tiny runs in sequence: a reference, the interrupted one, its resume
def test_ctrl_c_stops_at_once_prints_the_resume_command_and_resume_finishes_the_run(
        tmp_path: Path, tiny_teacher: tuple[Path, dict]) -> None:
    config, env = tiny_config(tmp_path, tiny_teacher[0]), run_env(tmp_path)
    args = ("--config", str(config), "--rounds", "3")
    reference = simulate(env, *args, "--out", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]

    out = tmp_path / "interrupted"
    log = tmp_path / "interrupted.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "fedrnn.simulate", *args, "--out", str(out)], cwd=ROOT,
                                env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while "round   1/3" not in log.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: the whole foreground process group
        rc = proc.wait(timeout=30)
        assert time.monotonic() - t0 < 30
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    text = log.read_text()
    assert rc == 130 and f"python -m fedrnn.simulate --resume {out}" in text, text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]

    resumed = simulate(env, "--resume", str(out))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    keys = ("round", "target_accuracy", "retention_accuracy", "train_loss", "fed_eval_accuracy_mean", "clients")
    got, want = RunDir(out).read_metrics(), RunDir(tmp_path / "reference").read_metrics()
    assert [{k: r.get(k) for k in keys} for r in got] == [{k: r.get(k) for k in keys} for r in want]
    clients = (out / "clients.jsonl").read_text().splitlines()
    assert len(clients) == 3 * 4  # no round twice, none missing
