"""``flwr run . --stream`` on Flower's default local SuperLink, against ``python -m fedrnn.simulate``.

With a fresh ``FLWR_HOME`` Flower's CLI writes its default connection (``[superlink.local]``,
address ``:local:``) and starts a local simulation SuperLink itself. The ServerApp must detect
the simulated SuperNodes, place fedrnn's virtual clients on them and end with exactly the
metrics ``python -m fedrnn.simulate`` gives for the same config. The same pair of runs checks
the console (no Ray or Flower noise, accuracy with 4 decimals), the per-client records and
``python -m fedrnn.report``.

The local SuperLink listens on free ports (Flower's ``FLWR_LOCAL_*_PORT`` variables) so tests
running side by side do not meet; it runs detached, so it is found by its ``FLWR_HOME`` in its
command line and stopped by PID with what it spawned. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from processes import free_port

from fedrnn.federation.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RUN_S = 420


def tiny_config(tmp_path: Path, teacher: Path, extra: str = "") -> Path:
    """configs/tiny.toml with the tiny teacher (and ``extra`` TOML appended)."""
    config = tmp_path / "sim.toml"
    tiny = (ROOT / "configs" / "tiny.toml").read_text()
    config.write_text(tiny.replace("seed = 0\n", f"seed = 0\nteacher = {json.dumps(str(teacher))}\n", 1) + extra)
    return config


def run_env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # flwr starts flower-superlink from PATH
        "FEDRNN_CACHE_DIR": str(tmp_path / "cache"),
        "FLWR_HOME": str(tmp_path / "flwr-home"),  # fresh: Flower writes its default config.toml
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # the venv has the app's dependencies; no index
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Flower's own Ray, too, on loopback only
        "OMP_NUM_THREADS": "1",
    }


@contextmanager
def local_superlink(env: dict[str, str]) -> Iterator[None]:
    """Flower's managed local SuperLink for this ``FLWR_HOME``, stopped (with its children) after the block.

    It is started by Flower's own code, as ``flwr run`` starts it, but waiting up to 120 s instead
    of Flower's 15 s, which a loaded test machine can exceed (``flwr run`` then kills it).
    """
    start = ("import flwr.cli.local_superlink as m; m.LOCAL_SUPERLINK_STARTUP_TIMEOUT = 120.0; "
             "m._start_local_superlink()")
    try:
        subprocess.run([sys.executable, "-c", start], env=env, check=True, capture_output=True, timeout=180)
        yield
    finally:
        home = env["FLWR_HOME"]
        links = [p for p in psutil.process_iter(["cmdline"]) if home in " ".join(p.info["cmdline"] or ())
                 and any("flower-superlink" in part for part in p.info["cmdline"] or ())]
        procs = [q for p in links for q in (p, *p.children(recursive=True))]
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=20)
        for p in alive:
            p.kill()


def flwr_run(env: dict[str, str], run_config: str, timeout: int = RUN_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "flwr"), "run", str(ROOT), "--stream", "--run-config", run_config],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def simulate(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedrnn.simulate", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=RUN_S)


@pytest.mark.slow  # 88 s; the same ServerApp/ClientApp run in the default suite through the CLI's Ray engine
def test_flwr_run_on_the_default_local_superlink_matches_the_cli(tmp_path: Path,
                                                                  tiny_teacher: tuple[Path, dict]) -> None:
    config, env = tiny_config(tmp_path, tiny_teacher[0]), run_env(tmp_path)
    reference = simulate(env, "--config", str(config), "--out", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]
    console = reference.stdout + reference.stderr
    assert "(raylet)" not in console and "DEPRECATED" not in console and "Traceback" not in console, console
    final = re.search(r"done: .* target accuracy (\d\.\d+) ", reference.stdout)
    assert final and len(final.group(1)) <= 6, reference.stdout  # at most 4 decimals
    assert re.search(r"round   1/2 .* elapsed \d.*  ETA \d", reference.stdout), reference.stdout

    with local_superlink(env):
        run = flwr_run(env, f"config='{config}' run-dir='{tmp_path / 'flwr-run'}'")
    out = run.stdout + run.stderr
    assert run.returncode == 0 and "Successfully started run" in out, out[-5000:]
    assert "simulated SuperNodes" in out and "failed" not in out, out[-5000:]
    got, want = RunDir(tmp_path / "flwr-run").read_metrics(), RunDir(tmp_path / "reference").read_metrics()
    assert [r["round"] for r in got] == [0, 1, 2]
    assert all(r["failures"] == 0 and r["trained"] == 4 for r in got[1:])
    keys = ("target_accuracy", "retention_accuracy", "fed_eval_accuracy_mean", "train_loss", "clients", "bytes_up")
    for a, b in zip(got, want, strict=True):
        assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}

    for run_dir in (tmp_path / "reference", tmp_path / "flwr-run"):  # 2 rounds x 4 clients, every one trained
        rows = [json.loads(line) for line in (run_dir / "clients.jsonl").read_text().splitlines()]
        assert sorted((r["round"], r["client"]) for r in rows) == sorted(
            (r["round"], c) for r in want[1:] for c in r["clients"])
        assert all(r["status"] == "ok" and r["examples"] > 0 and r["bytes_up"] > 0 for r in rows)
        assert len((run_dir / "metrics.csv").read_text().splitlines()) == 4  # header + rounds 0..2

    report = subprocess.run([sys.executable, "-m", "fedrnn.report", str(tmp_path / "reference"),
                             str(tmp_path / "flwr-run"), "--out", str(tmp_path / "cmp")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert "reference" in (tmp_path / "cmp.csv").read_text() and "flwr-run" in (tmp_path / "cmp.csv").read_text()
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"
