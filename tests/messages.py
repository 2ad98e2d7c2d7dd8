"""Replies built by hand, for tests that give them to plugins and strategies without a Grid."""

from __future__ import annotations

from flwr.app import MessageType
from flwr.app.metadata import Metadata

from fedrnn.federation.messages import Task
from fedrnn.federation.plugin import RoundInfo


def reply_metadata(reply_to: str = "", message_id: str = "", src_node_id: int = 1) -> Metadata:
    """A train reply's metadata: ``reply_to`` is the message id the round loop sent."""
    return Metadata(run_id=1, message_id=message_id, src_node_id=src_node_id, dst_node_id=0,
                    reply_to_message_id=reply_to, group_id="", created_at=0.0, ttl=60.0,
                    message_type=MessageType.TRAIN)


def round_info(rnd: int = 1, arrays: dict | None = None, clients: range = range(100), prefix: str = "") -> RoundInfo:
    """A round whose training message to client ``c`` had id ``f"{prefix}{c}"`` (what ``reply_metadata`` answers)."""
    return RoundInfo(rnd, arrays or {}, {f"{prefix}{c}": c for c in clients})


def task(**fields: object) -> Task:
    """A training instruction with test defaults; ``fields`` override them."""
    base: dict = dict(server_round=1, client_id=0, seed=0, mode="fine-tune", lr=0.01, local_epochs=1, batch_size=8,
                      max_steps=0, clip_norm=1.0, holdout_fraction=0.2, threads=1, deadline_s=0.0, teacher_path="",
                      target_path="", partitions_path="")
    return Task(**(base | fields))
