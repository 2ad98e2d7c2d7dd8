"""Loading a FedScale-like per-client device trace (CSV or JSON) into a :class:`Fleet`.

Trace file format (one client per CSV row or JSON object)
---------------------------------------------------------
==============  ========  =================================================================
column          required  meaning
==============  ========  =================================================================
client_id       yes       integer; the ids must be exactly 0..n-1 (they index data shards)
samples_per_s   one of    absolute training speed in samples/s for this model and batch
relative_speed  these     speed relative to this host (multiplies measured host throughput)
down_bps        yes       downlink bandwidth, bits/s, > 0
up_bps          yes       uplink bandwidth, bits/s, > 0
latency_s       yes       one-way setup latency per transfer, seconds, >= 0
active          yes       online intervals in seconds, ``start-end;start-end`` (sorted,
                          non-overlapping, start < end), or ``always``; in JSON also a list
                          of ``[start, end]`` pairs
period_s        no        the intervals repeat with this period (e.g. 86400 for a daily
                          pattern, as FedScale replays its traces); empty: no repetition
ram_bytes       no        memory usable for training; empty: unlimited
dropout_prob    no        probability of dropping out mid-round, in [0, 1); empty: 0
device_class    no        label used when aggregating metrics; empty: ``trace``
==============  ========  =================================================================

JSON: either a list of such objects or ``{"clients": [...]}``. Any bad value is rejected with
a :class:`DeviceError` naming the file, the row (CSV line number or JSON index), the column
and the problem. ``configs/fleets/example_trace.csv`` is a 10-client example built from the
profiles in :mod:`fedrnn.devices.profiles`: boards give ``relative_speed``, phones an absolute
``samples_per_s`` equal to relative speed x 288 samples/s (this host's measured fine-tune
throughput of the default model, batch 16, 256 tokens); networks and usable RAM are the
profiles' values (the Zero 2 W, with no published Wi-Fi measurement, borrows the Pi 3B+'s
24.5 Mbps); phones are online at night.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from fedrnn.devices.availability import AlwaysOn, Availability, TraceWindows
from fedrnn.devices.errors import DeviceError
from fedrnn.devices.fleet import Fleet

_REQUIRED = ("client_id", "down_bps", "up_bps", "latency_s", "active")
_OPTIONAL = ("samples_per_s", "relative_speed", "period_s", "ram_bytes", "dropout_prob", "device_class")


def load_trace(path: str | os.PathLike[str]) -> Fleet:
    """Parse and validate a trace file into a :class:`Fleet` (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DeviceError(f"trace file {path} does not exist")
    if path.suffix.lower() == ".csv":
        rows = _csv_rows(path)
    elif path.suffix.lower() == ".json":
        rows = _json_rows(path)
    else:
        raise DeviceError(f"{path}: trace must be .csv or .json, got {path.suffix!r}")
    if not rows:
        raise DeviceError(f"{path}: no clients")
    parsed = [_parse_row(values, where) for where, values in rows]
    seen: dict[int, str] = {}
    for (where, _), row in zip(rows, parsed, strict=True):
        if row["client_id"] in seen:
            raise DeviceError(f"{where}: duplicate client_id {row['client_id']} (first at {seen[row['client_id']]})")
        seen[row["client_id"]] = where
    missing = sorted(set(range(len(parsed))) - set(seen))
    if missing:
        raise DeviceError(f"{path}: client ids must be exactly 0..{len(parsed) - 1}; missing {missing[:10]}")
    parsed.sort(key=lambda r: r["client_id"])
    return Fleet(
        device_class=[r["device_class"] for r in parsed],
        network=["trace"] * len(parsed),
        relative_speed=np.array([r["relative_speed"] for r in parsed]),
        speed_samples_per_s=np.array([r["samples_per_s"] for r in parsed]),
        down_bps=np.array([r["down_bps"] for r in parsed]),
        up_bps=np.array([r["up_bps"] for r in parsed]),
        latency_s=np.array([r["latency_s"] for r in parsed]),
        ram_bytes=np.array([r["ram_bytes"] for r in parsed]),
        dropout_prob=np.array([r["dropout_prob"] for r in parsed]),
        availability=[r["availability"] for r in parsed],
    )


def _check_columns(columns: Iterable[str], where: str) -> None:
    cols = set(columns)
    missing = [c for c in _REQUIRED if c not in cols]
    if missing:
        raise DeviceError(f"{where}: missing column(s) {missing}")
    unknown = sorted(cols - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise DeviceError(f"{where}: unknown column(s) {unknown}; allowed: {list(_REQUIRED + _OPTIONAL)}")


def _csv_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise DeviceError(f"{path}: empty file (no header)")
        _check_columns(reader.fieldnames, f"{path}: header")
        rows = []
        for values in reader:
            where = f"{path}: line {reader.line_num}"
            if None in values or any(v is None for v in values.values()):
                raise DeviceError(
                    f"{where}: has {len(reader.fieldnames)} columns in the header but a different "
                    "number of fields in this row"
                )
            rows.append((where, values))
    return rows


def _json_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DeviceError(f"{path}: not valid JSON ({e})") from e
    if isinstance(data, dict):
        if set(data) != {"clients"}:
            raise DeviceError(f"{path}: a JSON object trace must have exactly the key 'clients', got {sorted(data)}")
        data = data["clients"]
    if not isinstance(data, list):
        raise DeviceError(f"{path}: expected a list of client objects")
    rows = []
    for i, values in enumerate(data):
        where = f"{path}: clients[{i}]"
        if not isinstance(values, dict):
            raise DeviceError(f"{where}: expected an object, got {type(values).__name__}")
        _check_columns(values, where)
        rows.append((where, values))
    return rows


def _blank(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v.strip() == "")


def _number(values: dict[str, Any], key: str, where: str, *, minimum: float, strict: bool) -> float:
    raw = values.get(key)
    if _blank(raw):
        raise DeviceError(f"{where}: column {key!r} is empty")
    try:
        x = float(raw)
    except (TypeError, ValueError):
        raise DeviceError(f"{where}: column {key!r} is not a number: {raw!r}") from None
    if not math.isfinite(x) or (x <= minimum if strict else x < minimum):
        raise DeviceError(f"{where}: column {key!r} must be {'>' if strict else '>='} {minimum:g}, got {raw!r}")
    return x


def _parse_row(values: dict[str, Any], where: str) -> dict[str, Any]:
    raw_id = values.get("client_id")
    try:
        cid = int(str(raw_id).strip())
    except ValueError:
        raise DeviceError(f"{where}: column 'client_id' is not an integer: {raw_id!r}") from None
    if cid < 0:
        raise DeviceError(f"{where}: column 'client_id' must be >= 0, got {cid}")
    has_abs, has_rel = not _blank(values.get("samples_per_s")), not _blank(values.get("relative_speed"))
    if has_abs == has_rel:
        raise DeviceError(f"{where}: give exactly one of 'samples_per_s' or 'relative_speed'")
    out: dict[str, Any] = {
        "client_id": cid,
        "samples_per_s": _number(values, "samples_per_s", where, minimum=0, strict=True) if has_abs else math.nan,
        "relative_speed": _number(values, "relative_speed", where, minimum=0, strict=True) if has_rel else math.nan,
        "down_bps": _number(values, "down_bps", where, minimum=0, strict=True),
        "up_bps": _number(values, "up_bps", where, minimum=0, strict=True),
        "latency_s": _number(values, "latency_s", where, minimum=0, strict=False),
        "ram_bytes": math.inf
        if _blank(values.get("ram_bytes"))
        else _number(values, "ram_bytes", where, minimum=0, strict=True),
        "dropout_prob": 0.0
        if _blank(values.get("dropout_prob"))
        else _number(values, "dropout_prob", where, minimum=0, strict=False),
        "device_class": "trace" if _blank(values.get("device_class")) else str(values["device_class"]).strip(),
    }
    if out["dropout_prob"] >= 1:
        raise DeviceError(f"{where}: column 'dropout_prob' must be < 1, got {values['dropout_prob']!r}")
    period = None if _blank(values.get("period_s")) else _number(values, "period_s", where, minimum=0, strict=True)
    out["availability"] = _parse_active(values.get("active"), period, where)
    return out


def _parse_active(raw: Any, period: float | None, where: str) -> Availability:
    if isinstance(raw, str) and raw.strip().lower() == "always":
        if period is not None:
            raise DeviceError(f"{where}: 'period_s' makes no sense with active = always")
        return AlwaysOn()
    if _blank(raw):
        raise DeviceError(f"{where}: column 'active' is empty (give intervals or 'always')")
    pairs: list[tuple[Any, Any]] = []
    if isinstance(raw, str):
        for part in raw.split(";"):
            bits = part.strip().split("-")
            if len(bits) != 2:
                raise DeviceError(f"{where}: column 'active' interval {part.strip()!r} is not 'start-end'")
            pairs.append((bits[0], bits[1]))
    elif isinstance(raw, list) and all(isinstance(p, list | tuple) and len(p) == 2 for p in raw):
        pairs = [(p[0], p[1]) for p in raw]
    else:
        raise DeviceError(f"{where}: column 'active' must be 'start-end;...', 'always' or [[start, end], ...]")
    starts, ends = [], []
    for a, b in pairs:
        try:
            s, e = float(a), float(b)
        except (TypeError, ValueError):
            raise DeviceError(f"{where}: column 'active' interval {a}-{b} is not numeric") from None
        if not (math.isfinite(s) and math.isfinite(e)) or s < 0 or e <= s:
            raise DeviceError(f"{where}: column 'active' interval {a}-{b} needs 0 <= start < end")
        if starts and s < starts[-1]:
            raise DeviceError(f"{where}: column 'active' intervals are unsorted ({a}-{b} after {starts[-1]:g}-)")
        if ends and s < ends[-1]:
            raise DeviceError(f"{where}: column 'active' intervals overlap ({a}-{b} starts before {ends[-1]:g})")
        starts.append(s)
        ends.append(e)
    if period is not None and ends[-1] > period:
        raise DeviceError(f"{where}: column 'active' ends at {ends[-1]:g} s, after period_s {period:g}")
    return TraceWindows(tuple(starts), tuple(ends), period)

