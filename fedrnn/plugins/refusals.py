"""The server's record of what devices refused to do, and why.

A device refuses a training instruction that asks for less privacy than its node policy allows
(``fedrnn.privacy.policy``), and a real device refuses fault and attack instructions
(``clients/client_app.refusal_of``). It replies untrained, with a ``refusal`` record saying why.
This plugin acts first: it takes those replies out of the round (they carry no update; under
client-level DP they count as zero updates, like any dropped client), logs each reason and puts
per-round counts and reasons in the metrics (``dp_refused``, ``dp_refused_reasons``,
``refused_instructions``, ``refused_instructions_reasons``; reasons keyed by client id).
"""

from __future__ import annotations

from logging import WARNING
from typing import Any

from flwr.app import Message
from flwr.common.logger import log

from fedrnn.federation.messages import REPLY_REFUSAL, MessageError, Refusal
from fedrnn.federation.plugin import RoundInfo, RoundPlugin

METRIC_NAMES = {"dp": "dp_refused", "instruction": "refused_instructions"}


class RefusalRecord(RoundPlugin):
    name = "refusals"

    def on_replies(self, info: RoundInfo, replies: list[Message]) -> tuple[list[Message], dict[str, Any]]:
        kept: list[Message] = []
        reasons: dict[str, dict[str, str]] = {kind: {} for kind in METRIC_NAMES}
        for reply in replies:
            if REPLY_REFUSAL not in reply.content.config_records:
                kept.append(reply)
                continue
            client = str(info.client_of(reply))
            try:
                refusal = Refusal.parse(reply.content.config_records[REPLY_REFUSAL])
                if refusal.refused not in METRIC_NAMES:
                    raise MessageError(f"Refusal: unknown kind {refusal.refused!r}")
            except MessageError as e:  # still no update: the reply is dropped either way
                refusal = Refusal("instruction", f"unreadable refusal ({e})")
            reasons[refusal.refused][client] = refusal.reason
            log(WARNING, "round %d: client %s refused: %s", info.number, client, refusal.reason)
        metrics: dict[str, Any] = {}
        for kind, name in METRIC_NAMES.items():
            metrics |= {name: len(reasons[kind]), f"{name}_reasons": reasons[kind]}
        return kept, metrics
