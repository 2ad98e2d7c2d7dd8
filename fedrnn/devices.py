"""Resource-limited edge devices: compute, network, availability, memory and a simulated clock.

The server's round loop uses this module to decide *who can take part* in a round and *how
long the round takes* in simulated time, from the real payload bytes and the real amount of
local work. Nothing here runs Flower; everything is plain Python/numpy plus one short torch
measurement (:func:`measure_host_throughput`), so the simulation is grounded in how fast the
real model trains on this host. torch is imported lazily, only by the memory and calibration
functions, so planning rounds never pays for it.

API (what the server calls, in round order)
-------------------------------------------
``fleet = Fleet.from_mix(num_clients, {"rpi4": 0.5, "phone-low": 0.5}, seed=0, networks=None)``
    or ``Fleet.from_trace("configs/fleets/example_trace.csv")`` (CSV or JSON, format below).
``ids = fleet.available(sim_time)``; ``selected = select_clients(ids, k, rng)``. ``sim_time`` is
    seconds since 00:00 UTC of day 0; diurnal windows read the local hour from it.
``decision = adapt_to_memory(model_cfg, mode, batch_size, seq_len, fleet.ram_bytes[c])`` per
    selected client: ok / reduced-batch / feature-extraction / excluded, with the reason.
``sps = measure_host_throughput(model, batch_size, seq_len)`` (cached) for the batch size and
    trainable set the client will use; a client's own speed is ``sps * relative_speed``
    unless the trace gives it absolute samples/s (:meth:`Fleet.samples_per_s`).
``plan = plan_round(fleet, selected, bytes_down=..., bytes_up=..., work_samples=...,
    batch_size=..., host_samples_per_s=..., deadline_s=..., policy="drop"|"partial"|"wait",
    rng=rng, sim_time=t, excluded_memory=...)`` -> :class:`RoundPlan` with one
    :class:`ClientPlan` per selected client (status ok/partial/late/dropout/unavailable/
    excluded-memory, the number of local ``steps`` to actually train, times, bytes) and the
    round's simulated ``duration_s``. The caller trains only ``plan.accepted()`` clients,
    each for ``steps`` steps, then advances ``sim_time += plan.duration_s``.
``summarize_by_class(plans)`` -> per-device-class participation, time and bytes (JSON-ready).
``estimate_training_memory(model_cfg, mode, batch_size, seq_len, optimizer, dp)`` -> bytes.

Clock: client time = download (latency + bytes_down*8/down_bps) + compute (work_samples /
samples_per_s) + upload (latency + bytes_up*8/up_bps). Policies for stragglers past the
deadline: ``drop`` (late updates discarded; the round ends at the deadline, or when the last
client reports or fails if all do so earlier), ``partial`` (a late client trains only the
steps that fit before the deadline; one that cannot fit download + one step + upload is
late), ``wait`` (the round lasts until every client has reported or failed). A client drops
out mid-round with its profile's probability (at a uniform point of its work) or when its
availability window closes before it finishes; a dropped update is lost.

Trace file format (FedScale-like; one client per CSV row or JSON object)
------------------------------------------------------------------------
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
profiles below: boards give ``relative_speed``, phones an absolute ``samples_per_s`` equal to
relative speed x 288 samples/s (this host's measured fine-tune throughput of the default model,
batch 16, 256 tokens); networks and usable RAM are the profiles' values (the Zero 2 W, with no
published Wi-Fi measurement, borrows the Pi 3B+'s 24.5 Mbps); phones are online at night.

Where the numbers come from
---------------------------
CPU speed is Geekbench 6 single-core score relative to an assumed score for one core of this
host (:data:`HOST_GB6_SINGLE`). Single-core because the host throughput is measured with one
torch thread: on this shared 2-vCPU host a 2-thread train step of the default model was slower
than a 1-thread one (73 vs 133 samples/s, batch 32, 256 tokens), so one thread is the stable
unit. Multi-core gains on the devices are therefore not modelled (device speeds are
conservative). Where a device has no Geekbench 6 result, a documented bridge is used (Pi 4B,
measured under both Geekbench 5 and 6 by the same reviewer; or clock scaling of the same core).
Every profile, network and default below cites its source; values marked *assumption* have no
measured public source and are the module's stated choice.
"""

from __future__ import annotations

import bisect
import copy
import csv
import functools
import json
import math
import os
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

MIB = 2**20
GIB = 2**30
MBPS = 1e6
HOUR = 3600.0

POLICIES = ("drop", "partial", "wait")
STATUSES = ("ok", "partial", "late", "dropout", "unavailable", "excluded-memory")
OPTIMIZER_STATE_SLOTS = {"sgd": 0, "sgd-momentum": 1, "adam": 2, "adamw": 2}
FLOAT_BYTES = 4


class DeviceError(ValueError):
    """A fleet config or trace file is invalid; the message names the file/row/key and problem."""


# --------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Network:
    name: str
    down_bps: float
    up_bps: float
    latency_s: float
    source: str


NETWORKS: dict[str, Network] = {
    "wifi": Network(
        "wifi",
        down_bps=84.33 * MBPS,
        up_bps=44.10 * MBPS,
        latency_s=0.010,
        source="Ookla Speedtest Global Index, Aug 2020: global fixed-broadband average 84.33 Mbps down / "
        "44.10 Mbps up (https://www.speedtest.net/global-index, reported by telecomtalk.info 2020-09-16); "
        "Ookla 2022 global fixed-broadband median latency 10 ms (reported by tele.net.in). A device's own "
        "Wi-Fi radio can cap this (DeviceProfile.wifi_cap_bps).",
    ),
    "4g": Network(
        "4g",
        down_bps=17.4 * MBPS,
        up_bps=6.0 * MBPS,
        latency_s=0.060,
        source="OpenSignal 'State of LTE' Nov 2016: global average LTE download 17.4 Mbps "
        "(https://opensignal.com/blog, State of LTE 11-2016); OpenSignal US report Jul 2019: upload "
        "4.9-7.3 Mbps across operators (6.0 used); OpenSignal 'State of Mobile Networks: USA' Aug 2018: "
        "4G latency 57-64.7 ms (60 ms used).",
    ),
    "3g": Network(
        "3g",
        down_bps=3.8 * MBPS,
        up_bps=1.0 * MBPS,
        latency_s=0.150,
        source="OpenSignal 'State of Mobile Networks: USA' Aug 2018: 3G download 4.6 Mbps (T-Mobile) and "
        "3.0 Mbps (AT&T), mean 3.8 used; OpenSignal/FierceWireless 2014: HSPA latency around 150 ms. "
        "Upload 1.0 Mbps is an assumption (no measured public average found).",
    ),
}


# --------------------------------------------------------------------------------------------
# Device profiles
# --------------------------------------------------------------------------------------------

HOST_GB6_SINGLE = 2845.0
"""Assumed Geekbench 6 single-core score of one core of this host (AMD EPYC, Zen 5, 2 vCPUs under
KVM). Geekbench cannot run offline here, so the anchor is the closest published Zen 5 result from
the same dataset as the boards: Framework 13 with Ryzen AI 5 340 (Zen 5), 2845
(https://github.com/geerlingguy/sbc-reviews/issues/90). If the host is really slower, every device
speed is underestimated by the same factor (all compute times scale together)."""

_GB5_TO_GB6_SINGLE = 289.0 / 271.0
"""Bridge for devices with only Geekbench 5 results: Raspberry Pi 4B scored 271 (GB5) and 289 (GB6)
single-core in Jeff Geerling's tests (https://github.com/geerlingguy/sbc-reviews/issues/4)."""

_OS_RESERVE_BYTES = 100 * MIB
"""Assumption: a headless Linux image (Raspberry Pi OS Lite / L4T) keeps about 100 MiB for itself."""
_TORCH_RUNTIME_BYTES = 323 * MIB
"""Measured on this host: resident memory (/proc/self/status VmRSS) of a Python process after
``import torch`` and fedrnn (225 MiB) and one training step of a tiny SentimentRNN, which loads the
CPU kernels (323 MiB); the framework's fixed cost before any model tensor."""
_ANDROID_BACKGROUND_FRACTION = 0.25
"""Assumption: a background training job on Android may use a quarter of the phone's RAM before the
low-memory killer reclaims it (Android publishes no fixed limit for native memory)."""


def _linux_usable(total_bytes: int) -> int:
    return total_bytes - _OS_RESERVE_BYTES - _TORCH_RUNTIME_BYTES


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    cpu: str
    gb6_single: float
    ram_total_bytes: int
    ram_usable_bytes: int
    network: str
    availability: str
    dropout_prob: float
    wifi_cap_bps: float | None
    source: str

    @property
    def relative_speed(self) -> float:
        """Training speed relative to one core of this host (Geekbench 6 single-core ratio)."""
        return self.gb6_single / HOST_GB6_SINGLE


_DROPOUT_SOURCE = (
    "Phone dropout: Bonawitz et al., 'Towards Federated Learning at Scale: System Design', SysML 2019 "
    "(arXiv:1902.01046) report 6-10% of participating phones dropping out of a round; mains-powered "
    "boards on Wi-Fi use an assumed 2%."
)

PROFILES: dict[str, DeviceProfile] = {
    "rpi-zero2w": DeviceProfile(
        name="rpi-zero2w",
        cpu="4x Cortex-A53 @ 1.0 GHz (RP3A0)",
        gb6_single=108.0 * _GB5_TO_GB6_SINGLE * (1.0 / 1.4),
        ram_total_bytes=512 * MIB,
        ram_usable_bytes=_linux_usable(512 * MIB),
        network="wifi",
        availability="churn",
        dropout_prob=0.05,
        wifi_cap_bps=None,
        source="Specs: https://www.raspberrypi.com/products/raspberry-pi-zero-2-w/ (1 GHz quad A53, 512 MB, "
        "2.4 GHz 802.11n). Speed: the Pi 3B+ result (same Cortex-A53, 1.4 GHz; GB5 108) scaled by clock "
        "1.0/1.4 and bridged to GB6. Battery/solar IoT use: churn availability and 5% dropout are assumptions.",
    ),
    "rpi3b+": DeviceProfile(
        name="rpi3b+",
        cpu="4x Cortex-A53 @ 1.4 GHz (BCM2837B0)",
        gb6_single=108.0 * _GB5_TO_GB6_SINGLE,
        ram_total_bytes=1 * GIB,
        ram_usable_bytes=_linux_usable(1 * GIB),
        network="wifi",
        availability="always",
        dropout_prob=0.02,
        wifi_cap_bps=24.5 * MBPS,
        source="Specs: https://www.raspberrypi.com/products/raspberry-pi-3-model-b-plus/ (1 GB). Geekbench 5 "
        "108 single / 303 multi and iperf3 Wi-Fi 24.5 Mbps: Jeff Geerling, "
        "https://github.com/geerlingguy/sbc-reviews/issues/16 (web/data/results.yml). " + _DROPOUT_SOURCE,
    ),
    "rpi4": DeviceProfile(
        name="rpi4",
        cpu="4x Cortex-A72 @ 1.8 GHz (BCM2711)",
        gb6_single=289.0,
        ram_total_bytes=2 * GIB,
        ram_usable_bytes=_linux_usable(2 * GIB),
        network="wifi",
        availability="always",
        dropout_prob=0.02,
        wifi_cap_bps=108.0 * MBPS,
        source="Specs: https://www.raspberrypi.com/products/raspberry-pi-4-model-b/specifications/ (2 GB "
        "variant). Geekbench 6 289 single / 653 multi, iperf3 Wi-Fi 108 Mbps: Jeff Geerling, "
        "https://github.com/geerlingguy/sbc-reviews/issues/4. " + _DROPOUT_SOURCE,
    ),
    "rpi5": DeviceProfile(
        name="rpi5",
        cpu="4x Cortex-A76 @ 2.4 GHz (BCM2712)",
        gb6_single=904.0,
        ram_total_bytes=4 * GIB,
        ram_usable_bytes=_linux_usable(4 * GIB),
        network="wifi",
        availability="always",
        dropout_prob=0.02,
        wifi_cap_bps=186.0 * MBPS,
        source="Specs: https://www.raspberrypi.com/products/raspberry-pi-5/ (4 GB variant). Geekbench 6 904 "
        "single / 2164 multi, iperf3 Wi-Fi 186 Mbps: Jeff Geerling, "
        "https://github.com/geerlingguy/sbc-reviews/issues/21. " + _DROPOUT_SOURCE,
    ),
    "jetson-nano": DeviceProfile(
        name="jetson-nano",
        cpu="4x Cortex-A57 @ 1.43 GHz (Tegra X1), CPU only",
        gb6_single=289.0 * 5060.0 / 5700.0,
        ram_total_bytes=4 * GIB,
        ram_usable_bytes=4 * GIB - 1 * GIB - _TORCH_RUNTIME_BYTES,
        network="wifi",
        availability="always",
        dropout_prob=0.02,
        wifi_cap_bps=None,
        source="Specs: https://developer.nvidia.com/embedded/jetson-nano-developer-kit (quad A57 1.43 GHz, "
        "4 GB shared with the GPU; 1 GiB assumed for the L4T desktop). Speed: sbc-bench 7-zip MIPS, Jetson "
        "Nano 5060 (http://ix.io/1I4j) vs Raspberry Pi 4B @1.8 GHz arm64 5760 and 5640 (mean 5700), "
        "https://github.com/ThomasKaiser/sbc-bench/blob/master/Results.md, applied to the Pi 4B GB6 score. "
        + _DROPOUT_SOURCE,
    ),
    "phone-low": DeviceProfile(
        name="phone-low",
        cpu="Helio G85: 2x Cortex-A75 @ 2.0 GHz + 6x Cortex-A55 @ 1.8 GHz (e.g. Redmi Note 9)",
        gb6_single=352.0 * _GB5_TO_GB6_SINGLE,
        ram_total_bytes=3 * GIB,
        ram_usable_bytes=int(3 * GIB * _ANDROID_BACKGROUND_FRACTION),
        network="4g",
        availability="diurnal",
        dropout_prob=0.10,
        wifi_cap_bps=None,
        source="Helio G85 has the Helio G80's CPU (computerbase.de 2020-05, MediaTek Helio G85); Helio G80 "
        "Geekbench 5 352 single / 1322 multi (purepc.pl, 2020), bridged to GB6. 3 GB Redmi Note 9 variant. "
        + _DROPOUT_SOURCE,
    ),
    "phone-mid": DeviceProfile(
        name="phone-mid",
        cpu="Exynos 1380: 4x Cortex-A78 @ 2.4 GHz + 4x Cortex-A55 @ 2.0 GHz (Galaxy A54 5G)",
        gb6_single=776.0 * _GB5_TO_GB6_SINGLE,
        ram_total_bytes=6 * GIB,
        ram_usable_bytes=int(6 * GIB * _ANDROID_BACKGROUND_FRACTION),
        network="4g",
        availability="diurnal",
        dropout_prob=0.06,
        wifi_cap_bps=None,
        source="Exynos 1380 Geekbench 5 776 single / 2599 multi (Geekbench listing of the Galaxy A54, "
        "https://www.nextpit.com/samsung-galaxy-a54-exynos-processor), bridged to GB6; 6 GB variant. "
        + _DROPOUT_SOURCE,
    ),
}

# Availability defaults (assumptions, documented here rather than buried in code).
DIURNAL_WINDOW_H = (22.0, 7.0)
"""Phones train while idle, charging and on an unmetered network (Bonawitz et al. 2019, Sec. 3),
which the paper observes mostly at night local time; 22:00-07:00 is the assumed window."""
DIURNAL_PHASE_SPREAD_H = 3.0
"""Per-client phase (time-zone / habit offset) drawn uniformly in [-3, +3] hours (assumption)."""
CHURN_MEAN_ON_S = 2 * HOUR
CHURN_MEAN_OFF_S = 0.5 * HOUR
"""Random churn: exponential on/off periods with these means (assumption)."""


# --------------------------------------------------------------------------------------------
# Availability patterns
# --------------------------------------------------------------------------------------------


class Availability(Protocol):
    kind: str

    def window_end(self, t: float) -> float | None:
        """End time of the online period containing ``t`` (``inf`` if it never ends); None if offline."""
        ...


@dataclass(frozen=True)
class AlwaysOn:
    kind: str = field(default="always", init=False)

    def window_end(self, t: float) -> float | None:
        return math.inf


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

    def window_end(self, t: float) -> float | None:
        hour = (t / HOUR + self.phase_h) % 24.0
        since_start = (hour - self.start_h) % 24.0
        length = (self.end_h - self.start_h) % 24.0
        if since_start >= length:
            return None
        return t + (length - since_start) * HOUR


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

    def window_end(self, t: float) -> float | None:
        if t < 0:
            raise DeviceError(f"simulated time must be >= 0, got {t!r}")
        self._extend_past(t)
        i = bisect.bisect_right(self._edges, t)
        online = self._online_first == (i % 2 == 0)
        return self._edges[i] if online else None


@dataclass(frozen=True)
class TraceWindows:
    """Online during the given sorted, disjoint [start, end) intervals, optionally repeating."""

    starts: tuple[float, ...]
    ends: tuple[float, ...]
    period_s: float | None = None
    kind: str = field(default="trace", init=False)

    def window_end(self, t: float) -> float | None:
        offset = 0.0
        local = t
        if self.period_s is not None:
            local = t % self.period_s
            offset = t - local
        i = bisect.bisect_right(self.starts, local) - 1
        if i < 0 or local >= self.ends[i]:
            return None
        return offset + self.ends[i]


# --------------------------------------------------------------------------------------------
# Fleet
# --------------------------------------------------------------------------------------------


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
        if availability is not None and availability not in ("always", "diurnal", "churn"):
            raise DeviceError(f"availability must be always, diurnal or churn, got {availability!r}")
        phases = rng.uniform(-DIURNAL_PHASE_SPREAD_H, DIURNAL_PHASE_SPREAD_H, num_clients)
        avail: list[Availability] = []
        for cid, p in enumerate(profiles):
            kind = availability or PROFILES[p].availability
            if kind == "always":
                avail.append(AlwaysOn())
            elif kind == "diurnal":
                avail.append(Diurnal(*DIURNAL_WINDOW_H, phase_h=float(phases[cid])))
            else:
                avail.append(Churn(CHURN_MEAN_ON_S, CHURN_MEAN_OFF_S, seed=(seed, cid)))
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

    @classmethod
    def from_trace(cls, path: str | os.PathLike[str]) -> Fleet:
        """Load a FedScale-like per-client trace (CSV or JSON; columns in the module docstring)."""
        return _load_trace(Path(path))

    def available(self, sim_time: float) -> np.ndarray:
        """Ids of clients online at ``sim_time`` (seconds), ascending."""
        return np.array([c for c, a in enumerate(self.availability) if a.window_end(sim_time) is not None], dtype=int)

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


# --------------------------------------------------------------------------------------------
# Trace loading
# --------------------------------------------------------------------------------------------

_REQUIRED = ("client_id", "down_bps", "up_bps", "latency_s", "active")
_OPTIONAL = ("samples_per_s", "relative_speed", "period_s", "ram_bytes", "dropout_prob", "device_class")


def _load_trace(path: Path) -> Fleet:
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


# --------------------------------------------------------------------------------------------
# Round planning (the simulated clock)
# --------------------------------------------------------------------------------------------


@dataclass
class ClientPlan:
    """One selected client's round: ``steps`` is how many local steps the caller should train."""

    client_id: int
    device_class: str
    status: str
    reason: str
    steps: int
    steps_total: int
    fraction: float
    download_s: float
    compute_s: float
    upload_s: float
    time_s: float
    bytes_down: int
    bytes_up: int


@dataclass
class RoundPlan:
    policy: str
    deadline_s: float | None
    sim_time: float
    duration_s: float
    clients: list[ClientPlan]

    def accepted(self) -> list[ClientPlan]:
        """Clients whose updates reach the server (status ok or partial)."""
        return [c for c in self.clients if c.status in ("ok", "partial")]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _per_client(value: float | Sequence[float] | np.ndarray, n: int, name: str) -> np.ndarray:
    arr = np.asarray(value, dtype=float)
    if arr.ndim == 0:
        arr = np.full(n, float(arr))
    if arr.shape != (n,):
        raise DeviceError(f"{name} must be a scalar or one value per selected client ({n}), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise DeviceError(f"{name} must be finite and >= 0")
    return arr


def plan_round(
    fleet: Fleet,
    selected: Sequence[int] | np.ndarray,
    *,
    bytes_down: float | Sequence[float] | np.ndarray,
    bytes_up: float | Sequence[float] | np.ndarray,
    work_samples: float | Sequence[float] | np.ndarray,
    batch_size: int | Sequence[int] | np.ndarray,
    host_samples_per_s: float | Sequence[float] | np.ndarray,
    deadline_s: float | None,
    policy: str,
    rng: np.random.Generator,
    sim_time: float = 0.0,
    excluded_memory: Sequence[bool] | np.ndarray | None = None,
) -> RoundPlan:
    """Simulate one round for ``selected`` clients starting at ``sim_time`` (see module docstring).

    Per-client arguments are scalars or arrays aligned with ``selected``. ``rng`` is used for
    mid-round dropouts only, two draws per selected client whatever happens, so a fixed seed
    gives the same plan.
    """
    if policy not in POLICIES:
        raise DeviceError(f"deadline policy must be one of {POLICIES}, got {policy!r}")
    if policy != "wait" and not (deadline_s is not None and deadline_s > 0):
        raise DeviceError(f"policy {policy!r} needs a deadline_s > 0, got {deadline_s!r}")
    deadline = math.inf if policy == "wait" or deadline_s is None else float(deadline_s)
    ids = np.asarray(selected, dtype=int)
    n = len(ids)
    if n and (ids.min() < 0 or ids.max() >= len(fleet)):
        raise DeviceError(f"selected client ids must be in 0..{len(fleet) - 1}")
    b_down = _per_client(bytes_down, n, "bytes_down")
    b_up = _per_client(bytes_up, n, "bytes_up")
    work = _per_client(work_samples, n, "work_samples")
    batch = _per_client(batch_size, n, "batch_size")
    if np.any(batch < 1):
        raise DeviceError("batch_size must be >= 1")
    host = _per_client(host_samples_per_s, n, "host_samples_per_s")
    if np.any(host <= 0):
        raise DeviceError("host_samples_per_s must be > 0")
    excluded = np.zeros(n, bool) if excluded_memory is None else np.asarray(excluded_memory, dtype=bool)
    if excluded.shape != (n,):
        raise DeviceError(f"excluded_memory must have one flag per selected client ({n})")

    speed = fleet.samples_per_s(ids, host)
    down_s = fleet.latency_s[ids] + b_down * 8 / fleet.down_bps[ids]
    up_s = fleet.latency_s[ids] + b_up * 8 / fleet.up_bps[ids]
    steps_total = np.ceil(work / batch).astype(int)
    drops = rng.random(n) < fleet.dropout_prob[ids]
    drop_at = rng.random(n)

    plans, events = [], []
    for i, c in enumerate(ids.tolist()):
        base = dict(client_id=c, device_class=fleet.device_class[c], steps_total=int(steps_total[i]))
        window = fleet.availability[c].window_end(sim_time)
        if excluded[i] or window is None:
            status = "excluded-memory" if excluded[i] else "unavailable"
            reason = "over its RAM budget in every mode" if excluded[i] else "offline at round start"
            plans.append(
                ClientPlan(
                    **base,
                    status=status,
                    reason=reason,
                    steps=0,
                    fraction=0.0,
                    download_s=0.0,
                    compute_s=0.0,
                    upload_s=0.0,
                    time_s=0.0,
                    bytes_down=0,
                    bytes_up=0,
                )
            )
            continue
        steps, compute_s = int(steps_total[i]), work[i] / speed[i]
        status, reason = "ok", "finished"
        if down_s[i] + compute_s + up_s[i] > deadline:
            fit = int((deadline - down_s[i] - up_s[i]) * speed[i] // batch[i]) if deadline > down_s[i] + up_s[i] else 0
            if policy == "partial" and fit >= 1:
                steps = min(steps, fit)
                compute_s = min(work[i], steps * batch[i]) / speed[i]
                status, reason = "partial", f"trained {steps}/{int(steps_total[i])} steps to meet the deadline"
            else:
                status, reason = "late", "would finish after the deadline"
        finish = down_s[i] + compute_s + up_s[i]
        time_s = finish
        if status != "late":
            random_drop = drop_at[i] * finish if drops[i] else math.inf
            offline = window - sim_time
            if min(random_drop, offline) < finish:
                status = "dropout"
                if random_drop <= offline:
                    time_s, reason = random_drop, "dropped out mid-round (random failure)"
                else:
                    time_s, reason = offline, "went offline before finishing"
        reported = status in ("ok", "partial")
        plans.append(
            ClientPlan(
                **base,
                status=status,
                reason=reason,
                steps=steps if reported else 0,
                fraction=steps / max(int(steps_total[i]), 1) if reported else 0.0,
                download_s=float(down_s[i]),
                compute_s=float(compute_s),
                upload_s=float(up_s[i]),
                time_s=float(time_s),
                bytes_down=int(b_down[i]),
                bytes_up=int(b_up[i]) if reported else 0,
            )
        )
        events.append(time_s)
    duration = min(deadline, max(events, default=0.0))
    return RoundPlan(policy, None if math.isinf(deadline) else deadline, float(sim_time), float(duration), plans)


def summarize_by_class(plans: RoundPlan | Iterable[RoundPlan]) -> dict[str, dict[str, Any]]:
    """Per device class: how often selected clients took part, how long they took, what they sent."""
    rounds = [plans] if isinstance(plans, RoundPlan) else list(plans)
    out: dict[str, dict[str, Any]] = {}
    for cp in (c for r in rounds for c in r.clients):
        s = out.setdefault(
            cp.device_class,
            {"selected": 0, **{k: 0 for k in STATUSES}, "bytes_down": 0, "bytes_up": 0, "_times": [], "_fractions": []},
        )
        s["selected"] += 1
        s[cp.status] += 1
        s["bytes_down"] += cp.bytes_down
        s["bytes_up"] += cp.bytes_up
        if cp.status in ("ok", "partial"):
            s["_times"].append(cp.time_s)
            s["_fractions"].append(cp.fraction)
    for s in out.values():
        times, fractions = s.pop("_times"), s.pop("_fractions")
        s["participation"] = (s["ok"] + s["partial"]) / s["selected"]
        s["mean_time_s"] = float(np.mean(times)) if times else None
        s["max_time_s"] = float(np.max(times)) if times else None
        s["mean_work_fraction"] = float(np.mean(fractions)) if fractions else None
    return out


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _parameter_counts(model_cfg: Any, mode: str) -> tuple[int, int]:
    """(all, trainable) parameter counts, exact, from a model built on the meta device (no memory)."""
    import torch

    from fedrnn.models import SentimentRNN, trainable_names

    with torch.device("meta"):
        model = SentimentRNN(model_cfg)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    return sum(sizes.values()), sum(sizes[n] for n in trainable_names(model, mode))


def memory_breakdown(
    model_cfg: Any, mode: str, batch_size: int, seq_len: int, optimizer: str = "adam", dp: bool = False
) -> dict[str, int]:
    """Bytes of training memory by component (float32), for the adaptation rule and for reports.

    weights: every parameter (the frozen part still runs forward). grads: trainable parameters;
    with DP, Opacus keeps a per-sample gradient for each example plus the summed one, so
    ``batch_size + 1`` copies. optimizer: state slots per trainable parameter (Adam: 2).
    activations: what autograd saves per time step and example for the layers that are
    trained through - for an LSTM layer its input plus 4 gates, cell, hidden and tanh(cell)
    (``I + 7H``); for a GRU its input plus 3 gates, hidden and the reset-gated candidate term
    (``I + 5H``); one-byte dropout masks on those inputs; the pooled features for the head.
    Fine-tune trains through the top recurrent layer only, feature-extraction through none.
    workspace: transient tensors that exist in every mode, even with nothing saved, for the
    widest layer: its input, the gate input projections and activations (``2GH``), the states
    (LSTM 3H, GRU 2H), and two pooling temporaries (``2W``) per token. Checked against the peak
    RSS of real train steps on this host (LSTM, E=128, H=256, 2 layers, two runs each): batch 64
    x 400 tokens measured 728-751 / estimated 793 MiB (full), 537-580 / 574 (fine-tune), 375-377 /
    362 (feature-extraction); batch 16 x 200: 104-109 / 139 (full), 54-57 / 55 (feature-extraction).
    Not yet checked for GRU or bidirectional models.
    """
    from fedrnn.models import TRANSFER_MODES

    if mode not in TRANSFER_MODES:
        raise DeviceError(f"transfer mode must be one of {TRANSFER_MODES}, got {mode!r}")
    if optimizer not in OPTIMIZER_STATE_SLOTS:
        raise DeviceError(f"optimizer must be one of {sorted(OPTIMIZER_STATE_SLOTS)}, got {optimizer!r}")
    if batch_size < 1 or seq_len < 1:
        raise DeviceError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    n_all, n_train = _parameter_counts(model_cfg, mode)

    cfg = model_cfg
    directions = 2 if cfg.bidirectional else 1
    width = cfg.hidden_size * directions
    per_step = 7 if cfg.cell == "lstm" else 5
    layers = {"full": range(cfg.num_layers), "fine-tune": [cfg.num_layers - 1], "feature-extraction": []}[mode]
    act_floats, mask_bytes = 0, 0
    for layer in layers:
        inp = cfg.embed_dim if layer == 0 else width
        act_floats += directions * batch_size * seq_len * (inp + per_step * cfg.hidden_size)
        mask_bytes += batch_size * seq_len * inp
    head_in = width * (2 if cfg.pooling == "meanmax" else 1)
    gates, states = (4, 3) if cfg.cell == "lstm" else (3, 2)
    workspace = (
        batch_size
        * seq_len
        * (max(cfg.embed_dim, width) + directions * (2 * gates + states) * cfg.hidden_size + 2 * width)
    )
    return {
        "weights": n_all * FLOAT_BYTES,
        "grads": n_train * FLOAT_BYTES * ((batch_size + 1) if dp else 1),
        "optimizer": n_train * FLOAT_BYTES * OPTIMIZER_STATE_SLOTS[optimizer],
        "activations": act_floats * FLOAT_BYTES + mask_bytes + batch_size * (head_in + cfg.num_classes) * FLOAT_BYTES,
        "workspace": workspace * FLOAT_BYTES,
        "inputs": batch_size * seq_len * 8,
    }


def estimate_training_memory(
    model_cfg: Any, mode: str, batch_size: int, seq_len: int, optimizer: str = "adam", dp: bool = False
) -> int:
    """Total bytes a client needs to train (sum of :func:`memory_breakdown`)."""
    return sum(memory_breakdown(model_cfg, mode, batch_size, seq_len, optimizer, dp).values())


@dataclass
class MemoryDecision:
    """How a client fits its RAM budget: status ok / reduced-batch / feature-extraction / excluded."""

    status: str
    mode: str
    batch_size: int
    estimated_bytes: int
    ram_bytes: float | None
    reason: str


def adapt_to_memory(
    model_cfg: Any,
    mode: str,
    batch_size: int,
    seq_len: int,
    ram_bytes: float,
    optimizer: str = "adam",
    dp: bool = False,
    min_batch_size: int = 8,
) -> MemoryDecision:
    """Fit training into ``ram_bytes``: halve the batch down to ``min_batch_size``, then fall back to
    feature-extraction (largest batch of the same halving ladder that fits), else exclude."""
    if min_batch_size < 1 or batch_size < 1:
        raise DeviceError(f"batch sizes must be >= 1, got batch_size={batch_size}, min_batch_size={min_batch_size}")
    ladder = [batch_size]
    while ladder[-1] // 2 >= min_batch_size:
        ladder.append(ladder[-1] // 2)
    budget = None if math.isinf(ram_bytes) else float(ram_bytes)

    def need(m: str, b: int) -> int:
        return estimate_training_memory(model_cfg, m, b, seq_len, optimizer, dp)

    for b in ladder:
        if need(mode, b) <= ram_bytes:
            if b == batch_size:
                return MemoryDecision("ok", mode, b, need(mode, b), budget, "fits")
            return MemoryDecision(
                "reduced-batch",
                mode,
                b,
                need(mode, b),
                budget,
                f"batch {batch_size} needs {need(mode, batch_size)} B > {ram_bytes:.0f} B; batch {b} fits",
            )
    if mode != "feature-extraction":
        for b in ladder:
            if need("feature-extraction", b) <= ram_bytes:
                return MemoryDecision(
                    "feature-extraction",
                    "feature-extraction",
                    b,
                    need("feature-extraction", b),
                    budget,
                    f"{mode} needs {need(mode, ladder[-1])} B even at batch {ladder[-1]}; "
                    f"feature-extraction at batch {b} fits",
                )
    smallest = need("feature-extraction", ladder[-1])
    return MemoryDecision(
        "excluded",
        mode,
        ladder[-1],
        smallest,
        budget,
        f"needs at least {smallest} B (feature-extraction, batch {ladder[-1]}) > {ram_bytes:.0f} B",
    )


# --------------------------------------------------------------------------------------------
# Host compute calibration
# --------------------------------------------------------------------------------------------

_THROUGHPUT_CACHE: dict[tuple, float] = {}


def measure_host_throughput(
    model: Any,
    batch_size: int,
    seq_len: int,
    *,
    steps: int = 5,
    warmup: int = 2,
    threads: int = 1,
    dp: bool = False,
    seed: int = 0,
) -> float:
    """Samples/s of real training steps of (a copy of) ``model`` on this host, cached per setting.

    Runs ``warmup`` + ``steps`` Adam steps on random token ids of shape ``(batch_size, seq_len)``
    (every review full length, the worst case for a recurrent model) training exactly the
    parameters that require grad in ``model`` - so set the transfer mode first. The median step
    time is used, which shrugs off other jobs sharing the CPU. ``dp`` wraps the copy in Opacus'
    GradSampleModule so per-sample gradients are part of the cost. The caller's model is untouched.
    """
    import torch
    from torch.nn import functional as F

    if batch_size < 1 or seq_len < 1 or steps < 1 or warmup < 0 or threads < 1:
        raise DeviceError("batch_size, seq_len, steps and threads must be >= 1 and warmup >= 0")
    trainable = tuple(n for n, p in model.named_parameters() if p.requires_grad)
    if not trainable:
        raise DeviceError("the model has no trainable parameters; set the transfer mode first")
    cfg = model.cfg
    key = (
        tuple(sorted(cfg.to_dict().items())),
        type(model._modules["rnn"][0]["fwd"]).__name__,
        trainable,
        batch_size,
        seq_len,
        steps,
        warmup,
        threads,
        dp,
        seed,
    )
    if key in _THROUGHPUT_CACHE:
        return _THROUGHPUT_CACHE[key]

    work = copy.deepcopy(model).train()
    params = [p for p in work.parameters() if p.requires_grad]
    if dp:
        from opacus import GradSampleModule

        work = GradSampleModule(work)
    opt = torch.optim.Adam(params, lr=1e-4)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, max(cfg.vocab_size, 3), (batch_size, seq_len), generator=g)
    lengths = torch.full((batch_size,), seq_len, dtype=torch.long)
    labels = torch.randint(0, cfg.num_classes, (batch_size,), generator=g)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    times = []
    try:
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(work(ids, lengths), labels).backward()
            opt.step()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    rate = batch_size / statistics.median(times)
    _THROUGHPUT_CACHE[key] = rate
    return rate
