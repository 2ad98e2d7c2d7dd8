"""Replies built by hand, for tests that give them to plugins and strategies without a Grid."""

from __future__ import annotations

from flwr.app import MessageType
from flwr.app.metadata import Metadata


def reply_metadata(reply_to: str = "", message_id: str = "", src_node_id: int = 1) -> Metadata:
    """A train reply's metadata: ``reply_to`` is the message id the round loop sent."""
    return Metadata(run_id=1, message_id=message_id, src_node_id=src_node_id, dst_node_id=0,
                    reply_to_message_id=reply_to, group_id="", created_at=0.0, ttl=60.0,
                    message_type=MessageType.TRAIN)
