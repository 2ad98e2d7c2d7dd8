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
from fedrnn.data.target import load_target
from fedrnn.federation.evaluation import ServerEvaluator
from fedrnn.federation.local import build_model, load_base
from fedrnn.federation.messages import ARRAYS, CONFIG, METRICS, EvalReport, Task, TrainReport
from fedrnn.federation.plugin import RoundInfo, RoundPlugin, RunContext, percentile
from fedrnn.federation.prepare import RunFiles
from fedrnn.federation.rundir import RunDir
from fedrnn.federation.strategies import load_strategy_state, strategy_state
from fedrnn.federation.wire import from_record, record_nbytes, to_record
from fedrnn.model.rnn import SentimentRNN, trainable_names

TRAIN_SECONDS, TRAIN_LOSS = TrainReport.key("train_seconds"), TrainReport.key("train_loss")
TRAIN_CPU = TrainReport.key("train_cpu_seconds")
# bytes_down_extra: downlink beyond the training broadcast (e.g. a shipped student); *_float32: what float32
# FedAvg would have sent and received in the same mode, the denominator of any compression claim
TOTALS = ("client_train_seconds", "client_cpu_seconds", "bytes_down", "bytes_up", "bytes_down_extra",
          "bytes_down_float32", "bytes_up_float32", "failures")


class Placement(Protocol):
    simulated: bool  # virtual clients on simulated nodes, or one real device per SuperNode

    def place(self, grid: Grid, clients: list[int]) -> list[int]: ...

    def candidates(self, grid: Grid, cfg: RunConfig) -> list[int]: ...


class VirtualClients:
    """Simulation: clients are virtual (a data shard and a device), nodes are executors.

    This is why 10,000 clients cost what 100 do: only sampled clients run, each on any node.
    """

    simulated = True

    def __init__(self, wait_s: float = 120.0) -> None:
        self.wait_s = wait_s

    def candidates(self, grid: Grid, cfg: RunConfig) -> list[int]:
        return list(range(cfg.run.clients))

    def place(self, grid: Grid, clients: list[int]) -> list[int]:
        nodes = _wait_for_nodes(grid, 1, self.wait_s)
        return [nodes[i % len(nodes)] for i in range(len(clients))]


class DeviceNodes:
    """Deployment: every connected SuperNode is one device; the client id is its node id.

    ``min_nodes`` gates the first round only (the fleet assembling); later rounds go ahead
    with the devices online then, so a Pi that loses power cannot stall the fleet: its
    unanswered message counts as a failure and it drops out of selection once the SuperLink
    misses its heartbeats.
    """

    simulated = False

    def __init__(self, min_nodes: int, wait_s: float = 120.0) -> None:
        self.min_nodes, self.wait_s = min_nodes, wait_s
        self._assembled = False

    def candidates(self, grid: Grid, cfg: RunConfig) -> list[int]:
        nodes = _wait_for_nodes(grid, 1 if self._assembled else self.min_nodes, self.wait_s)
        self._assembled = True
        return nodes

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


class OneNodeGrid:
    """A stand-in Grid offering the strategy a single node, so it builds one message we copy."""

    def __init__(self, node: int) -> None:
        self.node = node

    def get_node_ids(self) -> list[int]:
        return [self.node]


def reported_accuracy(reply: Message) -> float | None:
    """A reply's ``eval-accuracy`` if it is a number in [0, 1]; anything else is not counted."""
    metrics = reply.content.metric_records.get(METRICS)
    value = metrics.get(EvalReport.key("eval_accuracy")) if metrics is not None else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        return None
    return float(value)


def sample(rng: np.random.Generator, ids: list[int], k: int) -> list[int]:
    """``k`` of ``ids`` without replacement, sorted.

    Draws positions, not the ids themselves: SuperNode ids are uint64, and numpy would turn a
    list mixing ids above and below 2**63 into float64, corrupting them. For the same
    generator state this picks exactly what ``rng.choice(ids, k)`` picks.
    """
    return sorted(int(ids[i]) for i in rng.choice(len(ids), size=k, replace=False)) if k else []


@dataclass
class RoundReplies:
    """What a round's clients answered, for per-client records (``fedrnn.runs.records``).

    ``sent``: message id -> client of every training message; ``replies``: every training reply,
    error replies included; ``kept``: those aggregated (after every plugin's ``on_replies``);
    ``evaluated``: the federated-evaluation replies without error (none on rounds without one).
    """

    sent: dict[str, int]
    replies: list[Message]
    kept: list[Message]
    evaluated: list[Message]


class Federation:
    """One run: the round loop over ``placement``'s clients, with ``plugins`` (see ``fedrnn.federation.plugin``)."""

    def __init__(self, cfg: RunConfig, files: RunFiles, strategy: Strategy, placement: Placement | None = None,
                 plugins: list[RoundPlugin] | None = None, console: Console | None = None) -> None:
        self.cfg, self.files = cfg, files
        self.placement = placement or VirtualClients()
        self.plugins = plugins or []
        for plugin in self.plugins:
            strategy = plugin.wrap_strategy(strategy)
        self.strategy = strategy
        self.run_dir = RunDir(files.run_dir, cfg.server.keep_checkpoints)
        self.base = load_base(files.teacher_dir)
        self.target = load_target(files.target_path)
        self.evaluator = ServerEvaluator(self.target, cfg.server.target_test_examples, cfg.run.seed)
        self.console = console or Console()
        self.on_round: list[Callable[[dict[str, Any]], None]] = []
        self.on_replies: list[Callable[[dict[str, Any], RoundReplies], None]] = []  # after on_round, per round
        self.context = RunContext(cfg=cfg, files=files, base=self.base, target=self.target, evaluator=self.evaluator,
                                  simulated=self.placement.simulated, global_model=self.global_model,
                                  encode_down=self.encode_down, send=self.send)

    # ------------------------------------------------------------------ model
    def initial_arrays(self) -> dict[str, np.ndarray]:
        """The teacher's trainable tensors, or freshly initialised ones for ``run.init = scratch``."""
        model = build_model(self.base, {}, self.cfg.run.mode)
        if self.cfg.run.init == "scratch":
            torch.manual_seed(self.cfg.run.seed)
            model = SentimentRNN(self.base.cfg)
        names = trainable_names(model, self.cfg.run.mode)
        return {n: model.state_dict()[n].numpy().astype(np.float32) for n in names}

    def global_model(self, arrays: dict[str, np.ndarray]) -> torch.nn.Module:
        return build_model(self.base, arrays, self.cfg.run.mode)

    # ------------------------------------------------------------------ messages
    def task(self, rnd: int, client: int) -> Task:
        c = self.cfg.client
        return Task(
            server_round=rnd, client_id=client, seed=self.cfg.run.seed, mode=self.cfg.run.mode, lr=c.lr,
            local_epochs=c.local_epochs, batch_size=c.batch_size, max_steps=c.max_steps, clip_norm=c.clip_norm,
            holdout_fraction=c.holdout_fraction, threads=self.cfg.simulation.threads_per_actor,
            deadline_s=c.deadline_s or self.cfg.server.timeout_s, teacher_path=self.files.teacher_dir,
            target_path=self.files.target_path, partitions_path=self.files.partitions_path,
            frozen_cache_mb=c.frozen_cache_mb,
        )

    def encode_down(self, arrays: dict[str, np.ndarray], rnd: int, message_type: str) -> dict[str, np.ndarray]:
        """What travels for the global tensors: each plugin's ``encode_down`` in turn (float32 if none encodes)."""
        for plugin in self.plugins:
            arrays = plugin.encode_down(arrays, rnd, message_type)
        return arrays

    def messages(self, grid: Grid, rnd: int, arrays: dict[str, np.ndarray], clients: list[int], message_type: str,
                 overrides: dict[int, dict[str, Any]] | None = None, encoded: bool = False) -> list[Message]:
        """One message per client; the strategy adds its own keys (e.g. FedProx's proximal-mu).

        The strategy always sees the float tensors (FedAdam keeps them as its reference); the
        plugins' ``encode_down`` decides what travels. ``encoded``: ``arrays`` already is a wire
        payload (e.g. an int8 student), not global tensors to encode.
        """
        if not clients:
            return []
        nodes = self.placement.place(grid, clients)
        record = to_record(arrays)
        wire = record if encoded else to_record(self.encode_down(arrays, rnd, message_type))
        extra: dict[str, Any] = {}
        if message_type == MessageType.TRAIN:
            proto = list(self.strategy.configure_train(rnd, record, ConfigRecord(), OneNodeGrid(nodes[0])))
            extra = dict(proto[0].content[CONFIG]) if proto else {}
        msgs = []
        for client, node in zip(clients, nodes, strict=True):
            config = ConfigRecord({**extra, **self.task(rnd, client).to_record(), **(overrides or {}).get(client, {})})
            msgs.append(Message(RecordDict({ARRAYS: wire, CONFIG: config}), dst_node_id=node,
                                message_type=message_type))
        return msgs

    def send(self, grid: Grid, rnd: int, payload: dict[str, np.ndarray], clients: list[int], message_type: str,
             overrides: dict[int, dict[str, Any]] | None = None, encoded: bool = False) -> list[Message]:
        """Send one message per client and wait (bounded by ``server.timeout_s``); the replies without error."""
        msgs = self.messages(grid, rnd, payload, clients, message_type, overrides, encoded)
        if not msgs:
            return []
        return [r for r in grid.send_and_receive(msgs, timeout=self.cfg.server.timeout_s) if not r.has_error()]

    # ------------------------------------------------------------------ resume
    def _restore(self) -> tuple[int, dict[str, np.ndarray], dict[str, Any]]:
        arrays, totals = self.initial_arrays(), dict.fromkeys(TOTALS, 0)
        resumed = self.run_dir.load_state()
        if resumed is None:
            return 1, arrays, totals
        state, saved = resumed

        def part(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}

        saved_global = part("global/")
        arrays = {k: saved_global[k] for k in arrays}  # the run's tensor order, whatever order the file keeps
        load_strategy_state(self.strategy, part("strategy/"), list(arrays))
        for plugin in self.plugins:
            plugin.load_state(state.get("plugins", {}).get(plugin.name, {}), part(f"plugin/{plugin.name}/"))
        last = int(state["round"])
        self.run_dir.truncate_metrics(last)
        self.console.print(f"[bold]resuming[/] {self.run_dir.path} after round {last}")
        return last + 1, arrays, totals | state["totals"]

    def _checkpoint(self, rnd: int, arrays: dict[str, np.ndarray], totals: dict[str, Any], row: dict[str, Any]) -> None:
        saved = {f"global/{k}": v for k, v in arrays.items()}
        saved |= {f"strategy/{k}": v for k, v in strategy_state(self.strategy).items()}
        plugin_json = {}
        for plugin in self.plugins:
            js, arr = plugin.state()
            plugin_json[plugin.name] = js
            saved |= {f"plugin/{plugin.name}/{k}": v for k, v in arr.items()}
        self.run_dir.append_metrics(row)
        self.run_dir.save_round(rnd, self.global_model(arrays).state_dict(), saved,
                                {"totals": totals, "plugins": plugin_json}, row.get("target_accuracy"))

    # ------------------------------------------------------------------ the loop
    def run(self, grid: Grid) -> dict[str, Any]:
        cfg = self.cfg
        start, arrays, totals = self._restore()
        for plugin in self.plugins:
            plugin.setup(self.context)
        if start == 1:
            self.run_dir.append_metrics({"round": 0, **self.evaluator(self.global_model(arrays))})
        t_run = time.perf_counter()
        for rnd in range(start, cfg.run.rounds + 1):
            row = self.round(grid, rnd, arrays)
            arrays, answered = row.pop("_arrays"), row.pop("_replies")
            for key in TOTALS:
                totals[key] += row[key]
            for hook in self.on_round:
                hook(row)
            for reply_hook in self.on_replies:
                reply_hook(row, answered)
            self._checkpoint(rnd, arrays, totals, row)
        return {"rounds_run": cfg.run.rounds - start + 1, "wall_seconds": time.perf_counter() - t_run, **totals}

    def round(self, grid: Grid, rnd: int, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        """One round; returns its metrics row (with the new global arrays under ``_arrays``)."""
        cfg, t0 = self.cfg, time.perf_counter()
        info = RoundInfo(rnd, arrays)  # the global tensors this round's updates are measured against
        rng = np.random.default_rng([cfg.run.seed, rnd])
        candidates = self.placement.candidates(grid, cfg)
        for plugin in self.plugins:
            candidates = plugin.candidates(rnd, candidates)
        k = min(cfg.run.clients_per_round, len(candidates))
        clients = sample(rng, candidates, k)
        overrides: dict[int, dict[str, Any]] = {c: {} for c in clients}
        for plugin in self.plugins:
            for c, extra in plugin.configure(info, clients, rng).items():
                if extra is None:
                    overrides.pop(c, None)
                elif c in overrides:
                    overrides[c] |= extra
        running = sorted(overrides)
        msgs = self.messages(grid, rnd, arrays, running, MessageType.TRAIN, overrides)
        bytes_down = sum(record_nbytes(m.content[ARRAYS]) for m in msgs)
        replies = list(grid.send_and_receive(msgs, timeout=cfg.server.timeout_s)) if msgs else []
        # A reply's client is the one its message was sent to, never what the reply claims to be.
        info.sent = {m.metadata.message_id: c for m, c in zip(msgs, running, strict=True)}
        ok = sorted((r for r in replies if not r.has_error()),
                    key=lambda r: info.sent.get(r.metadata.reply_to_message_id, -1))
        fp32 = record_nbytes(to_record(arrays))  # what float32 FedAvg sends each way per client, in this mode
        row: dict[str, Any] = {"round": rnd, "selected": clients, "clients": running, "failures": len(msgs) - len(ok),
                               "bytes_down": bytes_down, "bytes_down_extra": 0, "bytes_down_float32": fp32 * len(msgs),
                               "bytes_up_float32": fp32 * len(ok),
                               # counted as received: plugins may decode (int8 -> float32) or reject replies
                               "bytes_up": sum(record_nbytes(a) for r in ok for a in r.content.array_records.values())}
        for plugin in self.plugins:
            ok, extra = plugin.on_replies(info, ok)
            row |= extra
        answered = RoundReplies(info.sent, replies, ok, [])
        row |= {
            "trained": len(ok),
            "client_train_seconds": sum(float(r.content[METRICS][TRAIN_SECONDS]) for r in ok),
            "client_cpu_seconds": sum(float(r.content[METRICS].get(TRAIN_CPU, 0.0)) for r in ok),
            "train_loss": float(np.mean([r.content[METRICS][TRAIN_LOSS] for r in ok])) if ok else None,
        }
        if ok:
            agg, _ = self.strategy.aggregate_train(rnd, ok)
            if agg is not None:
                arrays = {k: v.astype(np.float32) for k, v in from_record(agg).items()}
        for plugin in self.plugins:
            row |= plugin.after_aggregate(info, grid, arrays)
        t_eval = time.perf_counter()
        if rnd % cfg.server.eval_every == 0 or rnd == cfg.run.rounds:
            row |= self._federated_evaluation(grid, rnd, arrays, rng, running, answered.evaluated)
            row |= self.evaluator(self.global_model(arrays))
        row["round_seconds"], row["eval_seconds"] = time.perf_counter() - t0, time.perf_counter() - t_eval
        row["_arrays"], row["_replies"] = arrays, answered
        return row

    def _federated_evaluation(self, grid: Grid, rnd: int, arrays: dict[str, np.ndarray], rng: np.random.Generator,
                              clients: list[int], evaluated: list[Message]) -> dict[str, Any]:
        """The chosen clients' held-out accuracy of the new global model; their replies are added to ``evaluated``."""
        n = int(round(self.cfg.server.fraction_evaluate * len(clients)))
        if n == 0:
            return {}
        chosen = sample(rng, clients, n)
        evaluated.extend(self.send(grid, rnd, arrays, chosen, MessageType.EVALUATE))
        accs = [a for r in evaluated if (a := reported_accuracy(r)) is not None]
        return {"fed_eval_clients": len(accs), "fed_eval_accuracy_mean": float(np.mean(accs)) if accs else None,
                "fed_eval_accuracy_p10": percentile(accs, 10) if accs else None}
