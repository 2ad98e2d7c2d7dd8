"""Raspberry Pi-class SuperNodes for real: the arm64 userland under QEMU, next to a host SuperNode.

Two SuperNodes run in the emulated arm64 Debian userland of ``clients/pi/emulate.sh`` (installed
exactly as the Pi guide says), on different CPU models (Cortex-A53 as in a Pi 3 / Zero 2 W,
Cortex-A72 as in a Pi 4), and one on this machine. All three connect over TLS with SuperNode
authentication (the fleet of ``tests/test_deployment.py``), train one round of a tiny config with
record-level DP and the server aggregates the three updates. Then one emulated SuperNode is
restarted and a second run continues its privacy accountant from the state file in its
state-dir. Slow (emulated torch): run with ``-m slow``; skipped where the userland is missing
(``sudo clients/pi/emulate.sh build`` makes it). With ``FEDRNN_PI_RSS_OUT=FILE`` the peak RSS of
each SuperNode during the first round is written there (read by ``clients/pi/compat.py --rss``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import test_deployment
from processes import free_port, tree
from test_deployment import Fleet, device_files, fleet, rows, wait_for, write_config  # noqa: F401 (fixtures)

from fedrnn.plugins.record_dp import device_state_file
from fedrnn.privacy.dp_sgd import PrivacyState, epsilon

ROOT = Path(__file__).resolve().parent.parent
EMULATE = ROOT / "clients" / "pi" / "emulate.sh"
PI_ROOT = Path(os.environ.get("FEDRNN_PI_ROOT", "/work/pi-rootfs/bookworm"))
EMULATED = {"pi-a53": "cortex-a53", "pi-a72": "cortex-a72"}
EMULATED_S = 1800  # one emulated ClientApp imports torch, flwr and opacus through QEMU: minutes on a busy machine
PRIVACY = "\n[privacy]\nrecord_level = true\nnoise_multiplier = 1.0\n"


def _emulation_ready() -> str | None:
    """None when the userland can run, else why not (the skip reason)."""
    if os.geteuid() != 0:
        return "emulated SuperNodes need root (chroot, mounts)"
    if shutil.which("qemu-aarch64-static") is None:
        return "qemu-user-static is not installed (apt-get install -y qemu-user-static debootstrap binfmt-support)"
    r = subprocess.run(["bash", str(EMULATE), "check"], capture_output=True, text=True, timeout=60)
    return None if r.returncode == 0 else r.stderr.strip() or f"emulate.sh check: exit code {r.returncode}"


SKIP = _emulation_ready()  # at collection, so a missing userland costs no fixture (teacher, SuperLink) set-up
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3 * EMULATED_S),
              pytest.mark.skipif(SKIP is not None, reason=str(SKIP))]


@pytest.fixture()
def pi_dir() -> Iterator[Path]:
    """A directory inside the userland for the emulated devices' files (removed afterwards)."""
    (PI_ROOT / "tmp").mkdir(exist_ok=True)
    d = PI_ROOT / "tmp" / f"fedrnn-test-{os.getpid()}"
    d.mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def inside(path: Path) -> str:
    return "/" + str(path.relative_to(PI_ROOT))


class EmulatedNode:
    """One device's files inside the userland, and the command that starts its SuperNode there."""

    def __init__(self, fl: Fleet, name: str, cpu: str, pi_dir: Path, reviews: Path, teacher: Path) -> None:
        self.fleet, self.name, self.cpu = fl, name, cpu
        self.home = pi_dir / name
        key = fl.register(name)
        (self.home / "state").mkdir(parents=True)
        for src in (key, fl.ca, reviews):
            shutil.copy(src, self.home / src.name)
        shutil.copytree(teacher, self.home / "teacher")
        self.node_config = {"data-path": inside(self.home / reviews.name),
                            "teacher-path": inside(self.home / "teacher"),
                            "state-dir": inside(self.home / "state"), "threads": 1}
        (self.home / "node.toml").write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in self.node_config.items()))
        self.env = {"SUPERLINK": f"127.0.0.1:{fl.port}", "CA": inside(self.home / fl.ca.name),
                    "KEY": inside(self.home / key.name), "NODE_CONFIG": inside(self.home / "node.toml"),
                    "FLWR_HOME": inside(self.home / "flwr")}

    def start(self) -> None:
        self.fleet.procs.start(self.name, ["bash", str(EMULATE), "supernode", "--cpu", self.cpu],
                               RUNTIME_PORT=str(free_port()), **self.env)

    def state_file(self) -> Path:
        """The privacy state file as this host sees it (record_dp names it from the node config)."""
        return PI_ROOT / str(device_state_file(self.node_config)).lstrip("/")  # a path inside the userland


class PeakRss:
    """Samples the resident memory of SuperNode process trees (a background thread) until stopped."""

    def __init__(self, fl: Fleet, names: list[str]) -> None:
        self.fl, self.names = fl, names
        self.peak = {n: {"supernode_bytes": 0, "clientapp_bytes": 0, "tree_bytes": 0} for n in names}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.5):
            for n in self.names:
                root, total = self.fl.procs.started[n], 0
                for p in tree(root):
                    try:
                        rss, cmd = p.memory_info().rss, " ".join(p.cmdline())
                    except psutil.Error:
                        continue
                    total += rss
                    kind = "clientapp_bytes" if "flwr-clientapp" in cmd else (
                        "supernode_bytes" if "flower-supernode" in cmd else None)
                    if kind:
                        self.peak[n][kind] = max(self.peak[n][kind], rss)
                self.peak[n]["tree_bytes"] = max(self.peak[n]["tree_bytes"], total)

    def stop(self) -> dict:
        self.done.set()
        self.thread.join(timeout=10)
        return self.peak


def _activations(fl: Fleet, node_id: int) -> int:
    return fl.procs.log("superlink").count(f"Activated node_id={node_id}")


def test_emulated_pis_and_a_host_node_train_one_round(pi_dir: Path, fleet: Fleet,  # noqa: F811
                                                      device_files: list[Path],  # noqa: F811
                                                      tiny_teacher: tuple[Path, dict],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(test_deployment, "RUN_S", EMULATED_S)  # finish_run's bound, for emulated ClientApps
    teacher = tiny_teacher[0]
    pis = [EmulatedNode(fleet, name, cpu, pi_dir, reviews, teacher)
           for (name, cpu), reviews in zip(EMULATED.items(), device_files, strict=False)]
    for pi in pis:
        pi.start()
    host_key = fleet.register("host")
    fleet.start_node("host", host_key, {"data-path": str(device_files[2]), "teacher-path": str(teacher),
                                        "state-dir": str(fleet.tmp / "host" / "state"), "threads": 1})
    wait_for("every SuperNode (two emulated) to be let in", lambda: fleet.activated() == set(fleet.node_ids.values()),
             EMULATED_S, 1.0)

    config = write_config(fleet.tmp / "pi.toml", teacher, rounds=1, nodes=3, fraction_evaluate=0.0,
                          timeout_s=EMULATED_S)
    config.write_text(config.read_text() + PRIVACY)
    rss = PeakRss(fleet, [*EMULATED, "host"])
    fleet.finish_run(fleet.start_run(config, fleet.tmp / "run1", 3))
    peak = rss.stop()
    r1 = rows(fleet.tmp / "run1")[1]
    assert r1["trained"] == 3 and r1["failures"] == 0, r1
    assert sorted(r1["clients"]) == sorted(fleet.node_ids.values())  # both emulated devices and the host
    by_id = {fleet.node_ids[n]: EMULATED.get(n, "host x86_64") for n in fleet.node_ids}
    print(f"round 1 aggregated {r1['trained']} replies: " + ", ".join(f"node {c} ({by_id[c]})" for c in r1["clients"]))
    flower = re.findall(r"aggregate_train: Received \d+ results and \d+ failures", fleet.procs.log("flwr-run"))
    print("Flower:", *flower)
    print("peak RSS:", json.dumps(peak))
    if os.environ.get("FEDRNN_PI_RSS_OUT"):
        Path(os.environ["FEDRNN_PI_RSS_OUT"]).write_text(json.dumps(
            {n: {"cpu": EMULATED.get(n, "native x86_64"), **v} for n, v in peak.items()}, indent=1))

    # The DP budget spent on a device lives in its state-dir and survives its SuperNode's restart.
    a53 = pis[0]
    first = PrivacyState.from_json(a53.state_file().read_text())
    assert first.history and epsilon(first) > 0
    fleet.procs.kill(a53.name)
    node_id = fleet.node_ids[a53.name]
    seen = _activations(fleet, node_id)

    def let_in_again() -> bool:
        if _activations(fleet, node_id) > seen:
            return True
        # The SuperLink refuses the node (exit code 305) until the killed session's heartbeat has expired
        if fleet.procs.started[a53.name].poll() is not None:
            a53.start()
        return False

    a53.start()
    wait_for("the restarted SuperNode to be let in again", let_in_again, EMULATED_S, 10.0)
    fleet.finish_run(fleet.start_run(config, fleet.tmp / "run2", 3))
    second = PrivacyState.from_json(a53.state_file().read_text())
    steps = [sum(k for _, _, k in s.history) for s in (first, second)]
    assert steps[1] == 2 * steps[0], (first, second)  # the second run continued the first run's accountant
    assert epsilon(second) > epsilon(first)
