"""Resource-limited edge devices: compute, network, availability, memory and a simulated clock.

The server's round loop uses this package to decide *who can take part* in a round and *how
long the round takes* in simulated time, from the real payload bytes and the real amount of
local work. Nothing here runs Flower; everything is plain Python/numpy plus one short torch
measurement (:func:`measure_host_throughput`), so the simulation is grounded in how fast the
real model trains on this host. torch is imported lazily, only by the memory and calibration
functions, so planning rounds never pays for it.

One job per module: ``profiles`` (devices and networks with their sources), ``availability``
(online patterns), ``fleet`` (who has which device), ``trace`` (trace-file loading and its
format), ``clock`` (round planning), ``memory`` (training-memory estimate and adaptation),
``calibration`` (host throughput). :mod:`fedrnn.plugins.devices` wires them into the round loop.

API (what the server calls, in round order)
-------------------------------------------
``fleet = Fleet.from_mix(num_clients, {"rpi4": 0.5, "phone-low": 0.5}, seed=0, networks=None)``
    or ``load_trace("configs/fleets/example_trace.csv")`` (CSV or JSON, see ``trace``).
``ids = fleet.available(sim_time)``; ``selected = select_clients(ids, k, rng)``. ``sim_time`` is
    seconds since 00:00 UTC of day 0; diurnal windows read the local hour from it. When nobody
    is online, ``fleet.next_available_time(sim_time)`` says when to resume.
``decision = adapt_to_memory(model_cfg, mode, batch_size, seq_len, fleet.ram_bytes[c])`` per
    selected client: ok / reduced-batch / feature-extraction / excluded, with the reason.
``sps = measure_host_throughput(model, batch_size, seq_len)`` (cached) for the batch size and
    trainable set the client will use; a client's own speed is ``sps * relative_speed``
    unless the trace gives it absolute samples/s (:meth:`Fleet.samples_per_s`).
``plan = plan_round(fleet, selected, bytes_down=..., bytes_up=..., work_samples=...,
    batch_size=..., host_samples_per_s=..., deadline_s=..., policy="drop"|"partial"|"wait",
    rng=rng, sim_time=t, excluded_memory=..., local_steps=...)`` -> :class:`RoundPlan` with one
    :class:`ClientPlan` per selected client (status ok/partial/late/dropout/unavailable/
    excluded-memory, the number of local ``steps`` to actually train, times, bytes) and the
    round's simulated ``duration_s``. The caller trains only ``plan.accepted()`` clients,
    each for ``steps`` steps, then advances ``sim_time += plan.duration_s``.
``summarize_by_class(plans)`` -> per-device-class participation, time and bytes (JSON-ready).
``estimate_training_memory(model_cfg, mode, batch_size, seq_len, optimizer, dp)`` -> bytes.
``estimate_inference_memory(model_cfg, seq_len, model_file_bytes, tokenizer_bytes)`` -> bytes the
    exported student needs to classify one review (the edge search's RAM budget check).
"""

from fedrnn.devices.availability import (
    CHURN_MEAN_OFF_S,
    CHURN_MEAN_ON_S,
    DIURNAL_PHASE_SPREAD_H,
    DIURNAL_WINDOW_H,
    HOUR,
    AlwaysOn,
    Availability,
    Churn,
    Diurnal,
    TraceWindows,
    make_availability,
)
from fedrnn.devices.calibration import measure_host_throughput
from fedrnn.devices.clock import POLICIES, STATUSES, ClientPlan, RoundPlan, plan_round, summarize_by_class
from fedrnn.devices.errors import DeviceError
from fedrnn.devices.fleet import Fleet, select_clients
from fedrnn.devices.memory import (
    OPTIMIZER_STATE_SLOTS,
    MemoryDecision,
    adapt_to_memory,
    estimate_inference_memory,
    estimate_training_memory,
    memory_breakdown,
)
from fedrnn.devices.profiles import GIB, HOST_GB6_SINGLE, MBPS, MIB, NETWORKS, PROFILES, DeviceProfile, Network
from fedrnn.devices.trace import load_trace

__all__ = [
    "CHURN_MEAN_OFF_S",
    "CHURN_MEAN_ON_S",
    "DIURNAL_PHASE_SPREAD_H",
    "DIURNAL_WINDOW_H",
    "GIB",
    "HOST_GB6_SINGLE",
    "HOUR",
    "MBPS",
    "MIB",
    "NETWORKS",
    "OPTIMIZER_STATE_SLOTS",
    "POLICIES",
    "PROFILES",
    "STATUSES",
    "AlwaysOn",
    "Availability",
    "Churn",
    "ClientPlan",
    "DeviceError",
    "DeviceProfile",
    "Diurnal",
    "Fleet",
    "MemoryDecision",
    "Network",
    "RoundPlan",
    "TraceWindows",
    "adapt_to_memory",
    "estimate_inference_memory",
    "estimate_training_memory",
    "load_trace",
    "make_availability",
    "measure_host_throughput",
    "memory_breakdown",
    "plan_round",
    "select_clients",
    "summarize_by_class",
]
