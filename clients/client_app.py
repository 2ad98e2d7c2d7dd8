"""The fedrnn Flower ClientApp: local fine-tuning and evaluation on a device's private reviews.

A message's ``Task`` (``fedrnn.federation.messages``) says which virtual client this is in
simulation (``client-id`` plus the prepared target and partition files); on a real device (a
SuperNode started with ``--node-config "data-path=... teacher-path=..."``) the node's own review
file is used.

A client may refuse an instruction (``refusal_of``): a real device refuses fault and attack
instructions (those are for simulated clients in tests and studies), and any device refuses
record-level DP weaker than its node config's policy (``fedrnn.privacy.policy``). It then
replies untrained, with a ``refusal`` record saying why (``fedrnn.plugins.refusals``).
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
from fedrnn.federation.messages import (
    ARRAYS,
    CONFIG,
    METRICS,
    REPLY_REFUSAL,
    Attack,
    EvalReport,
    Fault,
    RecordDP,
    Refusal,
    Task,
    TrainReport,
)
from fedrnn.federation.wire import state_to_arrays, to_record
from fedrnn.plugins.attack import attack_of, poison_data, poison_update
from fedrnn.plugins.compression import decode_downlink, encode_uplink
from fedrnn.plugins.distill import evaluate_student, is_student_message
from fedrnn.plugins.faults import inject_fault
from fedrnn.plugins.record_dp import policy_refusal, record_dp_train

app = ClientApp(mods=[deadline_mod])  # a job past its deadline-s is aborted, freeing its worker


def _on_device(context: Context) -> bool:
    """A real device names its own review file in its node config; a simulated client gets a shard."""
    return "data-path" in context.node_config


def _client_data(task: Task, context: Context) -> tuple[Encoded, Encoded, str]:
    """(train, held-out, teacher dir) for this client, simulated or real."""
    if _on_device(context):
        teacher = str(context.node_config.get("teacher-path", task.teacher_path))
        train, held = device_data(str(context.node_config["data-path"]), teacher, task.holdout_fraction, task.seed)
        return train, held, teacher
    train, held = shard_data(task.target_path, task.partitions_path, task.client_id, task.holdout_fraction, task.seed)
    return train, held, task.teacher_path


def _setup(msg: Message, context: Context):
    cfg = msg.content[CONFIG]
    task = Task.parse(cfg)
    # A real device says how many cores it gives to training (node-config "threads"); the
    # server's value is for simulation workers sharing one machine.
    torch.set_num_threads(int(context.node_config.get("threads", task.threads)))
    train, held, teacher = _client_data(task, context)
    # A device short of memory may train fewer tensors (train_mode) than travel (mode);
    # it still returns every received tensor so replies stay aggregatable.
    received = decode_downlink(msg.content[ARRAYS])  # float32, whether it travelled as int8 or not
    model = build_model(load_base(teacher), received, task.trains)
    return cfg, task, train, held, model, received


def refusal_of(cfg: ConfigRecord, context: Context) -> Refusal | None:
    """What this client will not do: a fault or attack on a real device, or less privacy than its node policy allows.

    Fault and attack instructions exist for simulated clients in tests and studies; a server that
    sends them to a real device is trying to crash it or turn it against the run.
    """
    if _on_device(context) and (Fault.present(cfg) or Attack.present(cfg)):
        what = "fault" if Fault.present(cfg) else "attack"
        return Refusal("instruction", f"a real device does not carry out {what} instructions (simulation only)")
    why = policy_refusal(cfg, context.node_config)
    return Refusal("dp", why) if why else None


@app.train()
def train(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    refusal = refusal_of(msg.content[CONFIG], context)
    if refusal is not None:  # untrained: the server records the reason (fedrnn.plugins.refusals)
        metrics = {TrainReport.key("client_id"): Task.parse(msg.content[CONFIG]).client_id, refusal.metric: 1.0}
        return Message(RecordDict({METRICS: MetricRecord(metrics), REPLY_REFUSAL: ConfigRecord(refusal.to_record())}),
                       reply_to=msg)
    cfg, task, data, _, model, received = _setup(msg, context)
    names = list(received)
    inject_fault(cfg)  # tests and studies only: the server's [faults] section names this client
    attack = attack_of(cfg)  # robustness studies only: None for an honest client
    start = state_to_arrays(model.state_dict(), names) if attack else {}
    kind = attack.attack if attack else ""
    # non-private training is reproducible from the message; DP-SGD draws from secret entropy instead
    local = LocalTrainConfig(
        lr=task.lr, epochs=task.local_epochs, batch_size=task.batch_size, max_steps=task.max_steps,
        proximal_mu=task.proximal_mu, clip_norm=task.clip_norm,
        seed=task.seed * 1_000_003 + task.server_round * 1009 + task.client_id, frozen_cache_mb=task.frozen_cache_mb,
    )
    if RecordDP.present(cfg):  # record-level DP-SGD, accounted across rounds (fedrnn.plugins.record_dp)
        arrays, metrics, privacy = record_dp_train(model, poison_data(data, kind), local, names, task,
                                                   RecordDP.parse(cfg), context.node_config)
    else:
        (arrays, metrics), privacy = local_train(model, poison_data(data, kind), local, names), {}
    arrays = poison_update(arrays, start, kind, attack.attack_scale if attack else 1.0)
    record = to_record(encode_uplink(cfg, task, arrays, received, context, simulated=not _on_device(context)))
    metrics |= {TrainReport.key("num_examples"): len(data), TrainReport.key("client_id"): task.client_id,
                TrainReport.key("client_seconds"): time.perf_counter() - t0}
    return Message(RecordDict({ARRAYS: record, METRICS: MetricRecord(metrics), **privacy}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    if is_student_message(msg):  # the server's distilled int8 student, to run on this device's data
        task = Task.parse(msg.content[CONFIG])
        _, held, _ = _client_data(task, context)
        metrics = evaluate_student(msg.content, held)
    else:
        _, task, _, held, model, _ = _setup(msg, context)
        metrics = local_evaluate(model, held)
    metrics |= {EvalReport.key("num_examples"): len(held), EvalReport.key("client_id"): task.client_id}
    return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)
