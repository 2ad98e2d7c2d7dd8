"""Fast checks of a run's records and console, without Ray: per-client rows, the failure guard, the round
line, metrics.csv, ``python -m fedrnn.report``, MLflow tracking to a local store, and the ServerApp's
run-config keys and placement."""

from __future__ import annotations

import csv
import json
import tomllib
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict
from messages import reply_metadata

from fedrnn.config import RunConfig, config_from_dict
from fedrnn.federation.loop import DeviceNodes, RoundReplies, VirtualClients
from fedrnn.federation.messages import METRICS, EvalReport, TrainReport
from fedrnn.federation.rundir import RunDir
from fedrnn.runs.console import accuracy, duration, round_line
from fedrnn.runs.failures import FailureGuard, RunFailedError
from fedrnn.runs.records import ClientLog, client_rows, read_clients, write_metrics_csv
from fedrnn.runs.report import main as report_main
from server.server_app import config_overrides, placement_for, run_config_keys

ROOT = Path(__file__).resolve().parent.parent


def _train_reply(msg_id: str, client: int, loss: float) -> Message:
    metrics = {TrainReport.key("num_examples"): 40, TrainReport.key("client_id"): client,
               TrainReport.key("train_loss"): loss, TrainReport.key("train_seconds"): 1.0,
               TrainReport.key("steps"): 5.0, TrainReport.key("train_accuracy"): 0.75}
    return Message(RecordDict({"arrays": ArrayRecord(), METRICS: MetricRecord(metrics)}),
                   metadata=reply_metadata(reply_to=msg_id))


def _error_reply(msg_id: str, reason: str) -> Message:
    return Message(Error(code=1, reason=reason), metadata=reply_metadata(reply_to=msg_id))


def _eval_reply(client: int, acc: float) -> Message:
    metrics = {EvalReport.key("num_examples"): 10, EvalReport.key("client_id"): client,
               EvalReport.key("eval_accuracy"): acc, EvalReport.key("eval_loss"): 0.5}
    return Message(RecordDict({METRICS: MetricRecord(metrics)}), metadata=reply_metadata(reply_to="e"))


def _round(rnd: int = 1) -> tuple[dict, RoundReplies]:
    """Client 0 trains, 1 raises, 2 is rejected by a plugin, 3 never answers, 4 was selected but not sent."""
    ok0, err1, ok2 = _train_reply("m0", 0, 0.5), _error_reply("m1", "ValueError: boom in client 1"), \
        _train_reply("m2", 2, 0.7)
    answered = RoundReplies({"m0": 0, "m1": 1, "m2": 2, "m3": 3}, [ok0, err1, ok2], [ok0], [_eval_reply(0, 0.8)])
    row = {"round": rnd, "selected": [0, 1, 2, 3, 4], "clients": [0, 1, 2, 3], "failures": 2, "bytes_down": 400,
           "rejected_reasons": {"2": "update norm too large"}, "dp_record_epsilon": {"0": 1.5},
           "device_clients": {"4": {"class": "rpi4", "status": "dropout", "time_s": 0.0}}}
    return row, answered


def test_client_rows_say_what_happened_to_each_selected_client() -> None:
    row, answered = _round()
    rows = {r["client"]: r for r in client_rows(row, answered)}
    assert sorted(rows) == [0, 1, 2, 3, 4]
    assert rows[0] | {} == rows[0] and rows[0]["status"] == "ok" and rows[0]["examples"] == 40
    assert rows[0]["train_loss"] == 0.5 and rows[0]["eval_accuracy"] == 0.8 and rows[0]["epsilon"] == 1.5
    assert rows[0]["bytes_down"] == 100 and rows[0]["steps"] == 5.0
    assert rows[1]["status"] == "failed" and "boom in client 1" in rows[1]["reason"] and rows[1]["train_loss"] is None
    assert rows[2]["status"] == "rejected" and rows[2]["reason"] == "update norm too large"
    assert rows[3]["status"] == "failed" and "no reply" in rows[3]["reason"]
    assert rows[4]["status"] == "dropout" and rows[4]["device_class"] == "rpi4" and rows[4]["bytes_down"] == 0


def test_client_log_drops_rows_past_the_last_checkpoint(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    rd.create({})
    log = ClientLog(rd)
    for rnd in (1, 2):
        log(*_round(rnd))
    (tmp_path / "state.json").write_text(json.dumps({"round": 1}))
    (tmp_path / "clients.jsonl").open("a").write('{"round": 3, "cli')  # a line cut by a kill
    (tmp_path / "state.safetensors").write_bytes(b"")
    rd.load_state = lambda: ({"round": 1}, {})  # type: ignore[method-assign]
    ClientLog(rd)
    assert [r["round"] for r in read_clients(rd)] == [1] * 5


def test_failure_guard_stops_when_every_client_fails_and_quotes_the_error() -> None:
    row, answered = _round()
    answered.replies[0] = _error_reply("m0", "RuntimeError: no data at /x")
    answered.replies[2] = _error_reply("m2", "RuntimeError: no data at /x")
    with pytest.raises(RunFailedError, match=r"all 4 clients failed; first failure: round 1, client 0: RuntimeErr"):
        FailureGuard(1.0)(row | {"failures": 4}, answered)


def test_failure_guard_counts_the_fraction_over_the_run() -> None:
    guard = FailureGuard(0.5)
    row, answered = _round()
    guard(row | {"failures": 1}, answered)  # 1 of 4
    guard(row | {"round": 2, "failures": 3}, answered)  # 4 of 8: still <= 0.5
    with pytest.raises(RunFailedError, match=r"round 3: 7 of the 12 .* failed, more than server.max_failure_fraction "
                                             r"= 0.5; first failure: round 1, client 1: ValueError: boom in client 1"):
        guard(row | {"round": 3, "failures": 3}, answered)


def test_round_line_formats_numbers_and_shortens_rounds_without_evaluation() -> None:
    base = {"round": 3, "bytes_down": 2_000_000, "bytes_up": 1_000_000, "failures": 0, "round_seconds": 2.25,
            "train_loss": 0.693147}
    short = round_line(base, 20, 75.0, 425.0)
    assert short.startswith("round   3/20  loss 0.6931") and "target" not in short and "-" not in short
    assert "elapsed 1m 15s" in short and "ETA 7m 05s" in short
    full = round_line(base | {"target_accuracy": 0.80812501907, "retention_accuracy": 0.7,
                              "fed_eval_accuracy_mean": 0.6, "fed_eval_accuracy_p10": 0.5, "failures": 2}, 20, 5, None)
    assert "target 0.8081  source 0.7000  clients 0.6000 (p10 0.5000)" in full and "failed 2" in full
    assert "ETA" not in full
    assert accuracy(None) == "-" and duration(7300) == "2h 01m"


def _fake_run(path: Path, strategy: str, accs: list[float]) -> Path:
    rd = RunDir(path)
    cfg = RunConfig()
    cfg.run.strategy = strategy
    rd.create(cfg.to_dict())
    for i, a in enumerate(accs):
        rd.append_metrics({"round": i, "target_accuracy": a, "retention_accuracy": 0.7, "bytes_up": 10**6 * i,
                           "failures": 0, "clients": [0, 1], "device_classes": {"x": 1}})
    return path


def test_metrics_csv_has_the_scalar_columns(tmp_path: Path) -> None:
    write_metrics_csv(RunDir(_fake_run(tmp_path / "a", "fedavg", [0.5, 0.6])))
    with (tmp_path / "a" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["round"] for r in rows] == ["0", "1"] and rows[1]["target_accuracy"] == "0.6"
    assert "clients" not in rows[0] and "device_classes" not in rows[0]


def test_report_compares_runs_in_a_table_and_a_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _fake_run(tmp_path / "avg", "fedavg", [0.5, 0.6, 0.65])
    b = _fake_run(tmp_path / "prox", "fedprox", [0.5, 0.7, 0.68])
    table = report_main([str(a), str(b), "--out", str(tmp_path / "cmp")])
    assert table.row_count == 2 and "fedrnn runs" in capsys.readouterr().out
    with (tmp_path / "cmp.csv").open() as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert rows["avg"]["final target"] == "0.6500" and rows["avg"]["best target"] == "0.6500"
    assert rows["prox"]["final target"] == "0.6800" and rows["prox"]["best target"] == "0.7000"
    assert rows["prox"]["strategy"] == "fedprox" and rows["prox"]["MB up"] == "3.0"
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        report_main([str(tmp_path / "nothing-here")])
    assert "not a fedrnn run directory" in capsys.readouterr().err


def test_mlflow_tracking_to_a_local_store(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from fedrnn.runs.tracking import MlflowTracker, store_uri

    rd = RunDir(_fake_run(tmp_path / "runs" / "r1", "fedavg", [0.5]))
    cfg = config_from_dict({"tracking": {"mlflow": True}, "client": {"lr": 0.02}})
    tracker = MlflowTracker(cfg, rd)
    tracker({"round": 1, "target_accuracy": 0.6, "train_loss": 0.4, "clients": [1]})
    tracker.finish(rd.read_metrics())
    assert store_uri(cfg, rd) == (tmp_path / "runs" / "mlruns").as_uri()
    client = MlflowClient(tracking_uri=store_uri(cfg, rd))
    run = client.get_run(tracker.run_id)
    assert run.data.params["client.lr"] == "0.02" and run.info.status == "FINISHED"
    history = client.get_metric_history(tracker.run_id, "target_accuracy")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.5), (1, 0.6)]
    assert "config.json" in {f.path for f in client.list_artifacts(tracker.run_id)}
    assert MlflowTracker(cfg, rd).run_id == tracker.run_id  # a resumed run logs into the same MLflow run


def test_pyproject_declares_every_config_key_as_a_run_config_key() -> None:
    app_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    declared = [f"{s}.{k}" for s, kv in app_cfg.items() if isinstance(kv, dict) for k in kv]
    assert declared == run_config_keys(RunConfig())
    assert all(v == "" for kv in app_cfg.values() if isinstance(kv, dict) for v in kv.values())


def test_run_config_overrides_use_the_toml_names() -> None:
    rc = {"config": "configs/tiny.toml", "run-dir": "", "placement": "auto", "min-nodes": 0,
          "run.rounds": 5, "client.lr": 0.01, "run.strategy": "", "server.eval_every": ""}
    assert config_overrides(rc) == {"run": {"rounds": 5}, "client": {"lr": 0.01}}
    cfg = config_from_dict(config_overrides(rc))
    assert cfg.run.rounds == 5 and cfg.client.lr == 0.01


def test_placement_is_detected_from_the_grid() -> None:
    from flwr.superlink.grid import InMemoryGrid

    class RemoteGrid:  # what a deployment SuperLink gives: not Flower's in-process Grid
        pass

    sim = InMemoryGrid.__new__(InMemoryGrid)
    assert isinstance(placement_for(sim, "auto", 2), VirtualClients)
    assert isinstance(placement_for(RemoteGrid(), "auto", 2), DeviceNodes)  # type: ignore[arg-type]
    assert isinstance(placement_for(RemoteGrid(), "virtual", 2), VirtualClients)  # type: ignore[arg-type]
    assert isinstance(placement_for(sim, "devices", 2), DeviceNodes)
