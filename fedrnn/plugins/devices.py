"""Round plugin that puts a simulated device fleet (``fedrnn.devices``) under the federation.

Each round it keeps only online devices as candidates (skipping the clock ahead when nobody is
online), fits every selected client's training into its RAM (smaller batch, or feature
extraction, or excluded), plans the round on the simulated clock from the bytes that really
travel and the local work each client really does, and lets only the clients that report in
time train - partial clients for exactly the steps that fit. The metrics say who took part per
device class, what was sent, and how the global model serves each class's users.

Reproducibility: the fleet is rebuilt from the seed (or the trace), every random draw comes
from the round's seeded generator, and the simulated time and the host throughput measured at
the start of the run are saved with each round, so ``--resume`` continues the same clock.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from fedrnn.config import DevicesSection, RunConfig
from fedrnn.data.partitions import load_partitions, split_holdout
from fedrnn.data.tokenizer import Encoded
from fedrnn.devices import (
    HOUR,
    Fleet,
    MemoryDecision,
    RoundPlan,
    adapt_to_memory,
    load_trace,
    measure_host_throughput,
    plan_round,
    summarize_by_class,
)
from fedrnn.edge.quantize import encode
from fedrnn.federation.local import build_model
from fedrnn.federation.messages import METRICS, Task, TrainReport
from fedrnn.federation.plugin import RoundInfo, RoundPlugin, RunContext
from fedrnn.federation.wire import record_nbytes, to_record
from fedrnn.model.training import evaluate

REPORTED = ("ok", "partial")


def local_work(train_examples: int, epochs: int, batch_size: int, max_steps: int) -> tuple[int, int]:
    """(samples, optimizer steps) a client trains with no deadline, as ``fedrnn.model.training.train_steps`` does.

    Every epoch is ``ceil(n / batch)`` length-bucketed batches; ``max_steps`` (0 = none) caps the
    steps, and then the samples at ``max_steps x batch``.
    """
    steps = epochs * math.ceil(train_examples / batch_size)
    samples = epochs * train_examples
    if max_steps:
        steps, samples = min(steps, max_steps), min(samples, max_steps * batch_size)
    return samples, steps


def build_fleet(cfg: RunConfig) -> Fleet:
    """The run's device fleet, the same for every caller: from the trace, or the mix drawn from the seed."""
    d = cfg.devices
    if d.trace:
        return load_trace(d.trace)  # checked against run.clients by prepare_run
    return Fleet.from_mix(cfg.run.clients, d.mix, seed=cfg.run.seed, networks=d.network or d.network_mix or None,
                          availability=d.availability or None)


class DeviceSimulation(RoundPlugin):
    name = "devices"

    def __init__(self, cfg: DevicesSection) -> None:
        self.cfg = cfg
        self.start = cfg.start_hour * HOUR
        self.sim_time = self.start  # the clock: seconds since 00:00 UTC of day 0
        self.host_sps: dict[str, float] = {}  # "mode/batch" -> samples/s measured on this host, once per run
        self.idle_s = 0.0  # simulated seconds skipped this round because no device was online
        self.plan: RoundPlan | None = None
        self.payload = (0, 0)  # this round's bytes per client (down, up)

    # ------------------------------------------------------------------ setup
    def setup(self, ctx: RunContext) -> None:
        if not ctx.simulated:
            raise ValueError("[devices] simulates a fleet of virtual clients; in deployment every SuperNode is a "
                             "real device, so set devices.enabled = false")
        self.ctx = ctx
        run, c = ctx.cfg.run, ctx.cfg.client
        self.fleet = build_fleet(ctx.cfg)
        splits = [split_holdout(s, c.holdout_fraction, run.seed, i)
                  for i, s in enumerate(load_partitions(ctx.files.partitions_path))]
        self.train_sizes = [len(train) for train, _ in splits]
        self.dp = ctx.cfg.privacy.record_level
        # RAM budgets never change, so each client's fit is decided once; a batch of full-length
        # reviews (the teacher's max_len) is the peak a client can meet.
        decisions: dict[float, MemoryDecision] = {}
        self.memory = [decisions.setdefault(float(ram), adapt_to_memory(
            ctx.base.cfg, run.mode, c.batch_size, ctx.base.max_len, float(ram), dp=self.dp,
            min_batch_size=self.cfg.min_batch_size)) for ram in self.fleet.ram_bytes]
        # Compute is timed at the mean review length of the target pool: batches are length-bucketed
        # and trimmed, so a typical sample costs a mean-length review.
        self.seq_len = max(1, round(float(np.mean(ctx.target.pool.lengths))))
        for d in decisions.values():
            if d.status != "excluded":
                self._host_throughput(d)
        self.class_eval = self._class_eval_sets([held for _, held in splits]) if self.cfg.per_class_eval else {}

    def _host_throughput(self, d: MemoryDecision) -> float:
        """Samples/s of real training steps on this host for the decision's mode and batch (stored for resume)."""
        if self.cfg.host_samples_per_s:
            return self.cfg.host_samples_per_s
        key = f"{d.mode}/{d.batch_size}"
        if key not in self.host_sps:
            model = build_model(self.ctx.base, {}, d.mode, dp=self.dp)
            self.host_sps[key] = measure_host_throughput(model, d.batch_size, self.seq_len, dp=self.dp)
        return self.host_sps[key]

    def _class_eval_sets(self, held: list[np.ndarray]) -> dict[str, Encoded]:
        """Each device class's users' held-out reviews (a fixed seeded subset if capped)."""
        pool, cap, out = self.ctx.target.pool, self.cfg.class_eval_examples, {}
        for i, cls in enumerate(sorted(set(self.fleet.device_class))):
            idx = np.concatenate([h for h, k in zip(held, self.fleet.device_class, strict=True) if k == cls])
            if cap and len(idx) > cap:
                idx = np.sort(np.random.default_rng([self.ctx.cfg.run.seed, 9, i]).choice(idx, cap, replace=False))
            out[cls] = pool.subset(idx)
        return out

    def _payload_bytes(self, info: RoundInfo) -> tuple[int, int]:
        """Bytes of one client's download and upload: the records that really travel this round.

        Down: what the round loop sends (``RunContext.encode_down``: ``fedrnn.plugins.compression``
        encodes int8; encoding is deterministic, so this call yields the same record). Up: the trained
        tensors, or their int8 update under ``compression.uplink`` (same names and shapes as the
        download, so the same int8 size whatever the values).
        """
        arrays = info.arrays
        down = to_record(self.ctx.encode_down(arrays, info.number, MessageType.TRAIN))
        up = to_record(encode(arrays) if self.ctx.cfg.compression.uplink == "int8" else arrays)
        return record_nbytes(down), record_nbytes(up)

    # ------------------------------------------------------------------ round hooks
    def candidates(self, rnd: int, clients: list[int]) -> list[int]:
        self.idle_s = 0.0
        online = self.fleet.available(self.sim_time)
        if online.size == 0:  # nobody online: wait (in simulated time) for the first device to come back
            nxt = self.fleet.next_available_time(self.sim_time)
            if math.isinf(nxt):
                return []
            self.idle_s, self.sim_time = nxt - self.sim_time, nxt
            online = self.fleet.available(self.sim_time)
        keep = set(online.tolist())
        return [c for c in clients if c in keep]

    def configure(self, info: RoundInfo, clients: list[int],
                  rng: np.random.Generator) -> dict[int, dict[str, Any] | None]:
        c = self.ctx.cfg.client
        decisions = [self.memory[k] for k in clients]
        work = [local_work(self.train_sizes[k], c.local_epochs, d.batch_size, c.max_steps)
                for k, d in zip(clients, decisions, strict=True)]
        self.payload = self._payload_bytes(info)
        self.plan = plan_round(
            self.fleet, clients, bytes_down=self.payload[0], bytes_up=self.payload[1],
            work_samples=[w for w, _ in work], local_steps=[s for _, s in work],
            batch_size=[d.batch_size for d in decisions],
            host_samples_per_s=[1.0 if d.status == "excluded" else self._host_throughput(d) for d in decisions],
            deadline_s=self.cfg.deadline_s or None, policy=self.cfg.policy, rng=rng, sim_time=self.sim_time,
            excluded_memory=[d.status == "excluded" for d in decisions],
        )
        self.sim_time += self.plan.duration_s
        return {cp.client_id: Task.overrides(max_steps=cp.steps, batch_size=d.batch_size, train_mode=d.mode)
                if cp.status in REPORTED else None
                for cp, d in zip(self.plan.clients, decisions, strict=True)}

    def on_replies(self, info: RoundInfo, replies: list[Message]) -> tuple[list[Message], dict[str, Any]]:
        plan = self.plan
        if plan is None:
            raise RuntimeError("on_replies before configure: the round loop plans every round first")
        trained = {info.client_of(r): int(r.content[METRICS][TrainReport.key("steps")]) for r in replies}
        statuses = Counter(cp.status for cp in plan.clients)
        adapted = {str(cp.client_id): {"status": d.status, "mode": d.mode, "batch_size": d.batch_size}
                   for cp in plan.clients if (d := self.memory[cp.client_id]).status != "ok"}
        clients = {str(cp.client_id): {"class": cp.device_class, "status": cp.status, "steps": cp.steps,
                                       "steps_total": cp.steps_total, "time_s": cp.time_s,
                                       "trained_steps": trained.get(cp.client_id)}
                   for cp in plan.clients}
        return replies, {
            "sim_time_h": (self.sim_time - self.start) / HOUR,  # simulated hours since the run started
            "round_sim_seconds": plan.duration_s,
            "idle_sim_seconds": self.idle_s,
            "stragglers": statuses["late"] + statuses["partial"],
            "late": statuses["late"],
            "partial": statuses["partial"],
            "dropouts": statuses["dropout"],
            "excluded_memory": statuses["excluded-memory"],
            "memory_adapted": adapted,
            "device_classes": summarize_by_class(plan),
            "device_clients": clients,
            "payload_bytes": {"down": self.payload[0], "up": self.payload[1]},
            "host_samples_per_s": {"configured": self.cfg.host_samples_per_s} if self.cfg.host_samples_per_s
            else dict(self.host_sps),
        }

    def after_aggregate(self, info: RoundInfo, grid: Grid, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        """Accuracy of the new global model for each device class's users, on the server's eval rounds."""
        cfg, rnd = self.ctx.cfg, info.number
        if not self.class_eval or not (rnd % cfg.server.eval_every == 0 or rnd == cfg.run.rounds):
            return {}
        model = self.ctx.global_model(arrays)
        return {f"class_accuracy/{cls}": evaluate(model, data)["accuracy"] for cls, data in self.class_eval.items()}

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"sim_time": self.sim_time, "host_sps": self.host_sps}, {}

    def load_state(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.sim_time = float(state.get("sim_time", self.start))
        self.host_sps = {k: float(v) for k, v in state.get("host_sps", {}).items()}
