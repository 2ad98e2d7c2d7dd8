"""The simulated clock: how long each selected client takes, who makes the deadline, how long the round lasts.

A client's time = download (latency + bytes_down*8/down_bps) + compute (work_samples /
samples_per_s) + upload (latency + bytes_up*8/up_bps), from the real payload bytes and the
real local work the caller passes in. Policies for stragglers past the deadline: ``drop``
(late updates discarded; the round ends at the deadline, or when the last client reports or
fails if all do so earlier), ``partial`` (a late client trains only the steps that fit before
the deadline; one that cannot fit download + one step + upload is late), ``wait`` (the round
lasts until every client has reported or failed). A client drops out mid-round with its
profile's probability (at a uniform point of its work) or when its availability window
closes before it finishes; a dropped update is lost.

Left out: server-side aggregation and evaluation time, and contention on a shared access
point (every client gets its network's full bandwidth).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fedrnn.devices.errors import DeviceError
from fedrnn.devices.fleet import Fleet

POLICIES = ("drop", "partial", "wait")
STATUSES = ("ok", "partial", "late", "dropout", "unavailable", "excluded-memory")


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
    local_steps: int | Sequence[int] | np.ndarray | None = None,
) -> RoundPlan:
    """Simulate one round for ``selected`` clients starting at ``sim_time`` (see module docstring).

    Per-client arguments are scalars or arrays aligned with ``selected``. ``work_samples`` is
    what a client would train on with no deadline; ``local_steps`` the number of optimizer
    steps that takes (default ``ceil(work_samples / batch_size)``; pass the real count when
    epochs end in a short batch, so a client's planned steps equal the steps it trains).
    ``rng`` is used for mid-round dropouts only, two draws per selected client whatever
    happens, so a fixed seed gives the same plan.
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
    if local_steps is None:
        steps_total = np.ceil(work / batch).astype(int)
    else:
        steps_total = _per_client(local_steps, n, "local_steps").astype(int)
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

