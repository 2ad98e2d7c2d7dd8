"""The fedrnn Flower ClientApp: local fine-tuning and evaluation on a device's private reviews.

A message's config says which virtual client this is in simulation (``client-id`` plus the
prepared target and partition files); on a real device (a SuperNode started with
``--node-config "data-path=... teacher-path=..."``) the node's own review file is used.
"""

from __future__ import annotations

import time

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrnn.task import LocalTrainConfig, build_model, device_data, load_base, local_evaluate, local_train, shard_data
from fedrnn.tokenizer import Encoded
from fedrnn.wire import from_record, to_record

app = ClientApp()


def _client_data(cfg: ConfigRecord, context: Context) -> tuple[Encoded, Encoded, str]:
    """(train, held-out, teacher dir) for this client, simulated or real."""
    holdout, seed = float(cfg["holdout-fraction"]), int(cfg["seed"])
    if "data-path" in context.node_config:
        teacher = str(context.node_config.get("teacher-path", cfg["teacher-path"]))
        train, held = device_data(str(context.node_config["data-path"]), teacher, holdout, seed)
        return train, held, teacher
    train, held = shard_data(str(cfg["target-path"]), str(cfg["partitions-path"]), int(cfg["client-id"]), holdout, seed)
    return train, held, str(cfg["teacher-path"])


def _setup(msg: Message, context: Context):
    cfg = msg.content["config"]
    torch.set_num_threads(int(cfg.get("threads", 1)))
    train, held, teacher = _client_data(cfg, context)
    # A device short of memory may train fewer tensors ("train-mode") than travel ("mode");
    # it still returns every received tensor so replies stay aggregatable.
    received = from_record(msg.content["arrays"])
    model = build_model(load_base(teacher), received, str(cfg.get("train-mode", cfg["mode"])))
    return cfg, train, held, model, list(received)


@app.train()
def train(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    cfg, data, _, model, names = _setup(msg, context)
    local = LocalTrainConfig(
        lr=float(cfg["lr"]), epochs=int(cfg["local-epochs"]),
        batch_size=int(cfg["batch-size"]), max_steps=int(cfg["max-steps"]),
        proximal_mu=float(cfg.get("proximal-mu", 0.0)), clip_norm=float(cfg["clip-norm"]),
        seed=int(cfg["seed"]) * 1_000_003 + int(cfg["server-round"]) * 1009 + int(cfg.get("client-id", 0)),
    )
    arrays, metrics = local_train(model, data, local, names)
    record = to_record(arrays)
    metrics |= {"num-examples": len(data), "client-id": int(cfg.get("client-id", -1)),
                "client-seconds": time.perf_counter() - t0}
    return Message(RecordDict({"arrays": record, "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, _, held, model, _ = _setup(msg, context)
    metrics = local_evaluate(model, held) | {"num-examples": len(held), "client-id": int(cfg.get("client-id", -1))}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
