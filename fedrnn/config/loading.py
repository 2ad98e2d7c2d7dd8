"""Reading a config: TOML files (with ``extends``), ``--set`` items and flags; each value checked, errors
blamed on where the value came from."""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedrnn.config.errors import ConfigError, _check, _show
from fedrnn.config.sections import RunConfig


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
    if typing.get_origin(hint) is list:
        _check(isinstance(value, list), key, "must be a list", value)
        return [_coerce(f"{key}[{i}]", v, typing.get_args(hint)[0]) for i, v in enumerate(value)]
    if hint is bool:
        _check(isinstance(value, bool), key, "must be true or false", value)
    elif hint is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, "must be an integer", value)
    elif hint is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, "must be a number", value)
        _check(not isinstance(value, int) or abs(value) <= 2**1000, key, "must be finite", value)  # float() overflows
        value = float(value)
        _check(math.isfinite(value), key, "must be finite", value)
    elif hint is str:
        _check(isinstance(value, str), key, "must be a string", value)
    return value


def _apply(section_obj: Any, section: str, values: dict[str, Any]) -> None:
    hints = typing.get_type_hints(type(section_obj))
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown key {section}.{key}; known keys: {', '.join(sorted(hints))}",
                              f"{section}.{key}")
        setattr(section_obj, key, _coerce(f"{section}.{key}", value, hints[key]))


def config_from_dict(data: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
    """Overlay a nested dict (as parsed from TOML) onto ``base`` (default: defaults); validates."""
    cfg = dataclasses.replace(base) if base else RunConfig()
    cfg = RunConfig(**{f.name: dataclasses.replace(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)})
    sections = {f.name for f in dataclasses.fields(cfg)}
    for section, values in data.items():
        if section not in sections:
            raise ConfigError(f"unknown config section [{section}]; known sections: {', '.join(sorted(sections))}",
                              str(section))
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of key = value pairs, got {_show(values)}", str(section))
        _apply(getattr(cfg, section), section, values)
    return cfg.validate()


def dump_toml(data: dict[str, dict[str, Any]]) -> str:
    """TOML text of ``{section: {key: value}}``, the inverse of what ``load_config`` reads.

    Values are numbers, strings, booleans, lists of those, or flat tables (written inline,
    as ``mix = { rpi4 = 0.5 }``); JSON's spelling of these is valid TOML.
    """

    def value(v: Any) -> str:
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(str(k))} = {value(x)}" for k, x in v.items()) + " }"
        return json.dumps(v)

    return "".join(f"[{s}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in kv.items()) + "\n" for s, kv in data.items())


@dataclass
class Overrides:
    """Values set on top of the TOML file, each with where it came from (``--set run.alpha=-2``).

    ``load_config`` blames a bad value on its origin, so an error in a command-line value never
    points at the file.
    """

    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)  # "run.alpha" -> "--alpha -2.0"

    def add(self, key: str, value: Any, origin: str) -> None:
        section, dot, name = key.partition(".")
        if not (section and dot and name):
            raise ConfigError(f"{origin}: expected section.key (e.g. client.lr), got {key!r}", key)
        self.values.setdefault(section, {})[name] = value
        self.origins[key] = origin


def parse_value(text: str) -> Any:
    """A command-line value read as a TOML value (``0.01``, ``true``, ``[1, 2]``, ``{rpi4 = 1.0}``).

    Text that is not a TOML value is taken as a plain string, so ``run.target=imdb`` needs no quotes.
    """
    try:
        parsed = tomllib.loads(f"x = {text}")
    except tomllib.TOMLDecodeError:
        return text
    return parsed["x"] if parsed.keys() == {"x"} else text  # "1\ny = 2" is two keys, not one value


def _takes_text(key: str) -> bool:
    """Whether ``section.key`` is a string-valued config key (``run.teacher``, ``simulation.ray_address``)."""
    section, _, name = key.partition(".")
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    if section not in fields:
        return False
    return typing.get_type_hints(fields[section].default_factory).get(name) is str


def parse_set(items: Iterable[str], overrides: Overrides | None = None) -> Overrides:
    """``--set section.key=value`` items (repeatable; the last one for a key wins) as overrides.

    A string-valued key takes the text as it is (``run.teacher=2024`` is the directory "2024").
    """
    out = overrides if overrides is not None else Overrides()
    for item in items:
        key, eq, text = item.partition("=")
        if not eq:
            raise ConfigError(f"--set {item}: expected section.key=value (e.g. client.lr=0.01)")
        key, value = key.strip(), parse_value(text.strip())
        out.add(key, text.strip() if _takes_text(key) and not isinstance(value, str) else value, f"--set {item}")
    return out


def _blame(e: ConfigError, origins: Mapping[str, str], fallback: str) -> str:
    """Where the value an error is about came from: the origin of its key, else ``fallback``."""
    def related(key: str, other: str) -> bool:  # the same key, or one inside the other (devices.mix.rpi4)
        return any(a == b or a.startswith((b + ".", b + "[")) for a, b in ((key, other), (other, key)))

    keys = [k for k in e.key.split("/") if k]
    hits = list(dict.fromkeys(o for k, o in origins.items() if any(related(x, k) for x in keys)))
    return ", ".join(hits) or fallback


def _overlay(cfg: RunConfig, data: dict[str, Any], origins: Mapping[str, str], fallback: str) -> RunConfig:
    try:
        return config_from_dict(data, cfg)
    except ConfigError as e:
        raise ConfigError(f"{_blame(e, origins, fallback)}: {e}", e.key) from None


def read_toml(path: str | Path, _chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[str, str]]:
    """A config file's tables over those of the file it ``extends`` (recursively), and each key's file.

    ``extends = "default.toml"`` (top level, relative to the file) takes every key of that file;
    this file's keys replace those with the same ``section.key`` (a table value is replaced whole).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    if p.resolve() in _chain:
        cycle = " -> ".join(str(c) for c in (*_chain, p.resolve()))
        raise ConfigError(f"{p}: extends forms a cycle: {cycle}")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid TOML ({e})") from e
    own = {f"{s}.{k}": str(p) for s, kv in data.items() if isinstance(kv, dict) for k in kv}
    if "extends" not in data:
        return data, own
    base_name = data.pop("extends")
    if not isinstance(base_name, str) or not base_name:
        raise ConfigError(f"{p}: extends must be the path of a config file, got {_show(base_name)}")
    base_path = p.parent / base_name
    if not base_path.is_file():
        raise ConfigError(f"{p}: extends {base_name!r}, but config file {base_path} does not exist")
    merged, origins = read_toml(base_path, (*_chain, p.resolve()))
    for section, values in data.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged, origins | own


def apply_overrides(cfg: RunConfig, overrides: Overrides | dict[str, Any] | None) -> RunConfig:
    """``cfg`` with ``overrides`` on top, validated; an error names the override's origin.

    A rule over several keys broken only by the overrides (``--clients 5`` under a file's
    ``clients_per_round = 10``) is blamed on the overrides, since the layer below was valid.
    Plain dicts (``{"run": {"clients": 10}}``) are overrides whose origin is just "override".
    """
    if not isinstance(overrides, Overrides):
        overrides = Overrides(overrides or {})
    fallback = ", ".join(dict.fromkeys(overrides.origins.values())) or "override"
    return _overlay(cfg, overrides.values, overrides.origins, fallback)


def load_config(path: str | Path | None = None, overrides: Overrides | dict[str, Any] | None = None) -> RunConfig:
    """Defaults, then the TOML file (over the files it extends), then ``overrides``; validated.

    A bad value is reported with its origin: the file (in an ``extends`` chain, the file that set
    the key) or the flag that set it (``--set run.alpha=-2: run.alpha must be ...``).
    """
    data, file_origins = read_toml(path) if path is not None else ({}, {})
    return apply_overrides(_overlay(RunConfig(), data, file_origins, str(path)), overrides)


def extend_rounds(cfg: RunConfig, rounds: Any, origin: str) -> RunConfig:
    """A started run's config with more rounds: the one change a resumed run accepts.

    Refused where differential privacy was planned over the run's rounds (record-level
    ``planned_rounds = 0``, calibrated client-level noise): more rounds would change the noise mid-run.
    """
    new = apply_overrides(cfg, Overrides({"run": {"rounds": rounds}}, {"run.rounds": origin}))
    had, p = cfg.run.rounds, cfg.privacy
    if new.run.rounds < had:
        raise ConfigError(f"{origin}: run.rounds can only grow when resuming; the run has {had} rounds", "run.rounds")
    planned = (p.record_level and not p.planned_rounds) or (p.client_level != "off" and not p.clients_noise_multiplier)
    if new.run.rounds > had and planned:
        raise ConfigError(f"{origin}: run.rounds cannot grow: this run's differential privacy was planned over its "
                          f"{had} rounds, and more would change its noise mid-run; start a new run instead",
                          "run.rounds")
    return new
