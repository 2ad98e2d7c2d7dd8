"""Loud failures: a run whose clients fail stops with an error quoting the first failure.

A federated run survives a few failed clients (a crashed worker, a device gone offline), but a
run in which every client fails, e.g. a bug in the ClientApp or a missing file on the workers,
would otherwise go on "training" the unchanged model and exit 0. The guard stops the run when
all of a round's training jobs failed, or when more than ``server.max_failure_fraction`` of the
jobs sent so far failed; the error quotes the first failure (Flower's error reply carries the
client's exception text).
"""

from __future__ import annotations

from typing import Any

from fedrnn.federation.loop import RoundReplies
from fedrnn.runs.records import error_text


class RunFailedError(RuntimeError):
    """Too many of the run's clients failed; the run stopped (it can be resumed once the cause is fixed)."""


class FailureGuard:
    """A per-round hook (``Federation.on_replies``) raising :class:`RunFailedError`."""

    def __init__(self, max_fraction: float) -> None:
        self.max_fraction = max_fraction
        self.sent = self.failed = 0
        self.first: str | None = None

    def __call__(self, row: dict[str, Any], answered: RoundReplies) -> None:
        sent, failed, rnd = len(answered.sent), int(row["failures"]), row["round"]
        self.sent, self.failed = self.sent + sent, self.failed + failed
        if failed and self.first is None:
            self.first = self._describe(rnd, answered)
        if sent and failed == sent:
            raise RunFailedError(f"round {rnd}: all {sent} clients failed; first failure: {self.first}")
        if self.sent and self.failed / self.sent > self.max_fraction:
            raise RunFailedError(
                f"round {rnd}: {self.failed} of the {self.sent} training jobs sent so far failed, more than "
                f"server.max_failure_fraction = {self.max_fraction:g}; first failure: {self.first}")

    @staticmethod
    def _describe(rnd: int, answered: RoundReplies) -> str:
        for reply in answered.replies:
            if reply.has_error():
                return f"round {rnd}, client {answered.sent.get(reply.metadata.reply_to_message_id)}: " \
                       f"{error_text(reply)}"
        return f"round {rnd}: no reply within server.timeout_s"
