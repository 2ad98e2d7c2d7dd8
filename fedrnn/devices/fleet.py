"""A fleet: which device, network, memory, failure rate and availability each simulated client has.

Built either from a mix of the published profiles (:meth:`Fleet.from_mix`, exact proportions,
seeded) or from a per-client trace file (:func:`fedrnn.devices.trace.load_trace`). Stored column-wise so a
round's plan is vectorised over the selected clients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedrnn.devices.availability import DIURNAL_PHASE_SPREAD_H, KINDS, Availability, make_availability
from fedrnn.devices.errors import DeviceError
from fedrnn.devices.profiles import NETWORKS, PROFILES


@dataclass
class Fleet:
    """Per-client device assignment, stored column-wise so round planning is vectorised.

    ``relative_speed`` is NaN where the trace gives absolute ``speed_samples_per_s`` and vice versa.
    """

    device_class: list[str]
    network: list[str]
    relative_speed: np.ndarray
    speed_samples_per_s: np.ndarray
    down_bps: np.ndarray
    up_bps: np.ndarray
    latency_s: np.ndarray
    ram_bytes: np.ndarray
    dropout_prob: np.ndarray
    availability: list[Availability]

    def __post_init__(self) -> None:
        n = len(self.device_class)
        for name in (
            "network",
            "relative_speed",
            "speed_samples_per_s",
            "down_bps",
            "up_bps",
            "latency_s",
            "ram_bytes",
            "dropout_prob",
            "availability",
        ):
            if len(getattr(self, name)) != n:
                raise DeviceError(f"fleet column {name} has {len(getattr(self, name))} entries, expected {n}")
        if n == 0:
            raise DeviceError("a fleet needs at least one client")
        both = np.isnan(self.relative_speed) == np.isnan(self.speed_samples_per_s)
        if both.any():
            raise DeviceError(f"clients {np.flatnonzero(both).tolist()} need exactly one of relative/absolute speed")

    def __len__(self) -> int:
        return len(self.device_class)

    @classmethod
    def from_mix(
        cls,
        num_clients: int,
        mix: dict[str, float],
        seed: int,
        networks: str | dict[str, float] | None = None,
        availability: str | None = None,
    ) -> Fleet:
        """Assign profiles in exact proportions (largest remainder), shuffled by ``seed``.

        ``networks``: None keeps each profile's default network, a name applies one network to
        all, a dict draws networks in the given proportions. ``availability``: None keeps each
        profile's default pattern; ``always``/``diurnal``/``churn`` overrides it for all.
        """
        if not isinstance(num_clients, int) or num_clients < 1:
            raise DeviceError(f"num_clients must be a positive integer, got {num_clients!r}")
        rng = np.random.default_rng(seed)
        profiles = _allocate(mix, num_clients, PROFILES, "device mix", rng)
        if networks is None:
            nets = [PROFILES[p].network for p in profiles]
        elif isinstance(networks, str):
            _check_known(networks, NETWORKS, "network")
            nets = [networks] * num_clients
        else:
            nets = _allocate(networks, num_clients, NETWORKS, "network mix", rng)
        if availability is not None and availability not in KINDS:
            raise DeviceError(f"availability must be one of {KINDS}, got {availability!r}")
        phases = rng.uniform(-DIURNAL_PHASE_SPREAD_H, DIURNAL_PHASE_SPREAD_H, num_clients)
        avail = [
            make_availability(availability or PROFILES[p].availability, phase_h=float(phases[cid]), seed=(seed, cid))
            for cid, p in enumerate(profiles)
        ]
        down, up = [], []
        for p, n in zip(profiles, nets, strict=True):
            cap = PROFILES[p].wifi_cap_bps if n == "wifi" else None
            down.append(min(NETWORKS[n].down_bps, cap or math.inf))
            up.append(min(NETWORKS[n].up_bps, cap or math.inf))
        return cls(
            device_class=profiles,
            network=nets,
            relative_speed=np.array([PROFILES[p].relative_speed for p in profiles]),
            speed_samples_per_s=np.full(num_clients, np.nan),
            down_bps=np.array(down),
            up_bps=np.array(up),
            latency_s=np.array([NETWORKS[n].latency_s for n in nets]),
            ram_bytes=np.array([float(PROFILES[p].ram_usable_bytes) for p in profiles]),
            dropout_prob=np.array([PROFILES[p].dropout_prob for p in profiles]),
            availability=avail,
        )

    def available(self, sim_time: float) -> np.ndarray:
        """Ids of clients online at ``sim_time`` (seconds), ascending."""
        return np.array([c for c, a in enumerate(self.availability) if a.window_end(sim_time) is not None], dtype=int)

    def next_available_time(self, sim_time: float) -> float:
        """Earliest time >= ``sim_time`` at which some client is online (``inf`` if none ever is)."""
        return min(a.next_online(sim_time) for a in self.availability)

    def samples_per_s(self, clients: Sequence[int] | np.ndarray, host_samples_per_s: float | np.ndarray) -> np.ndarray:
        """Training speed of ``clients``: host throughput x relative speed, or the trace's absolute speed."""
        ids = np.asarray(clients, dtype=int)
        host = np.broadcast_to(np.asarray(host_samples_per_s, dtype=float), ids.shape)
        rel = self.relative_speed[ids]
        return np.where(np.isnan(rel), self.speed_samples_per_s[ids], host * rel)

    def describe(self) -> list[dict[str, Any]]:
        """Per-client assignment as JSON-ready dicts (for run metadata)."""
        return [
            {
                "client_id": c,
                "device_class": self.device_class[c],
                "network": self.network[c],
                "relative_speed": _json_float(self.relative_speed[c]),
                "samples_per_s": _json_float(self.speed_samples_per_s[c]),
                "down_bps": float(self.down_bps[c]),
                "up_bps": float(self.up_bps[c]),
                "latency_s": float(self.latency_s[c]),
                "ram_bytes": _json_float(self.ram_bytes[c]),
                "dropout_prob": float(self.dropout_prob[c]),
                "availability": self.availability[c].kind,
            }
            for c in range(len(self))
        ]


def _json_float(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _check_known(name: str, known: dict, what: str) -> None:
    if name not in known:
        raise DeviceError(f"unknown {what} {name!r}; known: {sorted(known)}")


def _allocate(fractions: dict[str, float], n: int, known: dict, what: str, rng: np.random.Generator) -> list[str]:
    """``floor(f * n)`` of each name plus the leftovers by largest remainder, in a seeded random order."""
    if not fractions:
        raise DeviceError(f"{what} is empty")
    for name, f in fractions.items():
        _check_known(name, known, what)
        if not (isinstance(f, int | float) and math.isfinite(f) and f >= 0):
            raise DeviceError(f"{what}[{name!r}] must be a fraction >= 0, got {f!r}")
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-6:
        raise DeviceError(f"{what} fractions must sum to 1, got {total:g}")
    names = list(fractions)
    exact = np.array([fractions[k] * n for k in names])
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    out = np.repeat(np.array(names, dtype=object), counts)
    return [str(x) for x in rng.permutation(out)]


def select_clients(candidates: Sequence[int] | np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``k`` distinct clients drawn uniformly from ``candidates`` (all of them if fewer), sorted."""
    if k < 1:
        raise DeviceError(f"clients per round must be >= 1, got {k}")
    pool = np.asarray(candidates, dtype=int)
    if len(pool) <= k:
        return np.sort(pool)
    return np.sort(rng.choice(pool, size=k, replace=False))

