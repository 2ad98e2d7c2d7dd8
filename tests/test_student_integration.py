"""The compact student and int8 wire inside the federation: config, codec, reply decoding, end to end.

The end-to-end run is one real Flower simulation (tiny teacher, real data) with everything on:
int8 broadcast, int8 updates with stochastic rounding and error feedback, a student distilled
every round and shipped to the clients as int8; then ``python -m fedrnn.edge.export`` on the run
directory and ``python -m fedrnn.edge.predict`` on the export.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from messages import reply_metadata, round_info, task
from processes import simulate_run

from fedrnn.config import CompressionSection, ConfigError, load_config
from fedrnn.data.loaders import amazon_split, load_amazon
from fedrnn.data.tokenizer import encode as encode_texts
from fedrnn.edge.quantize import SCALE_SUFFIX, encode
from fedrnn.federation.loop import Federation
from fedrnn.federation.messages import Task
from fedrnn.federation.prepare import prepare_run
from fedrnn.federation.rundir import RunDir
from fedrnn.federation.strategies import make_strategy
from fedrnn.federation.wire import record_nbytes, to_record
from fedrnn.model.checkpoint import load_checkpoint
from fedrnn.model.rnn import ModelConfig, SentimentRNN, trainable_names
from fedrnn.plugins.compression import CLIENT_STATE_DIR, Int8Compression, ResidualStore, decode_downlink, encode_uplink
from fedrnn.plugins.distill import StudentDistillation

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 420


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(("overrides", "key"), [
    ({"compression": {"downlink": "int2"}}, "compression.downlink"),
    ({"compression": {"error_feedback": True}}, "compression.error_feedback"),
    ({"compression": {"rounding": "stochastic"}}, "compression.rounding"),
    ({"distill": {"cell": "rnn"}}, "distill.cell"),
    ({"distill": {"temperature": 0}}, "distill.temperature"),
    ({"distill": {"transfer_pool": 100, "transfer_examples": 200}}, "distill.transfer_examples"),
    ({"distill": {"every_k_rounds": 0}}, "distill.every_k_rounds"),
    ({"distill": {"ship": "yes"}}, "distill.ship"),
])
def test_bad_values_are_named(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_defaults_are_off() -> None:
    cfg = load_config(None)
    assert not cfg.distill.enabled and not cfg.compression.active
    assert load_config(None, {"compression": {"uplink": "int8", "rounding": "stochastic"}}).compression.active


# ------------------------------------------------------------------------------------------ codec


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"rnn.1.fwd.weight_hh_l0": rng.normal(0, 0.2, (12, 3)).astype(np.float32),
            "head.bias": rng.normal(0, 0.1, 2).astype(np.float32)}


def _plugin(tmp_path: Path, **cfg: object) -> Int8Compression:
    plugin = Int8Compression(CompressionSection(**cfg))
    plugin.setup(SimpleNamespace(files=SimpleNamespace(run_dir=str(tmp_path))))  # type: ignore[arg-type]
    return plugin


def _reply(arrays: dict[str, np.ndarray] | None, client: int) -> Message:
    meta = reply_metadata(str(client), src_node_id=client + 10)
    content = RecordDict({"metrics": MetricRecord({"client-id": client, "num-examples": 5})})
    if arrays is not None:
        content["arrays"] = to_record(arrays)
    return Message(content, metadata=meta)


def _client_cfg(tmp_path: Path, rnd: int, client: int, **extra: object) -> tuple[ConfigRecord, Task]:
    up = {"uplink": "int8", "rounding": "nearest", "error-feedback": False,
          "client-state-dir": str(tmp_path / CLIENT_STATE_DIR)}
    return ConfigRecord(up | extra), task(server_round=rnd, client_id=client)


def test_int8_update_round_trip_lands_on_the_master_weights(tmp_path: Path) -> None:
    plugin = _plugin(tmp_path, downlink="int8", uplink="int8", rounding="stochastic")
    w = _arrays()
    payload = plugin.encode_down(w, 1, MessageType.TRAIN)
    assert all(v.dtype == np.int8 for k, v in payload.items() if not k.endswith(SCALE_SUFFIX))
    received = decode_downlink(to_record(payload))
    assert not np.array_equal(received["rnn.1.fwd.weight_hh_l0"], w["rnn.1.fwd.weight_hh_l0"])  # lossy broadcast
    rng = np.random.default_rng(1)
    update = {k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in received.items()}
    trained = {k: received[k] + update[k] for k in received}
    cfg = _client_cfg(tmp_path, 1, 3, rounding="stochastic")
    up = encode_uplink(*cfg, trained, received, Context(0, 0, {}, RecordDict(), {}), simulated=True)
    assert {k: v.dtype for k, v in up.items()} == {k: np.int8 for k in w} | {k + SCALE_SUFFIX: np.float32 for k in w}
    kept, metrics = plugin.on_replies(round_info(1), [_reply(up, 3)])
    assert len(kept) == 1 and metrics["uplink_rejected"] == 0
    got = {k: v.numpy() for k, v in kept[0].content["arrays"].items()}
    for k in w:  # w + update (within one stochastic-rounding step), not q(w) + update
        assert got[k].dtype == np.float32
        np.testing.assert_allclose(got[k], w[k] + update[k], rtol=0, atol=np.abs(update[k]).max() / 127 * 1.01)


def test_int4_both_ways_with_error_feedback_lands_on_the_master_weights(tmp_path: Path) -> None:
    plugin = _plugin(tmp_path, downlink="int4", uplink="int4", error_feedback=True)
    w = _arrays()
    payload = plugin.encode_down(w, 1, MessageType.TRAIN)
    assert payload["head.bias"].dtype == np.uint8  # two int4 values a byte
    received = decode_downlink(to_record(payload))
    rng = np.random.default_rng(1)
    update = {k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in received.items()}
    cfg, t = _client_cfg(tmp_path, 1, 3, uplink="int4", **{"error-feedback": True})
    up = encode_uplink(cfg, t, {k: received[k] + update[k] for k in received}, received,
                       Context(0, 0, {}, RecordDict(), {}), simulated=True)
    assert (tmp_path / CLIENT_STATE_DIR / "3.npz").is_file()  # the residual is kept for the next round
    kept, metrics = plugin.on_replies(round_info(1), [_reply(up, 3)])
    assert len(kept) == 1 and metrics["uplink_rejected"] == 0
    got = {k: v.numpy() for k, v in kept[0].content["arrays"].items()}
    for k in w:  # w + update within half an int4 step of the update's range
        np.testing.assert_allclose(got[k], w[k] + update[k], rtol=0, atol=np.abs(update[k]).max() / 7 / 2 * 1.01)


def test_float_reply_to_int8_broadcast_is_rebased(tmp_path: Path) -> None:
    plugin = _plugin(tmp_path, downlink="int8")
    w = _arrays()
    received = decode_downlink(to_record(plugin.encode_down(w, 1, MessageType.TRAIN)))
    trained = {k: v + 0.5 for k, v in received.items()}
    kept, _ = plugin.on_replies(round_info(1), [_reply(trained, 0)])
    got = {k: v.numpy() for k, v in kept[0].content["arrays"].items()}
    for k in w:
        np.testing.assert_allclose(got[k], w[k] + 0.5, atol=1e-6)


def test_malformed_int8_replies_are_dropped_and_counted(tmp_path: Path) -> None:
    plugin = _plugin(tmp_path, uplink="int8")
    w = _arrays()
    plugin.encode_down(w, 2, MessageType.TRAIN)
    good = encode({k: np.full_like(v, 0.01) for k, v in w.items()})
    name = "rnn.1.fwd.weight_hh_l0"
    bad = {
        "float32 instead of int8": w,
        "missing scale": {k: v for k, v in good.items() if k != name + SCALE_SUFFIX},
        "wrong shape": good | {name: good[name][:5], name + SCALE_SUFFIX: good[name + SCALE_SUFFIX][:5]},
        "value -128": good | {name: np.full_like(good[name], -128)},
        "NaN scale": good | {name + SCALE_SUFFIX: np.full_like(good[name + SCALE_SUFFIX], np.nan)},
        "extra tensor": good | {"emb": good[name], "emb" + SCALE_SUFFIX: good[name + SCALE_SUFFIX]},
        "no arrays record": None,
    }
    replies = [_reply(good, 0)] + [_reply(p, i + 1) for i, p in enumerate(bad.values())]
    replies.append(_reply(good, 99))
    replies[-1].content["arrays"] = ArrayRecord()  # empty record: every tensor missing
    kept, metrics = plugin.on_replies(round_info(2), replies)
    assert [int(r.content["metrics"]["client-id"]) for r in kept] == [0]
    assert metrics["uplink_rejected"] == len(bad) + 1
    assert set(metrics["uplink_rejected_reasons"]) == {str(i + 1) for i in range(len(bad))} | {"99"}
    assert "int8" in metrics["uplink_rejected_reasons"]["1"] and "scale" in metrics["uplink_rejected_reasons"]["2"]


@pytest.mark.parametrize("where", ["file", "context"])
def test_error_feedback_residual_persists_and_replays(tmp_path: Path, where: str) -> None:
    """A residual carries from round to round; a replayed round (crash + resume) starts from the same one."""
    context = Context(0, 0, {}, RecordDict(), {})
    simulated = where == "file"
    received = _arrays()
    trained = {k: v + np.float32(0.0123) * np.arange(v.size, dtype=np.float32).reshape(v.shape) for k, v in
               received.items()}

    def send(rnd: int) -> dict[str, np.ndarray]:
        return encode_uplink(*_client_cfg(tmp_path, rnd, 4, **{"error-feedback": True}), trained, received, context,
                             simulated)

    first = send(1)
    second = send(2)
    assert any(not np.array_equal(first[k], second[k]) for k in first)  # round 2 corrected round 1's error
    replay = send(2)
    assert all(np.array_equal(second[k], replay[k]) for k in second)
    store = (ResidualStore(path=tmp_path / CLIENT_STATE_DIR / "4.npz") if simulated
             else ResidualStore(context=context))
    assert (tmp_path / CLIENT_STATE_DIR / "4.npz").is_file() == simulated
    with pytest.raises(ValueError, match="after the current round"):
        store.load(1)


# ------------------------------------------------------------------------------------------ distillation plugin


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: tuple[Path, dict]) -> Iterator[Federation]:
    """A prepared Federation (no Grid): enough for the plugin's server-side work with ``ship`` off."""
    tmp = tmp_path_factory.mktemp("feddf")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDRNN_CACHE_DIR", str(tmp / "cache"))
        cfg = load_config(ROOT / "configs" / "tiny.toml", {
            "run": {"teacher": str(tiny_teacher[0])},
            "distill": {"enabled": True, "every_k_rounds": 2, "feddf": True, "ship": False, "steps": 20,
                        "batch_size": 32, "transfer_pool": 300, "transfer_examples": 200, "embed_dim": 16,
                        "hidden_size": 16, "cell": "gru"}})
        run = RunDir(tmp / "run")
        run.create(cfg.to_dict())
        plugin = StudentDistillation(cfg.distill)
        fed = Federation(cfg, prepare_run(cfg, run.path), make_strategy(cfg), plugins=[plugin])
        plugin.setup(fed.context)
        yield fed


def test_feddf_distils_from_the_client_models_and_state_resumes(federation: Federation) -> None:
    plugin = federation.plugins[0]
    assert isinstance(plugin, StudentDistillation) and len(plugin.transfer) == 300
    assert plugin.transfer.labels.min() == -1  # unlabelled: labels are never used
    arrays = federation.initial_arrays()
    rng = np.random.default_rng(0)
    clients = [{k: v + rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in arrays.items()} for _ in range(3)]
    replies = [_reply(a, i) for i, a in enumerate(clients)]
    r1, r2 = round_info(1, arrays), round_info(2, arrays)
    assert plugin.on_replies(r1, replies) == (replies, {}) and plugin.after_aggregate(r1, None, arrays) == {}
    assert not (Path(federation.files.run_dir) / "student").exists()  # round 1 of every_k_rounds = 2: nothing
    plugin.on_replies(r2, replies)
    metrics = plugin.after_aggregate(r2, None, arrays)  # type: ignore[arg-type]  # ship off: no Grid needed
    assert metrics["student_teachers"] == 3 and "student_device_clients" not in metrics
    assert metrics["student_distill_loss_end"] < metrics["student_distill_loss_start"]
    student, _, _ = load_checkpoint(Path(federation.files.run_dir) / "student")
    assert student.cfg.cell == "gru" and student.cfg.vocab_size == federation.base.cfg.vocab_size
    # resume: a fresh plugin loaded from the saved state continues from the same student
    js, saved = plugin.state()
    resumed = StudentDistillation(federation.cfg.distill)
    resumed.setup(federation.context)  # as the round loop does: set up, then restore
    resumed.load_state(json.loads(json.dumps(js)), saved)
    for k, v in resumed._student("all").state_dict().items():
        assert torch.equal(v, student.state_dict()[k])


# ------------------------------------------------------------------------------------------ end to end



@pytest.fixture(scope="module")
def student_run(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: tuple[Path, dict]) -> Path:
    tmp = tmp_path_factory.mktemp("student")
    config = tmp / "student.toml"
    config.write_text((ROOT / "configs" / "tiny.toml").read_text() + """
[distill]
enabled = true
every_k_rounds = 1
steps = 30
batch_size = 32
transfer_pool = 1000
transfer_examples = 600
embed_dim = 16
hidden_size = 16
ship = true

[compression]
downlink = "int8"
uplink = "int8"
rounding = "stochastic"
error_feedback = true
""")
    return simulate_run(config, tiny_teacher[0], tmp / "run", tmp / "cache", TIMEOUT)


def test_int8_wire_counts_and_student_metrics(student_run: Path, tiny_teacher: tuple[Path, dict]) -> None:
    model, _, _ = load_checkpoint(tiny_teacher[0])
    sd = model.state_dict()
    first = {n: sd[n].numpy() for n in trainable_names(model, "fine-tune")}  # round 1 broadcasts the teacher's
    fp32, int8 = record_nbytes(to_record(first)), record_nbytes(to_record(encode(first)))
    rows = RunDir(student_run).read_metrics()
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1]["down_payload_bytes"] == int8  # what travelled is exactly the int8 encoding
    for r in rows[1:]:
        n = len(r["clients"])
        assert r["trained"] == n == 4 and r["uplink_rejected"] == 0
        assert r["down_payload_bytes_float32"] == fp32  # what float32 FedAvg sends each client
        assert r["bytes_down"] == n * r["down_payload_bytes"] and r["bytes_up_float32"] == n * fp32
        assert r["bytes_up"] == r["bytes_down"]  # int8 updates: the same tensors and scales as the broadcast
        # 24-wide rows: a float32 scale per row and a ~128 B header per array keep this tiny model at ~2.8x
        assert n * fp32 / r["bytes_down"] > 2.5 and n * fp32 / r["bytes_up"] > 2.5
        assert 0 <= r["target_accuracy"] <= 1 and np.isfinite(r["target_loss"])
        # the student: distilled every round, evaluated on the server, shipped as int8 to the 4 clients
        assert 0 <= r["student_target_accuracy"] <= 1 and 0 <= r["student_int8_target_accuracy"] <= 1
        assert r["student_params"] < r["student_int8_bytes"] and 4 * r["student_params"] < r["student_fp32_bytes"]
        assert r["student_bytes_shipped"] == n * r["student_int8_bytes"] == r["bytes_down_extra"]  # extra downlink
        assert r["student_device_clients"] == n and 0 <= r["student_device_accuracy_mean"] <= 1
    assert rows[1]["student_distill_loss_end"] < rows[1]["student_distill_loss_start"]  # fresh student learns
    # error-feedback residuals: one file per client that sent an int8 update
    trained = {c for r in rows[1:] for c in r["clients"]}
    assert {p.name for p in (student_run / CLIENT_STATE_DIR).iterdir()} == {f"{c}.npz" for c in trained}
    student, _, cfg = load_checkpoint(student_run / "student")
    assert student.cfg.hidden_size == 16 and cfg["max_len"] == 128
    shipped = encode({k: v.numpy() for k, v in student.state_dict().items()})  # every tensor, embedding included
    assert rows[2]["student_int8_bytes"] == record_nbytes(to_record(shipped))
    info = json.loads((student_run / "student" / "metrics.json").read_text())
    assert info["round"] == 2 and info["student_target_accuracy"] == rows[2]["student_target_accuracy"]


def test_int8_broadcast_is_4x_smaller_for_the_default_teacher() -> None:
    """At the default teacher's width (128) the per-row scales and headers cost little: ~3.85x on the wire."""
    model = SentimentRNN(ModelConfig())
    sd = model.state_dict()
    for mode in ("fine-tune", "full"):
        arrays = {n: sd[n].numpy() for n in trainable_names(model, mode)}
        assert record_nbytes(to_record(arrays)) / record_nbytes(to_record(encode(arrays))) >= 3.5


def test_export_and_predict_on_the_run(student_run: Path, tmp_path: Path, data_dir: Path) -> None:
    """The run's student exports; ``fedrnn.edge.predict`` classifies real reviews like the torch student does."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "fedrnn.edge.export", str(student_run), "--out", str(tmp_path / "edge")],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _, test = amazon_split(load_amazon(data_dir))
    texts = [test.texts[i] for i in (0, 500, 1000, 1500)]
    student, tok, cfg = load_checkpoint(student_run / "student")
    enc = encode_texts(tok, texts, test.labels[:4], cfg["max_len"])
    with torch.no_grad():
        probs = torch.softmax(student(torch.from_numpy(enc.ids.astype(np.int64)), torch.from_numpy(enc.lengths)), 1)
    for flag in ("--float", None):
        r = subprocess.run([sys.executable, "-m", "fedrnn.edge.predict", str(tmp_path / "edge"), *texts,
                            *([flag] if flag else [])], env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr[-3000:]
        lines = r.stdout.strip().splitlines()
        assert len(lines) == len(texts)
        for line, p in zip(lines, probs.numpy(), strict=True):
            label, prob, _ = line.split("\t")
            assert label in ("negative", "positive")
            tolerance = 1e-3 if flag else 0.05  # float ONNX is torch to ~1e-4; int8 to the export's tolerance
            assert abs(float(prob) - p[("negative", "positive").index(label)]) <= tolerance
            if flag:
                assert label == ("negative", "positive")[int(p.argmax())]
