"""Per-client records of a run: ``clients.jsonl`` (one row per selected client per round) and ``metrics.csv``.

A row holds what the round loop and its plugins learnt about one client in one round: its
device class and simulated time (device-fleet runs), examples, steps, loss and accuracy from
its training reply, its held-out accuracy of the new global model (evaluation rounds), the
bytes it sent and received, its privacy loss (record-level DP), and, when its update was not
aggregated, why: the error its ClientApp raised, no reply in time, or a plugin's rejection.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from flwr.app import Message

from fedrnn.federation.loop import RoundReplies
from fedrnn.federation.messages import METRICS, EvalReport, TrainReport
from fedrnn.federation.rundir import RunDir
from fedrnn.federation.wire import record_nbytes
from fedrnn.io import write_csv

CLIENTS = "clients.jsonl"
METRICS_CSV = "metrics.csv"


def _metric(reply: Message, key: str) -> float | None:
    record = reply.content.metric_records.get(METRICS)
    value = record.get(key) if record is not None else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt): .+")


def error_text(reply: Message) -> str:
    """A Flower error reply's reason, condensed to the client's own exception (``ValueError: ...``).

    In simulation the reason is Ray's whole traceback chain ending in Flower's wrapper
    (``ClientAppException``); the last exception line not raised by Ray or Flower is the
    client's. A reason without one is kept whole.
    """
    reason = reply.error.reason.strip()
    lines = [ln.strip() for ln in reason.splitlines()]
    own = [ln for ln in lines if EXCEPTION_LINE.match(ln) and not ln.startswith(("ray.", "flwr."))]
    return own[-1] if own else reason or f"error code {reply.error.code}"


def client_rows(row: dict[str, Any], answered: RoundReplies) -> list[dict[str, Any]]:
    """One record per client selected in the round whose metrics ``row`` is (see the module docstring)."""
    rnd, running = row["round"], row["clients"]
    by_client = {answered.sent.get(r.metadata.reply_to_message_id): r for r in answered.replies}
    kept = {answered.sent.get(r.metadata.reply_to_message_id) for r in answered.kept}
    evaluated = {int(c): r for r in answered.evaluated if (c := _metric(r, EvalReport.key("client_id"))) is not None}
    devices = row.get("device_clients", {})
    rejected = row.get("rejected_reasons", {})
    epsilon = row.get("dp_record_epsilon", {})
    down = row["bytes_down"] // len(running) if running else 0  # every client is sent the same payload
    out = []
    for client in row["selected"]:
        device = devices.get(str(client), {})
        rec: dict[str, Any] = {"round": rnd, "client": client, "device_class": device.get("class"),
                               "status": "ok", "reason": None}
        reply = by_client.get(client)
        if client not in running:
            rec |= {"status": device.get("status", "not sent"), "reason": "not sent this round"}
        elif reply is None:
            rec |= {"status": "failed", "reason": "no reply within server.timeout_s"}
        elif reply.has_error():
            rec |= {"status": "failed", "reason": error_text(reply)}
        elif client not in kept:
            rec |= {"status": "rejected", "reason": rejected.get(str(client), "not aggregated (see the run's log)")}
        ok = reply is not None and not reply.has_error()
        rec |= {
            "examples": int(_metric(reply, TrainReport.key("num_examples")) or 0) if ok else None,
            "steps": _metric(reply, TrainReport.key("steps")) if ok else None,
            "train_loss": _metric(reply, TrainReport.key("train_loss")) if ok else None,
            "train_accuracy": _metric(reply, TrainReport.key("train_accuracy")) if ok else None,
            "eval_accuracy": _metric(evaluated[client], EvalReport.key("eval_accuracy")) if client in evaluated
            else None,
            "bytes_down": down if client in running else 0,
            "bytes_up": sum(record_nbytes(a) for a in reply.content.array_records.values()) if ok else 0,
            "client_seconds": _metric(reply, TrainReport.key("client_seconds")) if ok else None,
            "sim_time_s": device.get("time_s"),
            "epsilon": epsilon.get(str(client)),
        }
        out.append(rec)
    return out


class ClientLog:
    """Appends each round's client rows to ``clients.jsonl``; a resumed run first drops rows past its last round."""

    def __init__(self, run_dir: RunDir) -> None:
        self.path = run_dir.path / CLIENTS
        state = run_dir.load_state()
        last = int(state[0]["round"]) if state else 0
        if self.path.is_file():  # rounds after the last checkpoint were cut short: they will run again
            keep = [line for line in self.path.read_text().splitlines() if _round_of(line) <= last]
            tmp = self.path.with_name(CLIENTS + ".tmp")
            tmp.write_text("".join(f"{line}\n" for line in keep))
            os.replace(tmp, self.path)

    def __call__(self, row: dict[str, Any], answered: RoundReplies) -> None:
        with self.path.open("a") as f:
            for rec in client_rows(row, answered):
                f.write(json.dumps(rec, sort_keys=True, default=float) + "\n")


def _round_of(line: str) -> float:
    try:
        return int(json.loads(line)["round"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return float("inf")  # a line cut by a kill


def read_clients(run_dir: RunDir) -> list[dict[str, Any]]:
    path = run_dir.path / CLIENTS
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def write_metrics_csv(run_dir: RunDir) -> None:
    """``metrics.csv``: the scalar columns of ``metrics.jsonl`` (per-client tables stay in the JSON lines)."""
    rows = run_dir.read_metrics()
    if not rows:
        return
    columns: dict[str, None] = {"round": None}
    for r in rows:
        columns |= {k: None for k, v in r.items() if v is None or isinstance(v, (int, float, str, bool))}
    write_csv(run_dir.path / METRICS_CSV, [{k: r.get(k) for k in columns} for r in rows])
