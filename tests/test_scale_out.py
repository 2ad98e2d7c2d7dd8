"""Scale-out: a simulation attaches to an existing Ray cluster instead of starting its own.

A Ray head is started here on 127.0.0.1 (``ray start --head --block``, so every Ray process
is a descendant of one PID and is stopped by PID, never by ``ray stop``, which would end
every Ray on the machine). A tiny ``python -m fedrnn.simulate`` run with
``[simulation] ray_address`` must complete and must have run as a driver of that cluster.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import free_port, stop_tree

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


@pytest.fixture()
def ray_head() -> Iterator[tuple[str, Path]]:
    """A 2-CPU Ray head on 127.0.0.1: (address, its temp dir)."""
    # A short temp dir: Ray's Unix socket paths must stay under ~107 characters.
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    port = free_port()
    ports = {f"--{name}": str(free_port()) for name in (
        "node-manager-port", "object-manager-port", "ray-client-server-port", "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")}
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
           "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats",
           f"--temp-dir={temp}", *[f"{k}={v}" for k, v in ports.items()]]
    log = temp / "head.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with log.open("wb") as out:
        head = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in log.read_text(errors="replace"):
            assert head.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "Ray head did not start within 90 s\n" + log.read_text()
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", temp
    finally:
        stop_tree(head)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_simulation_attaches_to_existing_ray_cluster(ray_head: tuple[str, Path], tmp_path: Path,
                                                     tiny_teacher: tuple[Path, dict]) -> None:
    address, temp = ray_head
    tiny = (ROOT / "configs" / "tiny.toml").read_text()
    assert tiny.count("[simulation]\n") == 1
    config = tmp_path / "cluster.toml"
    config.write_text(tiny.replace("[simulation]\n", f'[simulation]\nray_address = "{address}"\n'))
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"FEDRNN_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    sim = subprocess.Popen([sys.executable, "-m", "fedrnn.simulate", "--config", str(config), "--teacher",
                            str(tiny_teacher[0]), "--out", str(out), "--rounds", "1"],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        log, _ = sim.communicate(timeout=420)
    finally:
        if sim.poll() is None:
            stop_tree(sim)
    assert sim.returncode == 0, log[-4000:]
    assert (out / "checkpoints" / "round_001.safetensors").is_file()
    # The simulation was a driver of this cluster: the head's session logged a driver with its PID.
    logs = temp / "session_latest" / "logs"
    assert list(logs.glob(f"python-core-driver-*_{sim.pid}.log")), sorted(p.name for p in logs.iterdir())
