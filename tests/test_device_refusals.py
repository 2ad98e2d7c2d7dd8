"""A real device's own rules, through a real SuperLink and SuperNode (``tests/test_deployment.py``'s machinery).

A device refuses record-level DP weaker than its node config's policy, and a deployed ClientApp
refuses fault instructions; the run goes on and records both, with reasons, in its metrics. The
same checks run without processes in ``tests/test_privacy_threats.py``
(``test_client_app_refuses_before_it_trains``, ``test_server_records_refusals_and_drops_them``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_deployment import Fleet, device_files, fleet, rows, wait_for, write_config  # noqa: F401 - fixtures

START_S = 90
TOML_INT_MAX = 2**63 - 1  # a node id above this cannot be written in the run config's [faults] list


def _one_device(fl: Fleet, data: Path, teacher: Path, policy: dict, tries: int = 8) -> int:
    """Register and start one device (with ``policy`` in its node config); its node id, which TOML can hold."""
    for i in range(tries):
        key = fl.register(f"pi{i}")
        node = fl.node_ids[f"pi{i}"]
        if node <= TOML_INT_MAX:
            break
        del fl.node_ids[f"pi{i}"]
    else:
        pytest.fail(f"no node id below 2**63 in {tries} registrations")
    fl.start_node(f"pi{i}", key, {"data-path": str(data), "teacher-path": str(teacher),
                                     "state-dir": str(fl.tmp / "state"), "threads": 1, **policy})
    wait_for("the SuperNode to be let in", lambda: node in fl.activated(), START_S, 0.5)
    return node


@pytest.mark.slow
def test_device_refuses_weaker_privacy(fleet: Fleet, device_files: list[Path],  # noqa: F811
                                       tiny_teacher: tuple[Path, dict]) -> None:
    teacher = tiny_teacher[0]
    _one_device(fleet, device_files[0], teacher, {"dp-required": True})
    run_dir = fleet.tmp / "run"
    config = write_config(fleet.tmp / "plain.toml", teacher, rounds=1, nodes=1, fraction_evaluate=0.0)
    fleet.finish_run(fleet.start_run(config, run_dir, 1))  # the server asks for no DP at all
    r = rows(run_dir)[1]
    assert r["dp_refused"] == 1 and r["trained"] == 0 and r["failures"] == 0, r
    assert "dp-required" in next(iter(r["dp_refused_reasons"].values()))
    assert not (fleet.tmp / "state").exists() or not list((fleet.tmp / "state").iterdir())  # nothing was trained


@pytest.mark.slow
def test_deployed_client_refuses_fault_instructions(fleet: Fleet, device_files: list[Path],  # noqa: F811
                                                    tiny_teacher: tuple[Path, dict]) -> None:
    teacher = tiny_teacher[0]
    node = _one_device(fleet, device_files[0], teacher, {})
    run_dir = fleet.tmp / "run"
    config = write_config(fleet.tmp / "crash.toml", teacher, rounds=2, nodes=1, fraction_evaluate=0.0)
    config.write_text(config.read_text() + f"\n[faults]\ncrash_clients = [{node}]\nrounds = [1]\n")
    fleet.finish_run(fleet.start_run(config, run_dir, 1))
    got = rows(run_dir)
    assert got[1]["refused_instructions"] == 1 and got[1]["failures"] == 0 and got[1]["trained"] == 0, got[1]
    assert "fault" in got[1]["refused_instructions_reasons"][str(node)]
    assert got[2]["trained"] == 1 and got[2]["refused_instructions"] == 0  # alive, and training when asked honestly
