"""The round-plugin interface: what a plugin may read and do, and the hooks the round loop calls.

A run is the plain round loop (:mod:`fedrnn.federation.loop`) plus the plugins its config
switches on (:func:`fedrnn.plugins.build_plugins`). A plugin sees the run only through
:class:`RunContext` (given once, in :meth:`RoundPlugin.setup`) and :class:`RoundInfo` (given
to each round hook); it never reads or sets the loop's own attributes. Per round the loop calls,
in plugin order::

    candidates -> configure -> [encode_down] -> send -> on_replies -> aggregate -> after_aggregate

and ``state``/``load_state`` around every checkpoint. ``wrap_strategy`` is called once, before
the run, so a plugin can put a Flower strategy wrapper (e.g. central DP) around the strategy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedrnn.config import RunConfig
from fedrnn.data.target import TargetData
from fedrnn.federation.evaluation import ServerEvaluator
from fedrnn.federation.local import Base
from fedrnn.federation.prepare import RunFiles

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class RunContext:
    """What every plugin may use, fixed for the run.

    ``simulated``: clients are fedrnn's virtual clients on simulated SuperNodes (``False``: every
    SuperNode is one real device). ``encode_down`` is what the loop would send for ``arrays`` in a
    round (after every plugin's :meth:`RoundPlugin.encode_down`); ``send`` sends one message per
    client and returns the replies that came back without error.
    """

    cfg: RunConfig
    files: RunFiles
    base: Base
    target: TargetData
    evaluator: ServerEvaluator
    simulated: bool
    global_model: Callable[[Arrays], torch.nn.Module]
    encode_down: Callable[[Arrays, int, str], Arrays]
    send: Callable[..., list[Message]]


@dataclass
class RoundInfo:
    """This round: its number, the global tensors it trains from, and who each message went to."""

    number: int
    arrays: Arrays
    sent: dict[str, int] = field(default_factory=dict)  # message id -> client

    def client_of(self, reply: Message) -> int | None:
        """The client a reply answers: the one its message was sent to, never what the reply claims."""
        return self.sent.get(reply.metadata.reply_to_message_id)


class RoundPlugin:
    """A composable addition to the round loop; every hook defaults to doing nothing.

    Device simulation, privacy accounting, update validation, compression and distillation
    are plugins, so a run is the plain loop plus what its config switches on. ``name`` keys
    the plugin's saved state.
    """

    name = "plugin"

    def wrap_strategy(self, strategy: Strategy) -> Strategy:
        """Put a wrapper around the run's Flower strategy (called once, before ``setup``)."""
        return strategy

    def setup(self, ctx: RunContext) -> None:
        """Called once before the first round (after resume state is loaded)."""

    def candidates(self, rnd: int, clients: list[int]) -> list[int]:
        """Narrow who may be selected this round (e.g. only devices that are online)."""
        return clients

    def configure(self, info: RoundInfo, clients: list[int],
                  rng: np.random.Generator) -> dict[int, dict[str, Any] | None]:
        """Per-client message keys (from ``fedrnn.federation.messages``); ``None``: the client will not report."""
        return {}

    def encode_down(self, arrays: Arrays, rnd: int, message_type: str) -> Arrays:
        """What travels for the global tensors ``arrays`` (e.g. int8 with scales); default: as they are."""
        return arrays

    def on_replies(self, info: RoundInfo, replies: list[Message]) -> tuple[list[Message], dict[str, Any]]:
        """Inspect, account for or reject replies before aggregation; returns kept replies and metrics."""
        return replies, {}

    def after_aggregate(self, info: RoundInfo, grid: Grid, arrays: Arrays) -> dict[str, Any]:
        """Work on the new global model (e.g. distil and ship a student); returns metrics."""
        return {}

    def state(self) -> tuple[dict[str, Any], Arrays]:
        """JSON-able state and arrays saved with each round, for resume."""
        return {}, {}

    def load_state(self, state: dict[str, Any], arrays: Arrays) -> None:
        """Restore what ``state`` returned."""


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")
