"""The baselines fedrnn is measured against: plain Flower 1.42 apps doing the same training.

Both are written the way Flower's PyTorch quickstart is: one SuperNode per client (partition-id
from ``context.node_config``) and ``FedAvg.start`` sending the whole model state both ways. The
training itself (model, shard, optimizer, epochs, batch) is fedrnn's ``local_train``, copied in
as it is, so only the engine around it differs.

* ``tuned`` (the fair baseline, what a careful Flower user writes): ``client_resources =
  {num_cpus: 1}`` (two actors on two cores), ``torch.set_num_threads(1)`` in the ClientApp, and
  the teacher, partitions and target data cached per worker process in module globals, as
  Flower's templates cache their dataset.
* ``default``: Flower's default client resources (2 CPUs per client, so one Ray actor on this
  machine, torch's default threads) and the model and data loaded on every call.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedrnn.data.partitions import load_partitions, split_holdout
from fedrnn.data.target import load_target
from fedrnn.data.tokenizer import Encoded
from fedrnn.federation.local import LocalTrainConfig, local_train
from fedrnn.model.checkpoint import load_checkpoint
from fedrnn.model.rnn import SentimentRNN, set_trainable

client_app = ClientApp()  # default: everything loaded on every call
tuned_client_app = ClientApp()  # tuned: one thread, teacher and data cached per worker process
_CACHE: dict[str, Any] = {}  # the tuned app's module-global cache (one per Ray worker process)


def _shard(cfg: ConfigRecord, pid: int, partitions: list[np.ndarray], pool: Encoded) -> Encoded:
    train_idx, _ = split_holdout(partitions[pid], float(cfg["holdout-fraction"]), int(cfg["seed"]), pid)
    return pool.subset(train_idx)


def _train(msg: Message, model: SentimentRNN, data: Encoded, pid: int) -> Message:
    cfg = msg.content["config"]
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    set_trainable(model, str(cfg["mode"]))
    local = LocalTrainConfig(lr=float(cfg["lr"]), epochs=int(cfg["local-epochs"]), batch_size=int(cfg["batch-size"]),
                             max_steps=0, proximal_mu=0.0, clip_norm=1.0, seed=pid)
    t0, cpu0 = time.perf_counter(), time.process_time()
    local_train(model, data, local, [])
    metrics = MetricRecord({"num-examples": len(data), "train-seconds": time.perf_counter() - t0,
                            "train-cpu-seconds": time.process_time() - cpu0})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = msg.content["config"]
    model, _, _ = load_checkpoint(str(cfg["teacher-path"]))  # reloaded every call, as a tutorial app does
    load_target.cache_clear()  # no cross-call caching in the default app
    pool = load_target(str(cfg["target-path"])).pool
    pid = int(context.node_config["partition-id"])
    return _train(msg, model, _shard(cfg, pid, load_partitions(str(cfg["partitions-path"])), pool), pid)


@tuned_client_app.train()
def train_tuned(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)  # one core per actor: two actors share the machine's two cores
    cfg = msg.content["config"]
    if not _CACHE:
        _CACHE["model"] = load_checkpoint(str(cfg["teacher-path"]))[0]
        _CACHE["pool"] = load_target(str(cfg["target-path"])).pool
        _CACHE["partitions"] = load_partitions(str(cfg["partitions-path"]))
    pid = int(context.node_config["partition-id"])
    return _train(msg, _CACHE["model"], _shard(cfg, pid, _CACHE["partitions"], _CACHE["pool"]), pid)


def make_server_app(config: dict, rounds: int, per_round: int, clients: int, out: dict) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        model, _, _ = load_checkpoint(config["teacher-path"])
        strategy = FedAvg(
            fraction_train=per_round / clients,
            fraction_evaluate=0.0,
            min_train_nodes=per_round,
            min_available_nodes=clients,
            train_metrics_aggr_fn=_sum_seconds,
        )
        t0 = time.perf_counter()
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=rounds,
            train_config=ConfigRecord(config),
        )
        out["wall_seconds"] = time.perf_counter() - t0
        per_round_metrics = result.train_metrics_clientapp.values()
        out["client_train_seconds"] = float(sum(m["train-seconds"] for m in per_round_metrics))
        out["client_cpu_seconds"] = float(sum(m["train-cpu-seconds"] for m in per_round_metrics))

    return app


def _sum_seconds(records: list[RecordDict], weight_key: str) -> MetricRecord:
    return MetricRecord({key: float(np.sum([r["metrics"][key] for r in records]))
                         for key in ("train-seconds", "train-cpu-seconds")})


def run_plain(config: dict, rounds: int, per_round: int, clients: int, tuned: bool) -> dict:
    """Run a plain app on the Simulation Engine: ``tuned`` or with Flower's default resources."""
    from flwr.simulation import run_simulation

    out: dict = {}
    run_simulation(
        server_app=make_server_app(config, rounds, per_round, clients, out),
        client_app=tuned_client_app if tuned else client_app,
        num_supernodes=clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}} if tuned else None,
    )
    return out
