"""The baseline fedrnn is measured against: a plain Flower 1.42 app doing the same training.

Written the way Flower's PyTorch quickstart is: one SuperNode per client (partition-id from
``context.node_config``), Flower's default client resources (2 CPUs per client, so one Ray
actor on this machine, torch's default threads), ``FedAvg.start`` sending the whole model
state both ways, and the ClientApp loading its model and data on every call. The training
itself (model, shard, optimizer, epochs, batch) is fedrnn's, so only the engine differs.
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedrnn.data.partitions import load_partitions, split_holdout
from fedrnn.data.target import load_target
from fedrnn.federation.local import LocalTrainConfig, local_train
from fedrnn.model.checkpoint import load_checkpoint
from fedrnn.model.rnn import set_trainable

client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = msg.content["config"]
    model, _, _ = load_checkpoint(str(cfg["teacher-path"]))  # reloaded every call, as a tutorial app does
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    set_trainable(model, str(cfg["mode"]))
    load_target.cache_clear()  # no cross-call caching in the plain app
    pool = load_target(str(cfg["target-path"])).pool
    pid = int(context.node_config["partition-id"])
    shard = load_partitions(str(cfg["partitions-path"]))[pid]
    train_idx, _ = split_holdout(shard, float(cfg["holdout-fraction"]), int(cfg["seed"]), pid)
    local = LocalTrainConfig(
        lr=float(cfg["lr"]),
        epochs=int(cfg["local-epochs"]),
        batch_size=int(cfg["batch-size"]),
        max_steps=0,
        proximal_mu=0.0,
        clip_norm=1.0,
        seed=pid,
    )
    t0 = time.perf_counter()
    local_train(model, pool.subset(train_idx), local, [])
    seconds = time.perf_counter() - t0
    metrics = MetricRecord({"num-examples": len(train_idx), "train-seconds": seconds})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


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
        out["client_train_seconds"] = float(sum(m["train-seconds"] for m in result.train_metrics_clientapp.values()))

    return app


def _sum_seconds(records: list[RecordDict], weight_key: str) -> MetricRecord:
    return MetricRecord({"train-seconds": float(np.sum([r["metrics"]["train-seconds"] for r in records]))})


def run_plain(config: dict, rounds: int, per_round: int, clients: int) -> dict:
    """Run the plain app on the Simulation Engine with Flower's default resources."""
    from flwr.simulation import run_simulation

    out: dict = {}
    run_simulation(
        server_app=make_server_app(config, rounds, per_round, clients, out),
        client_app=client_app,
        num_supernodes=clients,
    )
    return out
