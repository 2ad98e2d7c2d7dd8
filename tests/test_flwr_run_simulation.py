"""``flwr run`` of this app on a local simulation SuperLink (``placement = "virtual"``).

A ``flower-superlink --simulation`` on 127.0.0.1 runs the module-level ServerApp, which places
fedrnn's virtual clients on Flower's simulated SuperNodes. The run must end with exactly the
metrics ``python -m fedrnn.simulate`` gives for the same config and seed. Every process the test
starts is stopped by PID (with what it spawned); every wait is bounded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from processes import free_port, stop_tree

from fedrnn.federation.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RUN_S = 420



def test_flwr_run_on_a_simulation_superlink_matches_the_cli(tmp_path: Path, tiny_teacher: tuple[Path, dict]) -> None:
    config = tmp_path / "sim.toml"
    tiny = (ROOT / "configs" / "tiny.toml").read_text()
    config.write_text(tiny.replace("seed = 0\n", f"seed = 0\nteacher = {json.dumps(str(tiny_teacher[0]))}\n", 1))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the SuperLink starts flower-superexec
        "FEDRNN_CACHE_DIR": str(tmp_path / "cache"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Flower's own Ray, too, on loopback only
        "OMP_NUM_THREADS": "1",
    }
    reference = subprocess.run([sys.executable, "-m", "fedrnn.simulate", "--config", str(config), "--out",
                                str(tmp_path / "reference")], cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=RUN_S)
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]

    port, cli_home = free_port(), tmp_path / "cli"
    cli_home.mkdir()
    (cli_home / "config.toml").write_text(
        f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    log = tmp_path / "superlink.log"
    with log.open("wb") as out:
        link = subprocess.Popen(
            [str(BIN / "flower-superlink"), "--simulation", "--insecure", "--host", "127.0.0.1", "--port", str(port),
             "--database", str(tmp_path / "link.db"), "--disable-runtime-dependency-installation"],
            cwd=tmp_path, env={**env, "FLWR_HOME": str(tmp_path / "link-home")}, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        while "Uvicorn running on" not in log.read_text(errors="replace"):
            assert link.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "SuperLink not up within 90 s"
            time.sleep(0.3)
        run = subprocess.run(
            [str(BIN / "flwr"), "run", str(ROOT), "sim", "--stream", "--federation-config", "num-supernodes=4",
             "--run-config", f"config='{config}' run-dir='{tmp_path / 'flwr-run'}' placement='virtual'"],
            cwd=ROOT, env={**env, "FLWR_HOME": str(cli_home)}, capture_output=True, text=True, timeout=RUN_S,
        )
        assert run.returncode == 0 and "Successfully started run" in run.stdout, run.stdout[-3000:] + run.stderr
    finally:
        stop_tree(link)
    got, want = RunDir(tmp_path / "flwr-run").read_metrics(), RunDir(tmp_path / "reference").read_metrics()
    assert [r["round"] for r in got] == [0, 1, 2]
    keys = ("target_accuracy", "retention_accuracy", "fed_eval_accuracy_mean", "train_loss", "clients", "bytes_up")
    for a, b in zip(got, want, strict=True):
        assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}
