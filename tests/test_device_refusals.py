"""A real device's own rules, through a real SuperLink and SuperNode (``tests/test_deployment.py``'s machinery).

A device refuses record-level DP weaker than its node config's policy; the run goes on and records
the refusal, with its reason, in its metrics. The same path runs without processes in
``tests/test_privacy_threats.py`` (``test_client_app_refuses_before_it_trains``, which also covers a
deployed ClientApp refusing fault and attack instructions: a stock fedrnn server cannot address a
fault to a SuperNode any more, since ``[faults]`` ids must be below ``run.clients``, so only a
modified server could send one; ``test_server_records_refusals_and_drops_them``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_deployment import Fleet, device_files, fleet, rows, wait_for, write_config  # noqa: F401 - fixtures

START_S = 90


def _one_device(fl: Fleet, data: Path, teacher: Path, policy: dict) -> int:
    """Register and start one device with ``policy`` in its node config; its node id."""
    key = fl.register("pi0")
    fl.start_node("pi0", key, {"data-path": str(data), "teacher-path": str(teacher),
                               "state-dir": str(fl.tmp / "state"), "threads": 1, **policy})
    node = fl.node_ids["pi0"]
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
