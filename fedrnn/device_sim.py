"""Round plugin that puts a simulated device fleet under the federation.

Each round it keeps only online devices as candidates, fits every selected client's training
into its RAM (smaller batch, or feature extraction, or excluded), plans the round on the
simulated clock from the real payload bytes and the real local work, and lets only the
clients that report in time train (partial clients for as many steps as fit). The metrics
say who took part per device class, what was sent, and how the global model serves each
class's users.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from fedrnn.config import DevicesSection
from fedrnn.devices import Fleet, RoundPlan, adapt_to_memory, measure_host_throughput, plan_round, summarize_by_class
from fedrnn.federation import Federation, RoundPlugin
from fedrnn.models import set_trainable
from fedrnn.partitions import load_partitions, split_holdout
from fedrnn.task import build_model
from fedrnn.training import evaluate


class DeviceSimulation(RoundPlugin):
    name = "devices"

    def __init__(self, cfg: DevicesSection) -> None:
        self.cfg = cfg
        self.sim_time = 0.0
        self.host_sps: dict[str, float] = {}  # "mode/batch" -> samples/s, measured once per run
        self.plan: RoundPlan | None = None

    def setup(self, fed: Federation) -> None:
        self.fed = fed
        n = fed.cfg.run.clients
        if self.cfg.trace:
            self.fleet = Fleet.from_trace(self.cfg.trace)
            if len(self.fleet) != n:
                raise ValueError(f"devices.trace {self.cfg.trace} has {len(self.fleet)} clients but run.clients = {n}")
        else:
            self.fleet = Fleet.from_mix(n, self.cfg.mix, seed=fed.cfg.run.seed, networks=self.cfg.network or None,
                                        availability=self.cfg.availability or None)
        c = fed.cfg.client
        shards = load_partitions(fed.prepared.partitions_path)
        self.splits = [split_holdout(s, c.holdout_fraction, fed.cfg.run.seed, i) for i, s in enumerate(shards)]
        self.payload = sum(a.nbytes for a in fed.initial_arrays().values())

    def _host_throughput(self, mode: str, batch: int) -> float:
        """Measured samples/s on this host for (mode, batch); stored so a resumed run reuses it."""
        if self.cfg.host_samples_per_s:
            return self.cfg.host_samples_per_s
        key = f"{mode}/{batch}"
        if key not in self.host_sps:
            model = build_model(self.fed.base, {}, mode)
            set_trainable(model, mode)
            self.host_sps[key] = measure_host_throughput(model, batch, self.fed.base.max_len // 2)
        return self.host_sps[key]

    def candidates(self, rnd: int, clients: list[int]) -> list[int]:
        online = set(self.fleet.available(self.sim_time).tolist())
        return [c for c in clients if c in online]

    def configure(self, rnd: int, clients: list[int], rng: np.random.Generator) -> dict[int, dict[str, Any] | None]:
        fed, c = self.fed, self.fed.cfg.client
        decisions = [adapt_to_memory(fed.base.cfg, fed.cfg.run.mode, c.batch_size, fed.base.max_len,
                                     self.fleet.ram_bytes[k], min_batch_size=self.cfg.min_batch_size) for k in clients]
        batches = [d.batch_size for d in decisions]
        work = [c.local_epochs * len(self.splits[k][0]) for k in clients]
        if c.max_steps:
            work = [min(w, c.max_steps * b) for w, b in zip(work, batches, strict=True)]
        self.plan = plan_round(
            self.fleet, clients, bytes_down=self.payload, bytes_up=self.payload, work_samples=work,
            batch_size=batches, host_samples_per_s=[self._host_throughput(d.mode, d.batch_size) for d in decisions],
            deadline_s=self.cfg.deadline_s or None, policy=self.cfg.policy, rng=rng, sim_time=self.sim_time,
            excluded_memory=[d.status == "excluded" for d in decisions],
        )
        self.memory = {k: d for k, d in zip(clients, decisions, strict=True)}
        out: dict[int, dict[str, Any] | None] = {}
        for cp, d in zip(self.plan.clients, decisions, strict=True):
            if cp.status in ("ok", "partial"):
                out[cp.client_id] = {"max-steps": cp.steps, "batch-size": d.batch_size, "train-mode": d.mode}
            else:
                out[cp.client_id] = None
        self.sim_time += self.plan.duration_s
        return out

    def on_replies(self, rnd: int, replies: list[Message]) -> tuple[list[Message], dict[str, Any]]:
        plan = self.plan
        statuses = [cp.status for cp in plan.clients] if plan else []
        adapted = {str(k): d.status for k, d in self.memory.items() if d.status != "ok"}
        return replies, {
            "sim_time_h": self.sim_time / 3600, "round_sim_seconds": plan.duration_s if plan else 0.0,
            "stragglers": statuses.count("late") + statuses.count("partial"), "dropouts": statuses.count("dropout"),
            "excluded_memory": statuses.count("excluded-memory"), "memory_adapted": adapted,
            "device_classes": summarize_by_class(plan) if plan else {},
        }

    def after_aggregate(self, rnd: int, grid: Grid, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        if not self.cfg.per_class_eval:
            return {}
        model = self.fed.global_model(arrays)
        pool = self.fed.target.pool
        out = {}
        for cls in sorted(set(self.fleet.device_class)):
            held = [self.splits[k][1] for k in range(len(self.splits)) if self.fleet.device_class[k] == cls]
            out[f"class_accuracy/{cls}"] = evaluate(model, pool.subset(np.concatenate(held)))["accuracy"]
        return out

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"sim_time": self.sim_time, "host_sps": self.host_sps}, {}

    def load_state(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.sim_time = float(state.get("sim_time", 0.0))
        self.host_sps = dict(state.get("host_sps", {}))
