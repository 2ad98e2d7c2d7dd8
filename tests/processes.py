"""Helpers for tests that start real processes: free loopback ports, ending what they start by PID, and the
torch-free predict command."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]

_PREDICT_NO_TORCH = """
import runpy, sys
sys.argv = ["fedrnn.edge.predict", *sys.argv[1:]]
try:
    runpy.run_module("fedrnn.edge.predict", run_name="__main__", alter_sys=True)
finally:
    print("TORCH_MODULES", sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")), file=sys.stderr)
"""


def run_predict(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m fedrnn.edge.predict ARGS``; stderr ends with ``TORCH_MODULES [...]``, the torch modules loaded."""
    return subprocess.run([sys.executable, "-c", _PREDICT_NO_TORCH, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)


def free_port() -> int:
    """A port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(proc: subprocess.Popen) -> list[psutil.Process]:
    """The process and its descendants (those that left its session included)."""
    try:
        root = psutil.Process(proc.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_tree(proc: subprocess.Popen, sig: signal.Signals = signal.SIGTERM, grace_s: float = 20) -> None:
    """Send ``sig`` to the process and its descendants by PID; SIGKILL what is left after ``grace_s``."""
    procs = tree(proc)
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=5)
    proc.wait(timeout=5)


def kill_after_round(cmd: list[str], run_dir: Path, env: dict[str, str], cwd: Path, timeout: float) -> int:
    """Start a run, SIGKILL it (and the Ray workers it started) once a round is saved; the rounds it saved."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    state = run_dir / "state.json"
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if state.is_file() and json.loads(state.read_text())["round"] >= 1:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    return int(json.loads(state.read_text())["round"])


def simulate_run(config: Path, teacher: Path, out: Path, cache: Path, timeout: float) -> Path:
    """``python -m fedrnn.simulate --config CONFIG --teacher TEACHER --out OUT`` in a fresh process; OUT."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "FEDRNN_CACHE_DIR": str(cache), "PYTHONPATH": str(root)}
    r = subprocess.run([sys.executable, "-m", "fedrnn.simulate", "--config", str(config), "--teacher", str(teacher),
                        "--out", str(out)], env=env, cwd=root, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out
