"""When each device is online: always, a nightly (diurnal) window, random churn, or a trace's intervals.

Simulated time is seconds since 00:00 UTC of day 0; diurnal windows read the local hour from
it. Every pattern answers two questions for the round loop: until when is the device online
(:meth:`window_end`, so a device leaving mid-round is a dropout) and when does it next come
online (:meth:`next_online`, so the clock can skip a stretch when nobody is online instead of
standing still).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from fedrnn.devices.errors import DeviceError

HOUR = 3600.0

# Availability defaults (assumptions, documented here rather than buried in code).
DIURNAL_WINDOW_H = (22.0, 7.0)
"""Phones train while idle, charging and on an unmetered network (Bonawitz et al. 2019, Sec. 3),
which the paper observes mostly at night local time; 22:00-07:00 is the assumed window."""
DIURNAL_PHASE_SPREAD_H = 3.0
"""Per-client phase (time-zone / habit offset) drawn uniformly in [-3, +3] hours (assumption)."""
CHURN_MEAN_ON_S = 2 * HOUR
CHURN_MEAN_OFF_S = 0.5 * HOUR
"""Random churn: exponential on/off periods with these means (assumption)."""
KINDS = ("always", "diurnal", "churn")


class Availability(Protocol):
    kind: str

    def window_end(self, t: float) -> float | None:
        """End time of the online period containing ``t`` (``inf`` if it never ends); None if offline."""
        ...

    def next_online(self, t: float) -> float:
        """``t`` if online at ``t``, else the time the device next comes online (``inf`` if never)."""
        ...


@dataclass(frozen=True)
class AlwaysOn:
    kind: str = field(default="always", init=False)

    def window_end(self, t: float) -> float | None:
        return math.inf

    def next_online(self, t: float) -> float:
        return t


@dataclass(frozen=True)
class Diurnal:
    """Online while the client's local hour is in [start_h, end_h) (the window may wrap midnight)."""

    start_h: float
    end_h: float
    phase_h: float = 0.0
    kind: str = field(default="diurnal", init=False)

    def __post_init__(self) -> None:
        for name in ("start_h", "end_h"):
            if not 0.0 <= getattr(self, name) < 24.0:
                raise DeviceError(f"diurnal {name} must be in [0, 24), got {getattr(self, name)!r}")
        if self.start_h == self.end_h:
            raise DeviceError("diurnal window is empty (start_h == end_h); use 'always' for always-on")

    def _since_start_h(self, t: float) -> float:
        return ((t / HOUR + self.phase_h) % 24.0 - self.start_h) % 24.0

    def window_end(self, t: float) -> float | None:
        since_start = self._since_start_h(t)
        length = (self.end_h - self.start_h) % 24.0
        if since_start >= length:
            return None
        return t + (length - since_start) * HOUR

    def next_online(self, t: float) -> float:
        if self.window_end(t) is not None:
            return t
        return _inside(self, t + (24.0 - self._since_start_h(t)) * HOUR)


class Churn:
    """Alternating exponential on/off periods from a private seeded stream.

    Period boundaries are generated sequentially from time 0 and kept, so the answer for any
    time is the same whatever order times are queried in. The first state is drawn from the
    stationary on-probability; exponential periods are memoryless, so the process is
    stationary from t = 0.
    """

    kind = "churn"

    def __init__(self, mean_on_s: float, mean_off_s: float, seed: int | Sequence[int]) -> None:
        if not (mean_on_s > 0 and mean_off_s > 0):
            raise DeviceError(f"churn means must be > 0, got on={mean_on_s!r} off={mean_off_s!r}")
        self.mean_on_s, self.mean_off_s = float(mean_on_s), float(mean_off_s)
        self._rng = np.random.default_rng(seed)
        self._online_first = bool(self._rng.random() < mean_on_s / (mean_on_s + mean_off_s))
        self._edges: list[float] = []  # times at which the state flips

    def _extend_past(self, t: float) -> None:
        while not self._edges or self._edges[-1] <= t:
            online = self._online_first == (len(self._edges) % 2 == 0)
            last = self._edges[-1] if self._edges else 0.0
            self._edges.append(last + float(self._rng.exponential(self.mean_on_s if online else self.mean_off_s)))

    def _state(self, t: float) -> tuple[bool, float]:
        """(online at ``t``, time of the next flip)."""
        if t < 0:
            raise DeviceError(f"simulated time must be >= 0, got {t!r}")
        self._extend_past(t)
        i = bisect.bisect_right(self._edges, t)
        return self._online_first == (i % 2 == 0), self._edges[i]

    def window_end(self, t: float) -> float | None:
        online, flip = self._state(t)
        return flip if online else None

    def next_online(self, t: float) -> float:
        online, flip = self._state(t)
        return t if online else flip


@dataclass(frozen=True)
class TraceWindows:
    """Online during the given sorted, disjoint [start, end) intervals, optionally repeating."""

    starts: tuple[float, ...]
    ends: tuple[float, ...]
    period_s: float | None = None
    kind: str = field(default="trace", init=False)

    def _local(self, t: float) -> tuple[float, float]:
        """(time within the period, start time of that period)."""
        if self.period_s is None:
            return t, 0.0
        local = t % self.period_s
        return local, t - local

    def window_end(self, t: float) -> float | None:
        local, offset = self._local(t)
        i = bisect.bisect_right(self.starts, local) - 1
        if i < 0 or local >= self.ends[i]:
            return None
        return offset + self.ends[i]

    def next_online(self, t: float) -> float:
        if self.window_end(t) is not None:
            return t
        local, offset = self._local(t)
        i = bisect.bisect_right(self.starts, local)
        if i < len(self.starts):
            return _inside(self, offset + self.starts[i])
        return math.inf if self.period_s is None else _inside(self, offset + self.period_s + self.starts[0])


def _inside(pattern: Availability, opening: float) -> float:
    """``opening``, or a millisecond later if float rounding in the modular arithmetic put it a hair
    before the window opens (so the clock never stops just short of a device coming online)."""
    return opening if pattern.window_end(opening) is not None else opening + 1e-3


def make_availability(kind: str, *, phase_h: float, seed: int | Sequence[int]) -> Availability:
    """A profile's named pattern with the module's default parameters (see the constants above)."""
    if kind == "always":
        return AlwaysOn()
    if kind == "diurnal":
        return Diurnal(*DIURNAL_WINDOW_H, phase_h=phase_h)
    if kind == "churn":
        return Churn(CHURN_MEAN_ON_S, CHURN_MEAN_OFF_S, seed=seed)
    raise DeviceError(f"availability must be one of {KINDS}, got {kind!r}")
