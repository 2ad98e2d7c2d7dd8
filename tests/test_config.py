"""Configuration: files, overrides and every bad value named by its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedrnn.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.toml")))
def test_shipped_configs_are_valid(name: str) -> None:
    load_config(ROOT / "configs" / name)


def test_overrides_apply() -> None:
    cfg = load_config(ROOT / "configs" / "tiny.toml", {"run": {"clients": 12, "alpha": 1}})
    assert cfg.run.clients == 12 and cfg.run.alpha == 1.0 and isinstance(cfg.run.alpha, float)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"run": {"clients": 0}}, "run.clients"),
        ({"run": {"clients_per_round": 500}}, "run.clients_per_round"),
        ({"run": {"alpha": -1.0}}, "run.alpha"),
        ({"run": {"alpha": float("nan")}}, "run.alpha"),
        ({"run": {"mode": "partial"}}, "run.mode"),
        ({"run": {"strategy": "fedsgd"}}, "run.strategy"),
        ({"run": {"rounds": "ten"}}, "run.rounds"),
        ({"run": {"rounds": True}}, "run.rounds"),
        ({"client": {"lr": 0.0}}, "client.lr"),
        ({"server": {"server_momentum": 1.0}}, "server.server_momentum"),
        ({"client": {"batch_size": 0}}, "client.batch_size"),
        ({"client": {"holdout_fraction": 1.0}}, "client.holdout_fraction"),
        ({"run": {"colour": "red"}}, "run.colour"),
        ({"extra": {"x": 1}}, "[extra]"),
        ({"devices": {"enabled": True}}, "devices.mix/devices.trace"),
        ({"devices": {"enabled": True, "mix": {"rpi4": 1.0}, "policy": "drop"}}, "devices.deadline_s"),
    ],
)
def test_bad_values_are_named(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[").replace("]", r"\]")):
        load_config(None, overrides)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nclients = 3")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(bad)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("[client]\nlr = -3\n")
    with pytest.raises(ConfigError, match=r"wrong\.toml: client\.lr"):
        load_config(wrong)
