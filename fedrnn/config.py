"""Run configuration: TOML files in ``configs/`` plus command-line overrides, all validated.

Every value is checked where it is read; an error names the key (``client.lr``) and says
what was wrong, so a typo in a 40-line config never surfaces as a stack trace mid-run.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedrnn.models import TRANSFER_MODES

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum", "multikrum")
TARGETS = ("amazon", "imdb")
DEADLINE_POLICIES = ("drop", "partial", "wait")


class ConfigError(ValueError):
    """A configuration value or file is invalid; the message names the key or file."""


def _check(cond: bool, key: str, msg: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{key} {msg}, got {value!r}")


@dataclass
class RunSection:
    clients: int = 100
    rounds: int = 20
    clients_per_round: int = 10
    seed: int = 0
    target: str = "amazon"
    alpha: float = 1.0
    mode: str = "fine-tune"
    strategy: str = "fedavg"
    teacher: str = ""  # checkpoint dir; "" = cache/teacher, pretrained on first use
    data_dir: str = ""  # "" = $FEDRNN_DATA_DIR or ./data
    min_client_examples: int = 4

    def validate(self) -> None:
        _check(self.clients >= 1, "run.clients", "must be >= 1", self.clients)
        _check(self.rounds >= 1, "run.rounds", "must be >= 1", self.rounds)
        _check(1 <= self.clients_per_round <= self.clients, "run.clients_per_round",
               f"must be in [1, run.clients={self.clients}]", self.clients_per_round)
        _check(self.target in TARGETS, "run.target", f"must be one of {TARGETS}", self.target)
        _check(self.alpha > 0 and math.isfinite(self.alpha), "run.alpha", "must be a finite number > 0", self.alpha)
        _check(self.mode in TRANSFER_MODES, "run.mode", f"must be one of {TRANSFER_MODES}", self.mode)
        _check(self.strategy in STRATEGIES, "run.strategy", f"must be one of {STRATEGIES}", self.strategy)
        _check(self.min_client_examples >= 2, "run.min_client_examples", "must be >= 2", self.min_client_examples)


@dataclass
class ClientSection:
    local_epochs: int = 1
    batch_size: int = 16
    lr: float = 1e-3
    max_steps: int = 0  # 0 = no cap beyond local_epochs
    proximal_mu: float = 0.01  # FedProx only
    clip_norm: float = 1.0
    holdout_fraction: float = 0.2  # of each shard, for federated evaluation

    def validate(self) -> None:
        _check(self.local_epochs >= 1, "client.local_epochs", "must be >= 1", self.local_epochs)
        _check(self.batch_size >= 1, "client.batch_size", "must be >= 1", self.batch_size)
        _check(0 < self.lr < 10 and math.isfinite(self.lr), "client.lr", "must be in (0, 10)", self.lr)
        _check(self.max_steps >= 0, "client.max_steps", "must be >= 0", self.max_steps)
        _check(self.proximal_mu >= 0, "client.proximal_mu", "must be >= 0", self.proximal_mu)
        _check(self.clip_norm > 0, "client.clip_norm", "must be > 0", self.clip_norm)
        _check(0 < self.holdout_fraction < 1, "client.holdout_fraction", "must be in (0, 1)", self.holdout_fraction)


@dataclass
class ServerSection:
    server_lr: float = 0.01  # FedAdam/FedYogi eta
    eval_every: int = 1
    retention_examples: int = 500  # fixed IMDB test subset for source retention
    target_test_examples: int = 0  # 0 = the whole target test split
    fraction_evaluate: float = 1.0  # of the round's sampled clients that evaluate
    timeout_s: float = 600.0  # bound on waiting for one round's replies
    trimmed_beta: float = 0.2
    krum_byzantine: int = 1

    def validate(self) -> None:
        _check(self.server_lr > 0, "server.server_lr", "must be > 0", self.server_lr)
        _check(self.eval_every >= 1, "server.eval_every", "must be >= 1", self.eval_every)
        _check(self.retention_examples >= 0, "server.retention_examples", "must be >= 0", self.retention_examples)
        _check(self.target_test_examples >= 0, "server.target_test_examples", "must be >= 0", self.target_test_examples)
        _check(0 <= self.fraction_evaluate <= 1, "server.fraction_evaluate", "must be in [0, 1]", self.fraction_evaluate)
        _check(self.timeout_s > 0, "server.timeout_s", "must be > 0", self.timeout_s)
        _check(0 <= self.trimmed_beta < 0.5, "server.trimmed_beta", "must be in [0, 0.5)", self.trimmed_beta)
        _check(self.krum_byzantine >= 0, "server.krum_byzantine", "must be >= 0", self.krum_byzantine)


@dataclass
class SimulationSection:
    actors: int = 2  # concurrent ClientApp workers (Ray actors)
    threads_per_actor: int = 1  # torch intra-op threads in each worker
    ray_address: str = ""  # "" = start a local Ray; "auto" or "HOST:PORT" attaches to a cluster

    def validate(self) -> None:
        _check(self.actors >= 1, "simulation.actors", "must be >= 1", self.actors)
        _check(self.threads_per_actor >= 1, "simulation.threads_per_actor", "must be >= 1", self.threads_per_actor)


@dataclass
class DevicesSection:
    """Simulated device fleet (see ``fedrnn.devices``); off = every client is an ideal device."""

    enabled: bool = False
    mix: dict[str, float] = field(default_factory=dict)  # profile -> fraction, e.g. {rpi4 = 0.5, rpi5 = 0.5}
    trace: str = ""  # CSV/JSON trace file instead of a mix
    network: str = ""  # "" = each profile's own; wifi | 4g | 3g
    availability: str = ""  # "" = each profile's own; always | diurnal | churn
    policy: str = "wait"  # drop | partial | wait
    deadline_s: float = 0.0  # needed by drop and partial
    host_samples_per_s: float = 0.0  # 0 = measure this host once at the start of the run
    min_batch_size: int = 4
    per_class_eval: bool = True  # global model accuracy on each device class's held-out data

    def validate(self) -> None:
        if not self.enabled:
            return
        _check(bool(self.mix) != bool(self.trace), "devices.mix/devices.trace", "needs exactly one of them",
               (self.mix, self.trace))
        for name, frac in self.mix.items():
            _check(frac >= 0, f"devices.mix.{name}", "must be >= 0", frac)
        _check(self.policy in DEADLINE_POLICIES, "devices.policy", f"must be one of {DEADLINE_POLICIES}", self.policy)
        _check(self.policy == "wait" or self.deadline_s > 0, "devices.deadline_s",
               f"must be > 0 with policy {self.policy!r}", self.deadline_s)
        _check(self.host_samples_per_s >= 0, "devices.host_samples_per_s", "must be >= 0", self.host_samples_per_s)
        _check(self.min_batch_size >= 1, "devices.min_batch_size", "must be >= 1", self.min_batch_size)


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    client: ClientSection = field(default_factory=ClientSection)
    server: ServerSection = field(default_factory=ServerSection)
    simulation: SimulationSection = field(default_factory=SimulationSection)
    devices: DevicesSection = field(default_factory=DevicesSection)

    def validate(self) -> RunConfig:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        return self

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check a TOML value against a field's type; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        hint = args[0]
    if typing.get_origin(hint) is dict:
        _check(isinstance(value, dict), key, "must be a table", value)
        return {str(k): _coerce(f"{key}.{k}", v, typing.get_args(hint)[1]) for k, v in value.items()}
    if hint is bool:
        _check(isinstance(value, bool), key, "must be true or false", value)
    elif hint is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, "must be an integer", value)
    elif hint is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, "must be a number", value)
        value = float(value)
        _check(math.isfinite(value), key, "must be finite", value)
    elif hint is str:
        _check(isinstance(value, str), key, "must be a string", value)
    return value


def _apply(section_obj: Any, section: str, values: dict[str, Any]) -> None:
    hints = typing.get_type_hints(type(section_obj))
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown key {section}.{key}; known keys: {', '.join(sorted(hints))}")
        setattr(section_obj, key, _coerce(f"{section}.{key}", value, hints[key]))


def config_from_dict(data: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
    """Overlay a nested dict (as parsed from TOML) onto ``base`` (default: defaults); validates."""
    cfg = dataclasses.replace(base) if base else RunConfig()
    cfg = RunConfig(**{f.name: dataclasses.replace(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)})
    sections = {f.name for f in dataclasses.fields(cfg)}
    for section, values in data.items():
        if section not in sections:
            raise ConfigError(f"unknown config section [{section}]; known sections: {', '.join(sorted(sections))}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of key = value pairs, got {values!r}")
        _apply(getattr(cfg, section), section, values)
    return cfg.validate()


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults, then the TOML file, then ``overrides`` (``{"run": {"clients": 10}}``)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: not valid TOML ({e})") from e
    try:
        cfg = config_from_dict(data)
        return config_from_dict(overrides or {}, cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
