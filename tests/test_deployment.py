"""Real devices, on one machine: Flower's Deployment Engine as separate processes on 127.0.0.1.

A SuperLink (``server/run_superlink.sh``: TLS with certificates made here, SuperNode
authentication on) and SuperNodes (``clients/run_supernode.sh``), each with its own private
review file in a different format, run this repository's ServerApp/ClientApp through
``flwr run``, exactly as a Raspberry Pi fleet does. Every process a test starts is stopped by
its PID (with whatever it spawned) at teardown; every wait is bounded.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import signal
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from processes import free_port, stop_tree, tree

from fedrnn.data.loaders import load_amazon
from server.certs import make_node_key, make_tls
from server.server_app import app_file

ROOT = Path(__file__).resolve().parent.parent
START_S = 90  # a process must be up (or have failed) within this
RUN_S = 420  # a whole run on a busy 2-core machine


def wait_for(what: str, cond: Callable[[], bool], timeout: float, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


class Processes:
    """The processes a test starts; ``stop_all`` ends each, and what it spawned, by PID."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs, self.env = logs, env
        self.started: dict[str, subprocess.Popen] = {}
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, cmd: list[str], **env: str) -> subprocess.Popen:
        with (self.logs / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.started[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        stop_tree(self.started[name], sig, grace_s=15)

    def stop_all(self) -> None:
        for name in reversed(list(self.started)):
            self.kill(name, signal.SIGTERM)


@dataclass
class Fleet:
    """A running SuperLink, the CLI's connection to it, and SuperNodes."""

    tmp: Path
    procs: Processes
    port: int
    cli_env: dict[str, str]
    ca: Path
    node_ids: dict[str, int] = field(default_factory=dict)

    def flwr(self, *args: str, timeout: float = START_S) -> subprocess.CompletedProcess:
        return subprocess.run([str(Path(sys.executable).parent / "flwr"), *args], cwd=self.tmp, env=self.cli_env,
                              capture_output=True, text=True, timeout=timeout)

    def flwr_json(self, *args: str) -> dict:
        r = self.flwr(*args, "--format", "json")
        assert r.returncode == 0, f"flwr {' '.join(args)}: {r.stdout}\n{r.stderr}"
        return json.loads(r.stdout[r.stdout.index("{"):])

    def register(self, name: str) -> Path:
        """A key pair for device ``name``, its public key registered with the SuperLink."""
        key, pub = make_node_key(self.tmp / name / "node_key")
        self.node_ids[name] = int(self.flwr_json("supernode", "register", str(pub), "fleet")["node-id"])
        return key

    def start_node(self, name: str, key: Path, node_config: dict[str, str | int], **env: str) -> subprocess.Popen:
        """``clients/run_supernode.sh`` for device ``name`` (``env`` overrides the script's settings)."""
        home = self.tmp / name
        cfg = home / "node.toml"
        cfg.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in node_config.items()))
        settings = {"SUPERLINK": f"127.0.0.1:{self.port}", "CA": str(self.ca), "KEY": str(key), "NODE_CONFIG": str(cfg),
                    "RUNTIME_PORT": str(free_port()), "FLWR_HOME": str(home / "flwr")}
        return self.procs.start(name, ["bash", str(ROOT / "clients" / "run_supernode.sh")], **(settings | env))

    def online(self) -> set[int]:
        nodes = self.flwr_json("supernode", "list", "fleet").get("nodes", [])
        return {int(n["node-id"]) for n in nodes if n.get("status") == "online"}

    def activated(self) -> set[int]:
        """Node ids the SuperLink has let in (read from its log: cheaper than polling the CLI)."""
        log = self.procs.log("superlink")
        return {n for n in self.node_ids.values() if f"Activated node_id={n}" in log}

    def start_run(self, config: Path, run_dir: Path, min_nodes: int) -> subprocess.Popen:
        """``flwr run`` of this app, streaming the run's log until it finishes."""
        return self.procs.start("flwr-run", [str(Path(sys.executable).parent / "flwr"), "run", str(ROOT), "fleet",
                                             "--stream", "--run-config",
                                             f"config='{config}' run-dir='{run_dir}' min-nodes={min_nodes}"],
                                FLWR_HOME=self.cli_env["FLWR_HOME"])

    def finish_run(self, run: subprocess.Popen) -> str:
        """Wait (bounded) for the streamed run to end; returns its status from ``flwr ls``."""
        run.wait(timeout=RUN_S)
        log = self.procs.log("flwr-run")
        match = re.search(r"Successfully started run (\d+)", log)
        assert match and run.returncode == 0, log[-4000:]
        status = str(self.flwr_json("ls", "fleet", "--run-id", match.group(1))["runs"][0]["status"])
        assert status == "finished:completed", f"{status}\n{log[-4000:]}"
        return status


def _env(tmp: Path) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
            "FEDRNN_CACHE_DIR": str(tmp / "cache"), "OMP_NUM_THREADS": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0"}


@pytest.fixture()
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """A SuperLink with TLS and SuperNode authentication, and a CLI connection named ``fleet``."""
    env = _env(tmp_path)
    procs = Processes(tmp_path / "logs", env)
    tls = make_tls(tmp_path / "certs")
    port = free_port()
    cli_home = tmp_path / "cli"
    cli_home.mkdir()
    (cli_home / "config.toml").write_text(
        f'[superlink]\ndefault = "fleet"\n\n[superlink.fleet]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{tls.ca_cert}"\n')
    try:
        link = procs.start("superlink", ["bash", str(ROOT / "server" / "run_superlink.sh")],
                           CERTS=str(tmp_path / "certs"), STATE=str(tmp_path / "link"), HOST="127.0.0.1",
                           PORT=str(port), FLWR_HOME=str(tmp_path / "link"))
        fl = Fleet(tmp_path, procs, port, {**env, "FLWR_HOME": str(cli_home)}, tls.ca_cert)

        def up() -> bool:
            assert link.poll() is None, procs.log("superlink")
            return fl.flwr("ls", "fleet").returncode == 0

        wait_for("SuperLink to accept CLI requests over TLS", up, START_S, 0.5)
        yield fl
    finally:
        procs.stop_all()


def write_reviews(path: Path, texts: list[str], labels: list[int]) -> None:
    """One device's private review file, in the format its name says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith((".csv", ".tsv")):
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter="\t" if path.suffix == ".tsv" else ",")
            w.writerow(["label", "text"])
            w.writerows(zip(labels, texts, strict=True))
        return
    lines = "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels, strict=True))
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")


@pytest.fixture(scope="module")
def device_files(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> list[Path]:
    """Three devices' own review files (40 real Amazon reviews each), in three formats."""
    reviews = load_amazon(str(data_dir))
    order = np.random.default_rng(7).permutation(len(reviews))
    out = tmp_path_factory.mktemp("devices")
    files = []
    for i, name in enumerate(("reviews.jsonl", "reviews.csv", "reviews.jsonl.gz")):
        idx = order[i * 40:(i + 1) * 40]
        write_reviews(out / f"dev{i}" / name, [reviews.texts[j] for j in idx], [int(reviews.labels[j]) for j in idx])
        files.append(out / f"dev{i}" / name)
    return files


def write_config(path: Path, teacher: Path, rounds: int, nodes: int, **server: float) -> Path:
    extra = "".join(f"{k} = {v}\n" for k, v in server.items())
    path.write_text(f"""[run]
clients = {nodes}
clients_per_round = {nodes}
rounds = {rounds}
teacher = "{teacher}"

[client]
batch_size = 8
max_steps = 3

[server]
retention_examples = 64
target_test_examples = 128
{extra}""")
    return path


def start_devices(fleet: Fleet, files: list[Path], teacher: Path) -> list[str]:
    names = []
    for i, data in enumerate(files):
        name = f"pi{i}"
        key = fleet.register(name)
        fleet.start_node(name, key, {"data-path": str(data), "teacher-path": str(teacher),
                                     "state-dir": str(fleet.tmp / name / "state"), "threads": 1})
        names.append(name)
    wait_for("every SuperNode to be let in", lambda: fleet.activated() == set(fleet.node_ids.values()), START_S, 0.5)
    return names


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # 12 ClientApp processes (3 devices x train + evaluate x 2 rounds): 150 s on the busy test machine
def test_two_rounds_on_three_authenticated_devices(fleet: Fleet, device_files: list[Path],
                                                   tiny_teacher: tuple[Path, dict]) -> None:
    teacher = tiny_teacher[0]
    start_devices(fleet, device_files, teacher)
    run_dir = fleet.tmp / "run"
    fleet.finish_run(fleet.start_run(write_config(fleet.tmp / "deploy.toml", teacher, rounds=2, nodes=3), run_dir, 3))
    got = rows(run_dir)
    assert [r["round"] for r in got] == [0, 1, 2]
    for r in got[1:]:
        # every device trained, and the client ids are the registered SuperNode ids
        assert r["trained"] == 3 and r["failures"] == 0, r
        assert sorted(r["clients"]) == sorted(fleet.node_ids.values())
        assert r["client_train_seconds"] > 0 and r["bytes_up"] == r["bytes_down"] > 0
        assert r["fed_eval_clients"] == 3 and 0.0 <= r["target_accuracy"] <= 1.0
    assert got[2]["target_loss"] != got[0]["target_loss"]  # the devices' updates reached the global model
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final"]["round"] == 2 and summary["failures"] == 0
    assert (run_dir / "checkpoints" / "round_002.safetensors").stat().st_size > 0


def test_unregistered_device_is_refused(fleet: Fleet, device_files: list[Path]) -> None:
    config = {"data-path": str(device_files[0]), "teacher-path": str(fleet.tmp / "teacher")}
    stranger, _ = make_node_key(fleet.tmp / "stranger" / "node_key")  # never registered
    refused = fleet.start_node("stranger", stranger, config)
    assert refused.wait(timeout=START_S) != 0
    assert "[code: 2004] Failed to activate SuperNode" in fleet.procs.log("stranger")
    # and no device may join by registering itself
    keyless = fleet.procs.start("keyless", ["flower-supernode", "--superlink", f"127.0.0.1:{fleet.port}",
                                            "--root-certificates", str(fleet.ca), "--port", str(free_port())],
                                FLWR_HOME=str(fleet.tmp / "keyless"))
    assert keyless.wait(timeout=START_S) != 0
    assert "All SuperNodes must be registered via the CLI" in fleet.procs.log("keyless")
    # a registered device that does not trust the SuperLink's certificate never talks to it
    key = fleet.register("mistrusting")
    other_ca = make_tls(fleet.tmp / "other-ca").ca_cert
    mistrusting = fleet.start_node("mistrusting", key, config, CA=str(other_ca))
    assert mistrusting.wait(timeout=START_S) != 0
    assert "certificate verify failed" in fleet.procs.log("mistrusting")
    assert fleet.online() == set()


@pytest.mark.slow
def test_device_killed_mid_round(fleet: Fleet, device_files: list[Path], tiny_teacher: tuple[Path, dict]) -> None:
    """SIGKILL one device while it trains: the run completes with the others and counts the failure."""
    teacher = tiny_teacher[0]
    names = start_devices(fleet, device_files, teacher)
    run_dir = fleet.tmp / "run"
    # A bounded wait per round: a dead device's message fails when the SuperLink misses its
    # heartbeats (up to 60 s in Flower 1.42) or when the round's timeout ends, whichever is first.
    config = write_config(fleet.tmp / "deploy.toml", teacher, rounds=2, nodes=3, timeout_s=30, fraction_evaluate=0.0)
    run = fleet.start_run(config, run_dir, 3)
    victim = names[-1]

    def training() -> bool:  # the victim's SuperNode has started a ClientApp process for round 1
        for p in tree(fleet.procs.started[victim]):
            try:
                if any("flwr-clientapp" in part for part in p.cmdline()):
                    return True
            except psutil.Error:
                pass
        return False

    wait_for("the victim to start training", training, RUN_S, 0.1)
    fleet.procs.kill(victim)
    fleet.finish_run(run)
    assert re.search(r"round +1/2 .* failed 1 ", fleet.procs.log("flwr-run")), "the operator's log names the failure"
    got = rows(run_dir)
    assert [r["round"] for r in got] == [0, 1, 2]
    assert got[1]["failures"] == 1 and got[1]["trained"] == 2, got[1]
    # round 2 goes ahead with the two live devices (the dead one fails again if not yet timed out)
    assert got[2]["trained"] == 2 and got[2]["failures"] == len(got[2]["clients"]) - 2, got[2]


def test_tls_files_chain_to_the_ca_and_name_the_hosts(tmp_path: Path) -> None:
    files = make_tls(tmp_path, ["superlink.lan", "192.168.1.10"])
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"superlink.lan", "localhost"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"192.168.1.10", "127.0.0.1"}
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(files.server_cert, files.server_key)
    assert {stat.S_IMODE(f.stat().st_mode) for f in (files.ca_key, files.server_key)} == {0o600}
    with pytest.raises(ValueError, match="not a valid DNS name"):
        make_tls(tmp_path / "bad", ["two words"])


def test_node_key_is_what_flower_reads(tmp_path: Path) -> None:
    private, public = make_node_key(tmp_path / "node_key")
    key = serialization.load_ssh_private_key(private.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert try_load_public_key(public) == public_key_to_bytes(key.public_key())  # what `flwr supernode register` sends
    with pytest.raises(FileExistsError, match="device identity"):
        make_node_key(private)


def test_relative_run_config_path_is_the_apps_own(tmp_path: Path) -> None:
    # `flwr run` ships configs/ in the app bundle; the SuperLink's working directory is elsewhere
    assert app_file("configs/tiny.toml") == ROOT / "configs" / "tiny.toml"
    assert app_file(str(tmp_path / "mine.toml")) == tmp_path / "mine.toml"
