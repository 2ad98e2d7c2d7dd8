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

from fedrnn.data.tokenizer import Encoded
from fedrnn.federation.deadline import deadline_mod
from fedrnn.federation.local import (
    LocalTrainConfig,
    build_model,
    device_data,
    load_base,
    local_evaluate,
    local_train,
    shard_data,
)
from fedrnn.federation.wire import state_to_arrays, to_record
from fedrnn.plugins.attack import attack_of, poison_data, poison_update
from fedrnn.plugins.compression import decode_downlink, encode_uplink
from fedrnn.plugins.distill import evaluate_student, is_student_message
from fedrnn.plugins.faults import inject_fault
from fedrnn.plugins.record_dp import record_dp_train

app = ClientApp(mods=[deadline_mod])  # a job past its deadline-s is aborted, freeing its worker


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
    # A real device says how many cores it gives to training (node-config "threads"); the
    # server's value is for simulation workers sharing one machine.
    torch.set_num_threads(int(context.node_config.get("threads", cfg.get("threads", 1))))
    train, held, teacher = _client_data(cfg, context)
    # A device short of memory may train fewer tensors ("train-mode") than travel ("mode");
    # it still returns every received tensor so replies stay aggregatable.
    received = decode_downlink(msg.content["arrays"])  # float32, whether it travelled as int8 or not
    model = build_model(load_base(teacher), received, str(cfg.get("train-mode", cfg["mode"])))
    return cfg, train, held, model, received


@app.train()
def train(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    cfg, data, _, model, received = _setup(msg, context)
    names = list(received)
    inject_fault(cfg)  # tests and studies only: the server's [faults] section names this client
    attack = attack_of(cfg)  # robustness studies only: "" for an honest client
    start = state_to_arrays(model.state_dict(), names) if attack else {}
    local = LocalTrainConfig(
        lr=float(cfg["lr"]), epochs=int(cfg["local-epochs"]),
        batch_size=int(cfg["batch-size"]), max_steps=int(cfg["max-steps"]),
        proximal_mu=float(cfg.get("proximal-mu", 0.0)), clip_norm=float(cfg["clip-norm"]),
        seed=int(cfg["seed"]) * 1_000_003 + int(cfg["server-round"]) * 1009 + int(cfg.get("client-id", 0)),
    )
    if cfg.get("dp-record", False):  # record-level DP-SGD, accounted across rounds (fedrnn.plugins.record_dp)
        arrays, metrics, privacy = record_dp_train(model, poison_data(data, attack), local, names, cfg,
                                                   context.node_config)
    else:
        (arrays, metrics), privacy = local_train(model, poison_data(data, attack), local, names), {}
    arrays = poison_update(arrays, start, attack, float(cfg.get("attack-scale", 1.0)))
    record = to_record(encode_uplink(cfg, arrays, received, context, simulated="data-path" not in context.node_config))
    metrics |= {"num-examples": len(data), "client-id": int(cfg.get("client-id", -1)),
                "client-seconds": time.perf_counter() - t0}
    return Message(RecordDict({"arrays": record, "metrics": MetricRecord(metrics), **privacy}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    if is_student_message(msg):  # the server's distilled int8 student, to run on this device's data
        cfg = msg.content["config"]
        _, held, _ = _client_data(cfg, context)
        metrics = evaluate_student(msg.content, held)
    else:
        cfg, _, held, model, _ = _setup(msg, context)
        metrics = local_evaluate(model, held)
    metrics |= {"num-examples": len(held), "client-id": int(cfg.get("client-id", -1))}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
