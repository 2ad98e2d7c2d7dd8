"""What a run prints: one line per round (with elapsed time and ETA), and nothing from Ray or Flower.

A round without server-side evaluation (``server.eval_every``) gets a shorter line instead of
columns of dashes. Without ``--verbose``, Flower's ``run_simulation`` deprecation notice and
Ray's end-of-run ``(raylet) Task ClientAppActor.terminate failed`` lines are dropped (see
:func:`quiet_flower` and :func:`quiet_ray`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console

from fedrnn.federation.loop import RoundReplies
from fedrnn.runs.records import error_text


def duration(seconds: float) -> str:
    """``42s``, ``3m 05s``, ``2h 07m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def accuracy(value: Any) -> str:
    """An accuracy (or loss) with 4 decimals; ``-`` when the round has none."""
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def round_line(row: dict[str, Any], rounds: int, elapsed_s: float, eta_s: float | None) -> str:
    """One round's line: accuracies on evaluation rounds, training loss and traffic on every round."""
    parts = [f"round {row['round']:>3}/{rounds}"]
    if row.get("target_accuracy") is not None:
        parts.append(f"target {accuracy(row['target_accuracy'])}  source {accuracy(row.get('retention_accuracy'))}")
        if row.get("fed_eval_accuracy_mean") is not None:
            parts.append(f"clients {accuracy(row['fed_eval_accuracy_mean'])} "
                         f"(p10 {accuracy(row.get('fed_eval_accuracy_p10'))})")
    parts.append(f"loss {accuracy(row.get('train_loss'))}")
    parts.append(f"down {row['bytes_down'] / 1e6:.1f} MB  up {row['bytes_up'] / 1e6:.1f} MB")
    if row.get("failures"):
        parts.append(f"[red]failed {row['failures']}[/]")
    parts.append(f"{row['round_seconds']:.1f} s  elapsed {duration(elapsed_s)}")
    if eta_s is not None:
        parts.append(f"ETA {duration(eta_s)}")
    return "  ".join(parts)


def round_printer(console: Console, rounds: int) -> Callable[[dict[str, Any]], None]:
    """A per-round hook printing :func:`round_line`; the ETA is the mean round time so far x the rounds left."""
    start: list[float] = []
    done = [0]

    def show(row: dict[str, Any]) -> None:
        now = time.perf_counter()
        if not start:
            start.append(now - row["round_seconds"])
        done[0] += 1
        elapsed = now - start[0]
        left = rounds - row["round"]
        console.print(round_line(row, rounds, elapsed, elapsed / done[0] * left if left else None), soft_wrap=True,
                      highlight=False)
        groups = {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith("target_accuracy/")}
        if groups:
            console.print("          per group  " + "  ".join(f"{g} {v:.4f}" for g, v in groups.items()),
                          soft_wrap=True)
        if "client_accuracy_mean" in row:
            line = (f"          per client (held-out)  mean {row['client_accuracy_mean']:.4f}  "
                    f"p10 {row['client_accuracy_p10']:.4f}  worst {row['client_accuracy_worst']:.4f}")
            if "personalized_accuracy_mean" in row:
                line += (f"  ->  personalised mean {row['personalized_accuracy_mean']:.4f}  "
                         f"p10 {row['personalized_accuracy_p10']:.4f}  worst {row['personalized_accuracy_worst']:.4f}")
            console.print(line, soft_wrap=True)

    return show


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(f in text for f in self.fragments)


def failure_printer(console: Console) -> Callable[[dict[str, Any], RoundReplies], None]:
    """A per-round reply hook printing one line per failed client: its own exception, not Ray's traceback chain."""

    def show(row: dict[str, Any], answered: RoundReplies) -> None:
        for reply in answered.replies:
            if reply.has_error():
                client = answered.sent.get(reply.metadata.reply_to_message_id)
                console.print(f"  [red]client {client} failed[/]: {error_text(reply)}", soft_wrap=True,
                              highlight=False)

    return show


# Flower's Simulation Engine logs each failed ClientApp job as three ERROR records (a notice, the
# exception, the traceback), with Ray's traceback chain inside: tens of lines per failed client.
CLIENT_FAILURE_LOGS = ("An exception was raised when processing a message by", "ray::ClientAppActor",
                       "Traceback (most recent call last)")
# The round loop asks the strategy for one prototype training message (``OneNodeGrid``), so
# Flower's "configure_train: Sampled 1 nodes (out of 1)" describes that call, not the round.
PROTOTYPE_LOGS = ("configure_train: Sampled 1 nodes (out of 1)",)


def quiet_flower(level: int | None = logging.WARNING) -> None:
    """Drop Flower's messages that a normal run does not need (``--verbose`` keeps them).

    Only warnings and errors (``level``; None keeps Flower's own, as under ``flwr run`` where its
    lines are expected), not the notice that ``run_simulation`` is deprecated (fedrnn keeps it;
    the README's "Console" section says why), nor its per-failure traceback logs
    (:data:`CLIENT_FAILURE_LOGS`; :func:`failure_printer` prints one line per failed client
    instead, and ``clients.jsonl`` keeps the reason), nor :data:`PROTOTYPE_LOGS`.
    """
    flwr = logging.getLogger("flwr")
    if level is not None:
        flwr.setLevel(level)
    if not any(isinstance(f, _DropMessages) for f in flwr.filters):
        flwr.addFilter(_DropMessages("The `run_simulation` function is deprecated", *CLIENT_FAILURE_LOGS,
                                     *PROTOTYPE_LOGS))


def quiet_ray() -> None:
    """Do not print the errors Ray's workers report to the driver (``(raylet) ...`` lines).

    At the end of every run Flower stops its actors with a task that ends the actor, which Ray
    reports as a failed task (retried, as fedrnn's actors allow one retry): two lines that say
    nothing about the run. A real client failure is reported by the round loop (``failed N``,
    :func:`failure_printer` and the failure guard). Call it from the thread that imported Ray.
    """
    import ray._private.worker as ray_worker

    printer = ray_worker.print_to_stdstream
    if getattr(printer, "fedrnn_quiet", False):
        return

    def print_unless_raylet(data: dict[str, Any], ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":
            printer(data, ignore_prefix)

    print_unless_raylet.fedrnn_quiet = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = print_unless_raylet
