"""The device fleet under a real Flower simulation: clock, deadlines, memory, availability, traces, resume.

Two tiny runs of ``python -m fedrnn.simulate`` (as a user starts them) with ``[devices]`` on:

* a Raspberry Pi mix (Zero 2 W + Pi 5) with churn, a fixed host speed (so the clock is exact)
  and a batch too large for the Zero 2 W's RAM, under the ``partial`` policy;
* the example trace fleet with the host speed measured once, under ``drop``, run for two rounds
  and then resumed for a third.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedrnn.config import ConfigError, config_from_dict
from fedrnn.devices import Fleet, load_trace
from fedrnn.federation.prepare import check_files
from fedrnn.federation.rundir import RunDir
from fedrnn.federation.wire import record_nbytes, to_record
from fedrnn.model.checkpoint import load_checkpoint
from fedrnn.model.rnn import trainable_names
from fedrnn.plugins.devices import local_work

ROOT = Path(__file__).resolve().parent.parent
TRACE = ROOT / "configs" / "fleets" / "example_trace.csv"
TIMEOUT = 420
COMMON = """
[run]
clients = {clients}
rounds = 2
clients_per_round = 4
target = "amazon"
mode = "fine-tune"
seed = 0
data_fraction = {fraction}

[client]
batch_size = {batch}
lr = 0.002
max_steps = {max_steps}

[server]
retention_examples = 64
target_test_examples = 128

[simulation]
actors = 2
threads_per_actor = 1

[devices]
enabled = true
class_eval_examples = 100
"""
PI_MIX = COMMON.format(clients=8, fraction=0.5, batch=512, max_steps=3) + """
mix = { "rpi-zero2w" = 0.5, "rpi5" = 0.5 }
availability = "churn"
policy = "partial"
deadline_s = 120.0
host_samples_per_s = 100.0
"""
TRACE_FLEET = COMMON.format(clients=10, fraction=0.25, batch=16, max_steps=0) + f"""
trace = "{TRACE}"
policy = "drop"
deadline_s = 2.0
"""


def _simulate(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEDRNN_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "fedrnn.simulate", *args], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _run(tmp: Path, name: str, config: str, teacher: Path) -> Path:
    (tmp / f"{name}.toml").write_text(config)
    _simulate(["--config", str(tmp / f"{name}.toml"), "--teacher", str(teacher), "--out", str(tmp / name)],
              tmp / "cache")
    return tmp / name



def _check_clock(rows: list[dict], deadline: float) -> None:
    """Each round starts where the last ended (plus any idle wait) and lasts until its last event or the deadline."""
    previous = 0.0
    for r in rows[1:]:
        plans = r["device_clients"].values()
        events = [p["time_s"] for p in plans if p["status"] != "excluded-memory"]
        assert r["round_sim_seconds"] == pytest.approx(min(deadline, max(events, default=0.0)))
        assert r["sim_time_h"] * 3600 == pytest.approx(previous + r["idle_sim_seconds"] + r["round_sim_seconds"])
        previous = r["sim_time_h"] * 3600


def _check_accounting(rows: list[dict]) -> None:
    """Counts, trained steps and bytes in each row agree with the per-client plan."""
    for r in rows[1:]:
        plans = {int(k): v for k, v in r["device_clients"].items()}
        status = {k: p["status"] for k, p in plans.items()}
        reported = sorted(k for k, s in status.items() if s in ("ok", "partial"))
        assert sorted(plans) == r["selected"] and r["clients"] == reported  # late and dropped clients never train
        assert r["dropouts"] == list(status.values()).count("dropout")
        assert r["stragglers"] == r["late"] + r["partial"]
        assert r["late"] == list(status.values()).count("late")
        assert r["partial"] == list(status.values()).count("partial")
        for k in reported:  # each client trained exactly the planned steps
            assert plans[k]["trained_steps"] == plans[k]["steps"] >= 1
        down, up = r["payload_bytes"]["down"], r["payload_bytes"]["up"]
        assert r["bytes_down"] == down * len(r["clients"]) and r["bytes_up"] == up * r["trained"]
        classes = r["device_classes"]
        assert sum(c["selected"] for c in classes.values()) == len(plans)
        assert sum(c["bytes_down"] for c in classes.values()) == down * sum(
            s not in ("unavailable", "excluded-memory") for s in status.values())


@pytest.fixture(scope="module")
def pi_run(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: tuple[Path, dict]) -> Path:
    return _run(tmp_path_factory.mktemp("devices"), "pis", PI_MIX, tiny_teacher[0])


def test_local_work_matches_the_training_loop() -> None:
    assert local_work(40, 2, 32, 0) == (80, 4)  # two epochs of two batches (32 + 8), not ceil(80 / 32) = 3
    assert local_work(100, 1, 16, 3) == (48, 3)  # capped by max_steps x batch
    assert local_work(10, 1, 16, 5) == (10, 1)


@pytest.mark.parametrize("devices, message", [
    ({"mix": {"pi9": 1.0}}, "devices.mix.pi9 is not a device profile"),
    ({"mix": {"rpi4": 0.5}}, "devices.mix fractions must sum to 1"),
    ({"mix": {"rpi4": 1.0}, "network_mix": {"4g": 0.5, "5g": 0.5}}, "devices.network_mix.5g must be a network"),
    ({"mix": {"rpi4": 1.0}, "network": "wifi", "network_mix": {"4g": 1.0}}, "needs at most one"),
    ({"mix": {"rpi4": 1.0}, "availability": "weekends"}, "devices.availability must be"),
    ({"mix": {"rpi4": 1.0}, "policy": "drop"}, "devices.deadline_s must be > 0 with policy 'drop'"),
])
def test_bad_devices_config_is_named(devices: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict({"devices": {"enabled": True, **devices}})


def test_bad_trace_is_named_before_the_run(tmp_path: Path) -> None:
    """Validation reads no file; the run's file check (``prepare_run`` calls it first) names the trace's problem."""
    bad = tmp_path / "fleet.csv"
    bad.write_text(TRACE.read_text().replace("\n3,rpi3b+,,0.0405,24500000,", "\n3,rpi3b+,,0.0405,-1,"))
    cases = [(str(bad), 10, f"devices.trace: {bad}: line 5: column 'down_bps' must be > 0"),
             ("configs/fleets/missing.csv", 10, "devices.trace: trace file configs/fleets/missing.csv does not exist"),
             (str(TRACE), 12, f"devices.trace: {TRACE} has 10 clients but run.clients = 12")]
    for trace, clients, message in cases:
        cfg = config_from_dict({"run": {"clients": clients}, "devices": {"enabled": True, "trace": trace}})
        with pytest.raises(ConfigError, match=re.escape(message)):
            check_files(cfg)
    check_files(config_from_dict({"run": {"clients": 10}, "devices": {"enabled": True, "trace": str(TRACE)}}))


def test_pi_fleet_rows_carry_the_device_metrics(pi_run: Path, tiny_teacher: tuple[Path, dict]) -> None:
    rows = RunDir(pi_run).read_metrics()
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert {"sim_time_h", "round_sim_seconds", "stragglers", "dropouts", "excluded_memory", "memory_adapted",
                "device_classes", "class_accuracy/rpi-zero2w", "class_accuracy/rpi5"} <= set(r)
        assert all(0.0 <= r[f"class_accuracy/{c}"] <= 1.0 for c in ("rpi-zero2w", "rpi5"))
        for stats in r["device_classes"].values():
            assert {"participation", "bytes_down", "bytes_up", "mean_work_fraction", "partial", "late"} <= set(stats)
    _check_clock(rows, deadline=120.0)
    _check_accounting(rows)
    # the bytes on the clock are the bytes that travel: the fine-tune tensors' serialized record
    model, _, _ = load_checkpoint(tiny_teacher[0])
    sd = model.state_dict()
    record = to_record({n: sd[n].numpy() for n in trainable_names(model, "fine-tune")})
    assert rows[1]["payload_bytes"] == {"down": record_nbytes(record), "up": record_nbytes(record)}
    assert (pi_run / "accuracy_vs_sim_hours.png").stat().st_size > 0


def test_slow_pis_train_part_of_their_work_and_memory_starved_ones_adapt(pi_run: Path) -> None:
    rows = RunDir(pi_run).read_metrics()
    plans = [p for r in rows[1:] for p in r["device_clients"].values()]
    # 100 samples/s x 0.0289 (Zero 2 W) = 2.9 samples/s: one step of 256 fits in 120 s, a second does not
    zero = [p for p in plans if p["class"] == "rpi-zero2w" and p["status"] != "dropout"]
    partial = [p for p in zero if p["steps_total"] > 1]
    assert partial and all(p["status"] == "partial" and p["trained_steps"] == 1 for p in partial)
    assert all(p["status"] == "ok" for p in zero if p["steps_total"] == 1)  # a small shard fits whole
    assert all(p["status"] in ("ok", "dropout") for p in plans if p["class"] == "rpi5")
    fractions = [r["device_classes"]["rpi-zero2w"]["mean_work_fraction"] for r in rows[1:]
                 if "rpi-zero2w" in r["device_classes"]]
    assert fractions and all(f < 1 for f in fractions)
    assert sum(r["stragglers"] for r in rows[1:]) == len(partial)
    # batch 512 needs ~134 MiB; a Zero 2 W has 89 MiB for tensors, so it trains at batch 256
    for r in rows[1:]:
        zeros = {k for k, p in r["device_clients"].items() if p["class"] == "rpi-zero2w"}
        assert set(r["memory_adapted"]) == zeros
        assert all(a == {"status": "reduced-batch", "mode": "fine-tune", "batch_size": 256}
                   for a in r["memory_adapted"].values())
        assert r["excluded_memory"] == 0


def test_offline_pis_are_never_selected(pi_run: Path) -> None:
    fleet = Fleet.from_mix(8, {"rpi-zero2w": 0.5, "rpi5": 0.5}, seed=0, availability="churn")
    previous, offline_seen = 0.0, 0
    for r in RunDir(pi_run).read_metrics()[1:]:
        start = previous + r["idle_sim_seconds"]
        online = set(fleet.available(start).tolist())
        assert set(r["selected"]) <= online
        offline_seen += 8 - len(online)
        previous = r["sim_time_h"] * 3600
    assert offline_seen > 0  # churn really took devices offline, so the check above had teeth


@pytest.mark.slow  # 70 s; fleets and resume each have a default test (test_pi_fleet_rows..., test_simulation)
def test_trace_fleet_runs_and_resume_continues_the_clock(tmp_path: Path, tiny_teacher: tuple[Path, dict]) -> None:
    run = _run(tmp_path, "trace", TRACE_FLEET, tiny_teacher[0])
    r = _simulate(["--resume", str(run), "--rounds", "3"], tmp_path / "cache")
    assert "resuming" in r.stdout and json.loads((run / "config.json").read_text())["run"]["rounds"] == 3
    rows = RunDir(run).read_metrics()
    assert [x["round"] for x in rows] == [0, 1, 2, 3]
    _check_clock(rows, deadline=2.0)  # round 3 starts exactly where round 2's clock stopped
    _check_accounting(rows)
    # host throughput was measured once at the start and restored, not re-measured, on resume
    measured = [x["host_samples_per_s"] for x in rows[1:]]
    assert measured[0] and all(m == measured[0] for m in measured)
    assert all(v > 0 and math.isfinite(v) for v in measured[0].values())
    # availability from the trace: client 9 is online from t = 3600 s only, the runs end well before
    fleet = load_trace(TRACE)
    previous = 0.0
    for x in rows[1:]:
        assert set(x["selected"]) <= set(fleet.available(previous + x["idle_sim_seconds"]).tolist())
        assert 9 not in x["selected"]
        previous = x["sim_time_h"] * 3600
    assert previous < 3600
    # phones train at their trace speed (38 and 83.8 samples/s): a 2 s deadline drops the slow ones' work
    classes = {c for x in rows[1:] for c in x["device_classes"]}
    assert classes <= {"rpi5", "rpi4", "rpi3b+", "rpi-zero2w", "jetson-nano", "phone-low", "phone-mid"}
    assert sum(x["late"] for x in rows[1:]) >= 1
    assert all(0.0 <= x[f"class_accuracy/{c}"] <= 1.0 for x in rows[1:] for c in x["device_classes"])
