"""The round loop of a fedrnn run, driving a Flower strategy over a Grid.

Per round: select clients -> send the trainable tensors -> collect replies -> check them ->
let the Flower strategy aggregate -> federated and server-side evaluation -> log and
checkpoint. The same loop serves the Simulation Engine (virtual clients placed on
executor nodes) and the Deployment Engine (each SuperNode is one device).

Rounds are reproducible: every random choice derives from (seed, round, client), replies
are aggregated in client order, and the strategy's own state is saved, so a resumed run
ends with the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from rich.console import Console

from fedrnn.config import RunConfig
from fedrnn.evaluation import ServerEvaluator
from fedrnn.models import trainable_names
from fedrnn.rundir import RunDir
from fedrnn.strategies import load_strategy_state, strategy_state
from fedrnn.target import load_target
from fedrnn.task import build_model, load_base
from fedrnn.wire import from_record, record_nbytes, to_record


@dataclass(frozen=True)
class Prepared:
    """Files a run reads, prepared before the ServerApp starts."""

    teacher_dir: str
    target_path: str
    partitions_path: str
    run_dir: str


class Placement(Protocol):
    def place(self, grid: Grid, clients: list[int]) -> list[int]: ...

    def candidates(self, grid: Grid, cfg: RunConfig) -> list[int]: ...


class VirtualClients:
    """Simulation: clients are virtual (a data shard and a device), nodes are executors.

    This is why 10,000 clients cost what 100 do: only sampled clients run, each on any node.
    """

    def __init__(self, wait_s: float = 120.0) -> None:
        self.wait_s = wait_s

    def candidates(self, grid: Grid, cfg: RunConfig) -> list[int]:
        return list(range(cfg.run.clients))

    def place(self, grid: Grid, clients: list[int]) -> list[int]:
        nodes = _wait_for_nodes(grid, 1, self.wait_s)
        return [nodes[i % len(nodes)] for i in range(len(clients))]


class DeviceNodes:
    """Deployment: every connected SuperNode is one device; the client id is its node id."""

    def __init__(self, min_nodes: int, wait_s: float = 120.0) -> None:
        self.min_nodes, self.wait_s = min_nodes, wait_s

    def candidates(self, grid: Grid, cfg: RunConfig) -> list[int]:
        return _wait_for_nodes(grid, self.min_nodes, self.wait_s)

    def place(self, grid: Grid, clients: list[int]) -> list[int]:
        return list(clients)


def _wait_for_nodes(grid: Grid, minimum: int, wait_s: float) -> list[int]:
    """Nodes register asynchronously: wait (bounded) until ``minimum`` are connected."""
    deadline = time.monotonic() + wait_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of {minimum} nodes connected after {wait_s:.0f} s")
        time.sleep(0.2)


class _OneNode:
    """A stand-in Grid offering the strategy a single node, so it builds one message we copy."""

    def __init__(self, node: int) -> None:
        self.node = node

    def get_node_ids(self) -> list[int]:
        return [self.node]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class Federation:
    def __init__(self, cfg: RunConfig, prepared: Prepared, strategy: Strategy, placement: Placement | None = None,
                 console: Console | None = None) -> None:
        self.cfg, self.prepared, self.strategy = cfg, prepared, strategy
        self.placement = placement or VirtualClients()
        self.run_dir = RunDir(prepared.run_dir)
        self.base = load_base(prepared.teacher_dir)
        self.target = load_target(prepared.target_path)
        self.evaluator = ServerEvaluator(self.target, cfg.server.target_test_examples, cfg.run.seed)
        self.console = console or Console()
        self.on_round: list[Callable[[dict[str, Any]], None]] = []

    # ------------------------------------------------------------------ model
    def initial_arrays(self) -> dict[str, np.ndarray]:
        model = build_model(self.base, {}, self.cfg.run.mode)
        names = trainable_names(model, self.cfg.run.mode)
        return {n: model.state_dict()[n].numpy().astype(np.float32) for n in names}

    def global_model(self, arrays: dict[str, np.ndarray]) -> torch.nn.Module:
        return build_model(self.base, arrays, self.cfg.run.mode)

    # ------------------------------------------------------------------ messages
    def _client_config(self, rnd: int, client: int) -> ConfigRecord:
        c = self.cfg.client
        return ConfigRecord({
            "server-round": rnd, "client-id": client, "seed": self.cfg.run.seed, "mode": self.cfg.run.mode,
            "lr": c.lr, "local-epochs": c.local_epochs, "batch-size": c.batch_size, "max-steps": c.max_steps,
            "clip-norm": c.clip_norm, "holdout-fraction": c.holdout_fraction,
            "threads": self.cfg.simulation.threads_per_actor,
            "teacher-path": self.prepared.teacher_dir, "target-path": self.prepared.target_path,
            "partitions-path": self.prepared.partitions_path,
        })

    def _messages(self, grid: Grid, rnd: int, arrays: dict[str, np.ndarray], clients: list[int],
                  message_type: str) -> tuple[list[Message], dict[int, int]]:
        nodes = self.placement.place(grid, clients)
        record = to_record(arrays)
        extra: dict[str, Any] = {}
        if message_type == MessageType.TRAIN:  # let the strategy add its keys (e.g. proximal-mu)
            proto = list(self.strategy.configure_train(rnd, record, ConfigRecord(), _OneNode(nodes[0])))
            extra = dict(proto[0].content["config"]) if proto else {}
        msgs, owner = [], {}
        for client, node in zip(clients, nodes, strict=True):
            config = ConfigRecord({**extra, **self._client_config(rnd, client)})
            msg = Message(RecordDict({"arrays": record, "config": config}), dst_node_id=node, message_type=message_type)
            msgs.append(msg)
            owner[id(msg)] = client
        return msgs, owner

    # ------------------------------------------------------------------ the loop
    def run(self, grid: Grid) -> dict[str, Any]:
        cfg = self.cfg
        arrays, start = self.initial_arrays(), 1
        totals = {"client_train_seconds": 0.0, "bytes_down": 0, "bytes_up": 0, "failures": 0}
        resumed = self.run_dir.load_state()
        if resumed is not None:
            state, saved = resumed
            start = int(state["round"]) + 1
            arrays = {k[len("global/"):]: v for k, v in saved.items() if k.startswith("global/")}
            load_strategy_state(self.strategy, {k[len("strategy/"):]: v for k, v in saved.items()
                                                if k.startswith("strategy/")})
            totals = state["totals"]
            self.run_dir.truncate_metrics(start - 1)
            self.console.print(f"[bold]resuming[/] {self.run_dir.path} at round {start}")
        if start == 1:
            row0 = {"round": 0, **self.evaluator(self.global_model(arrays))}
            self.run_dir.append_metrics(row0)
        t_run = time.perf_counter()
        for rnd in range(start, cfg.run.rounds + 1):
            t0 = time.perf_counter()
            rng = np.random.default_rng([cfg.run.seed, rnd])
            candidates = self.placement.candidates(grid, cfg)
            k = min(cfg.run.clients_per_round, len(candidates))
            clients = sorted(int(c) for c in rng.choice(candidates, size=k, replace=False))

            msgs, owner = self._messages(grid, rnd, arrays, clients, MessageType.TRAIN)
            bytes_down = sum(record_nbytes(m.content["arrays"]) for m in msgs)
            replies = list(grid.send_and_receive(msgs, timeout=cfg.server.timeout_s))
            ok = sorted((r for r in replies if not r.has_error()),
                        key=lambda r: int(r.content["metrics"]["client-id"]))
            failures = len(msgs) - len(ok)
            bytes_up = sum(record_nbytes(r.content["arrays"]) for r in ok)
            client_seconds = sum(float(r.content["metrics"]["train-seconds"]) for r in ok)
            if ok:
                agg, _ = self.strategy.aggregate_train(rnd, ok)
                if agg is not None:
                    arrays = {k: v.astype(np.float32) for k, v in from_record(agg).items()}
            row: dict[str, Any] = {
                "round": rnd, "clients": clients, "trained": len(ok), "failures": failures,
                "train_loss": float(np.mean([r.content["metrics"]["train-loss"] for r in ok])) if ok else None,
                "bytes_down": bytes_down, "bytes_up": bytes_up, "client_train_seconds": client_seconds,
            }
            row |= self._federated_evaluation(grid, rnd, arrays, rng, clients)
            if rnd % cfg.server.eval_every == 0 or rnd == cfg.run.rounds:
                row |= self.evaluator(self.global_model(arrays))
            row["round_seconds"] = time.perf_counter() - t0
            for hook in self.on_round:
                hook(row)
            totals = {"client_train_seconds": totals["client_train_seconds"] + client_seconds,
                      "bytes_down": totals["bytes_down"] + bytes_down, "bytes_up": totals["bytes_up"] + bytes_up,
                      "failures": totals["failures"] + failures}
            self._checkpoint(rnd, arrays, totals, row)
        wall = time.perf_counter() - t_run
        return {"rounds_run": cfg.run.rounds - start + 1, "wall_seconds": wall, **totals}

    def _federated_evaluation(self, grid: Grid, rnd: int, arrays: dict[str, np.ndarray], rng: np.random.Generator,
                              clients: list[int]) -> dict[str, Any]:
        n = int(round(self.cfg.server.fraction_evaluate * len(clients)))
        if n == 0:
            return {}
        chosen = sorted(int(c) for c in rng.choice(clients, size=n, replace=False))
        msgs, _ = self._messages(grid, rnd, arrays, chosen, MessageType.EVALUATE)
        replies = [r for r in grid.send_and_receive(msgs, timeout=self.cfg.server.timeout_s) if not r.has_error()]
        accs = [float(r.content["metrics"]["eval-accuracy"]) for r in replies
                if "eval-accuracy" in r.content["metrics"]]
        return {"fed_eval_clients": len(accs), "fed_eval_accuracy_mean": float(np.mean(accs)) if accs else None,
                "fed_eval_accuracy_p10": percentile(accs, 10) if accs else None}

    def _checkpoint(self, rnd: int, arrays: dict[str, np.ndarray], totals: dict[str, Any], row: dict[str, Any]) -> None:
        model_state = self.global_model(arrays).state_dict()
        saved = {f"global/{k}": v for k, v in arrays.items()}
        saved |= {f"strategy/{k}": v for k, v in strategy_state(self.strategy).items()}
        self.run_dir.append_metrics(row)
        self.run_dir.save_round(rnd, model_state, saved, {"totals": totals})
