"""Configuration: files (and what they extend), command-line overrides, every bad value named by key and origin."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from fedrnn.config import ConfigError, RunConfig, config_from_dict, load_config, parse_set, parse_value
from fedrnn.federation.prepare import prepare_run
from fedrnn.federation.rundir import RunDir
from fedrnn.simulate import DEFAULT_CONFIG as DEFAULT
from fedrnn.simulate import main, new_run, overrides_from_args, parse_args, resume_run

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
        ({"server": {"keep_checkpoints": -1}}, "server.keep_checkpoints"),
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


# ---------------------------------------------------------------- --set and the named flags


@pytest.mark.parametrize(("text", "value"), [
    ("0.01", 0.01), ("3", 3), ("true", True), ("imdb", "imdb"), ('"fine-tune"', "fine-tune"), ("", ""),
    ("[1, 2]", [1, 2]), ("{rpi4=0.5, rpi5=0.5}", {"rpi4": 0.5, "rpi5": 0.5}),
    ("1\ny = 2", "1\ny = 2"),  # two TOML keys are not one value: kept as text (and then refused by its key's type)
])
def test_set_values_are_toml_values_else_strings(text: str, value: object) -> None:
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_set_reaches_nested_keys_and_tables() -> None:
    cfg = load_config(ROOT / "configs" / "tiny.toml", parse_set(
        ["client.lr=0.01", "devices.enabled=true", "devices.mix={rpi4=0.5, rpi5=0.5}", "run.target=imdb",
         "client.lr = 0.02"]))  # the last --set of a key wins; spaces around '=' are fine
    assert cfg.client.lr == 0.02 and cfg.run.target == "imdb"
    assert cfg.devices.enabled and cfg.devices.mix == {"rpi4": 0.5, "rpi5": 0.5}
    assert cfg.run.clients == 8  # the file's other keys stay
    cfg = load_config(None, parse_set(["run.teacher=2024", "simulation.ray_address=10.0.0.1:6379", "run.seed=7"]))
    assert (cfg.run.teacher, cfg.simulation.ray_address, cfg.run.seed) == ("2024", "10.0.0.1:6379", 7)


@pytest.mark.parametrize(("argv", "message"), [
    (["--set", "run.alpha=-2"], "--set run.alpha=-2: run.alpha must be a finite number > 0, got -2.0"),
    (["--alpha", "-2"], "--alpha -2.0: run.alpha must be a finite number > 0, got -2.0"),
    (["--set", "client.lr=fast"], "--set client.lr=fast: client.lr must be a number, got 'fast'"),
    (["--set", "devices.enabled=true", "--set", "devices.mix={pi9=1.0}"],
     "--set devices.mix={pi9=1.0}: devices.mix.pi9 is not a device profile"),
    (["--set", "run.colour=red"], "--set run.colour=red: unknown key run.colour"),
    (["--set", "telemetry.enabled=true"], "--set telemetry.enabled=true: unknown config section [telemetry]"),
    (["--set", "lr=0.1"], "--set lr=0.1: expected section.key"),
    (["--set", "client.lr"], "--set client.lr: expected section.key=value"),
    # a rule over two keys broken by a flag alone is the flag's fault, not the file's
    (["--clients", "5"], "--clients 5: run.clients_per_round must be in [1, run.clients=5], got 10"),
    (["--set", "attack.clients=101"], "--set attack.clients=101: attack.clients must be <= run.clients = 100"),
])
def test_command_line_errors_name_the_flag_not_the_file(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        load_config(DEFAULT, overrides_from_args(parse_args(argv)))
    assert "default.toml" not in str(e.value)


def test_main_exits_with_the_command_line_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=re.escape("config error: --set run.alpha=-2: run.alpha must be")):
        main(["--set", "run.alpha=-2", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()  # nothing created for a config that does not validate


def test_help_names_the_module_and_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: python -m fedrnn.simulate")
    assert "--set SECTION.KEY=VALUE" in out and "--overwrite" in out and "{fedavg,fedavgm," in out
    assert "clients_target_epsilon" in out and "error_feedback" in out  # the keys --set reaches are listed
    with pytest.raises(SystemExit):
        parse_args(["--strategy", "fedsgd"])
    assert "invalid choice: 'fedsgd'" in capsys.readouterr().err
    assert parse_args(["--target", "data/my_reviews.jsonl"]).target == "data/my_reviews.jsonl"  # not a choices list


# ---------------------------------------------------------------- extends


def test_student_config_is_default_plus_its_own_sections() -> None:
    """``student.toml`` extends default.toml: the same config as the file that repeated all of default's keys."""
    student = (ROOT / "configs" / "student.toml").read_text()
    assert student.count("extends = \"default.toml\"") == 1 and "[run]" not in student
    spelled_out = (ROOT / "configs" / "default.toml").read_text() + "\n" + student.replace(
        'extends = "default.toml"', "")
    old = config_from_dict(tomllib.loads(spelled_out))
    assert load_config(ROOT / "configs" / "student.toml").to_dict() == old.to_dict()
    assert old.distill.enabled and old.compression.uplink == "int8" and old.run.clients == 100


def test_extends_chains_override_key_by_key(tmp_path: Path) -> None:
    (tmp_path / "base.toml").write_text('[run]\nclients = 20\nrounds = 3\n[devices]\nmix = {rpi4 = 0.5, rpi5 = 0.5}\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mid.toml").write_text('extends = "../base.toml"\n[run]\nrounds = 4\n[client]\nlr = 0.05\n')
    (tmp_path / "top.toml").write_text('extends = "sub/mid.toml"\n[client]\nbatch_size = 4\n[devices]\n'
                                       'enabled = true\nmix = {"rpi3b+" = 1.0}\n')
    cfg = load_config(tmp_path / "top.toml")
    assert (cfg.run.clients, cfg.run.rounds, cfg.client.lr, cfg.client.batch_size) == (20, 4, 0.05, 4)
    assert cfg.devices.mix == {"rpi3b+": 1.0}  # a table value is replaced whole, not merged


def test_extends_errors(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n[run]\nrounds = 2\n')
    with pytest.raises(ConfigError, match=r"extends forms a cycle: .*a\.toml -> .*b\.toml -> .*a\.toml"):
        load_config(tmp_path / "a.toml")
    (tmp_path / "c.toml").write_text('extends = "missing.toml"\n')
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'c.toml'}: extends 'missing.toml', but config file "
                                                    f"{tmp_path / 'missing.toml'} does not exist")):
        load_config(tmp_path / "c.toml")
    (tmp_path / "d.toml").write_text("extends = 3\n")
    with pytest.raises(ConfigError, match=r"d\.toml: extends must be the path of a config file, got 3"):
        load_config(tmp_path / "d.toml")
    # a bad value is blamed on the file in the chain that set it
    (tmp_path / "base.toml").write_text("[client]\nlr = -3\n")
    (tmp_path / "child.toml").write_text('extends = "base.toml"\n[run]\nrounds = 2\n')
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'base.toml'}: client.lr must be in (0, 10)")):
        load_config(tmp_path / "child.toml")


# ---------------------------------------------------------------- cross-field rules, files


@pytest.mark.parametrize(("overrides", "message"), [
    ({"attack": {"clients": 9}}, "attack.clients must be <= run.clients = 8, got 9"),
    ({"faults": {"crash_clients": [8]}}, "faults.*_clients must hold client ids < run.clients = 8, got [8]"),
    ({"run": {"strategy": "krum"}, "privacy": {"client_level": "fixed", "clients_noise_multiplier": 1.0}},
     "run.strategy must be fedavg or fedprox with privacy.client_level = 'fixed'"),
])
def test_cross_field_rules_are_config_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(ROOT / "configs" / "tiny.toml", overrides)


def test_validation_reads_no_files_and_prepare_checks_them(tmp_path: Path) -> None:
    cfg = load_config(None, {"devices": {"enabled": True, "trace": str(tmp_path / "no-such-trace.csv")}})
    assert cfg.devices.trace.endswith("no-such-trace.csv")
    with pytest.raises(ConfigError, match=re.escape(f"devices.trace: trace file {tmp_path / 'no-such-trace.csv'} "
                                                    "does not exist")):
        prepare_run(cfg, tmp_path / "run")  # before the teacher, the data or the run directory
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit, match="config error: devices.trace: trace file"):
        main(["--config", str(ROOT / "configs" / "tiny.toml"), "--out", str(tmp_path / "run"),
              "--set", "devices.enabled=true", "--set", f"devices.trace='{tmp_path / 'no-such-trace.csv'}'"])
    assert not (tmp_path / "run").exists()  # no half-made run directory to --resume or --overwrite


# ---------------------------------------------------------------- --out and --resume


def _new_run(out: Path, *argv: str) -> RunConfig:
    return new_run(parse_args(["--config", str(ROOT / "configs" / "tiny.toml"), "--out", str(out), *argv])).cfg


def test_out_refuses_a_run_directory_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _new_run(out)
    rd = RunDir(out)
    rd.append_metrics({"round": 0, "target_accuracy": 0.5})
    (out / "checkpoints" / "round_001.safetensors").write_bytes(b"x")
    (out / "accuracy.png").write_bytes(b"x")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match=re.escape(f"--out {out} already holds a run (config.json, metrics.jsonl): "
                                                   f"continue it with --resume {out}")):
        _new_run(out, "--seed", "3")
    assert rd.read_metrics() and rd.config()["run"]["seed"] == 0  # untouched
    assert _new_run(out, "--seed", "3", "--overwrite").run.seed == 3
    assert rd.config()["run"]["seed"] == 3 and not rd.metrics_path.exists()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json", "notes.txt"]
    assert not any((out / "checkpoints").iterdir())
    (tmp_path / "metrics-only").mkdir()
    RunDir(tmp_path / "metrics-only").append_metrics({"round": 0})
    with pytest.raises(SystemExit, match="already holds a run"):
        _new_run(tmp_path / "metrics-only")


def test_resume_refuses_changes_but_more_rounds(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _new_run(out)

    def resume(*argv: str) -> RunConfig:
        return resume_run(parse_args(["--resume", str(out), *argv])).cfg

    with pytest.raises(SystemExit, match=re.escape("cannot take --clients 5, --set client.lr=0.1. Only more rounds")):
        resume("--clients", "5", "--set", "client.lr=0.1")
    with pytest.raises(SystemExit, match="cannot take --config, --out"):
        resume("--config", "configs/tiny.toml", "--out", str(tmp_path / "x"))
    with pytest.raises(ConfigError, match=re.escape("--rounds 1: run.rounds can only grow when resuming; the run has")):
        resume("--rounds", "1")
    assert resume().run.rounds == 2
    assert resume("--rounds", "5").run.rounds == 5 and RunDir(out).config()["run"]["rounds"] == 5  # kept for later
    assert resume("--set", "run.rounds=6").run.rounds == 6
    with pytest.raises(ConfigError, match="--set run.rounds=many: run.rounds must be an integer"):
        resume("--set", "run.rounds=many")
    with pytest.raises(SystemExit, match="no config.json there"):
        resume_run(parse_args(["--resume", str(tmp_path / "nothing")]))


def test_resume_does_not_stretch_a_privacy_plan(tmp_path: Path) -> None:
    out = tmp_path / "dp"
    _new_run(out, "--set", "privacy.record_level=true", "--set", "privacy.target_epsilon=8")
    with pytest.raises(ConfigError, match="differential privacy was planned over its 2 rounds"):
        resume_run(parse_args(["--resume", str(out), "--rounds", "4"]))
    out = tmp_path / "dp-planned"
    _new_run(out, "--set", "privacy.record_level=true", "--set", "privacy.target_epsilon=8",
             "--set", "privacy.planned_rounds=10")
    assert resume_run(parse_args(["--resume", str(out), "--rounds", "4"])).cfg.run.rounds == 4
