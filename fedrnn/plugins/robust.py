"""Server-side checks of every client reply before it can reach the aggregate.

A reply is only aggregated if it is what the server asked for: exactly the trainable tensors
it sent (same names, shapes, float32), all finite, an update ``||w_client - w_global||``
within the configured bounds, and metrics that are finite numbers with a ``num-examples``
that is a positive integer no larger than the client's shard (FedAvg weights by it, so an
inflated count is itself an attack). Anything else is rejected, logged with its reason,
counted in the round's metrics, and dropped — one broken or hostile device can cost its
own slot, never the global model.

``ReplyValidator`` runs first among the round plugins, except the int8 uplink decoder,
which must turn int8 payloads back into float32 weights before they can be checked here
(this validator accepts float32 only).

Two rules compare a reply with the round's other replies: the norm ratio (``max_norm_ratio``
x the round's median) and keeping the majority's metric keys. Under client-level DP neither
may run: the sensitivity argument (one client moves the pre-noise average by at most ``C / m``,
``fedrnn.plugins.client_dp``) needs whether a client's update is kept to depend on that
client's reply alone. So with ``privacy.client_level`` on, ``max_norm_ratio`` must be 0 (the
config refuses anything else; use the absolute ``max_update_norm``) and the metric-key rule is
skipped (the client-level aggregate reads no client metric).

``num-examples`` is capped by the client's shard size in simulation; a real device's data is its
own, so only ``robust.max_num_examples`` bounds what it may claim (and, under client-level DP,
nothing weighs by it: the average is uniform).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import Message, RecordDict
from flwr.common.logger import log

from fedrnn.config import RobustSection
from fedrnn.data.partitions import load_partitions, split_holdout
from fedrnn.federation.messages import ARRAYS, METRICS, TrainReport
from fedrnn.federation.plugin import RoundInfo, RoundPlugin, RunContext

# Metrics the round loop reads from every reply; they must be present and finite.
REQUIRED_METRICS = tuple(TrainReport.key(k) for k in ("num_examples", "client_id", "train_loss", "train_seconds"))
NUM_EXAMPLES, CLIENT_ID = TrainReport.key("num_examples"), TrainReport.key("client_id")


class ReplyRejected(ValueError):
    """A client reply failed validation; the message is the reason recorded for it."""


@dataclass(frozen=True)
class Expected:
    """What a reply must match: the global tensors sent this round and the client's example cap."""

    arrays: dict[str, np.ndarray]
    client: int
    max_examples: int
    max_update_norm: float  # 0 = no absolute bound


def _number(metrics: Any, key: str) -> float:
    value = metrics.get(key) if key in metrics else None
    if value is None:
        raise ReplyRejected(f"metrics: missing {key!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReplyRejected(f"metrics: {key!r} is a {type(value).__name__}, expected a number")
    if not math.isfinite(value):
        raise ReplyRejected(f"metrics: {key!r} is {value}, expected a finite number")
    return float(value)


def check_reply(content: RecordDict, expected: Expected) -> float:
    """Validate one reply's content; returns its update norm or raises ``ReplyRejected``."""
    arrays_keys, metric_keys = list(content.array_records.keys()), list(content.metric_records.keys())
    if arrays_keys != [ARRAYS] or metric_keys != [METRICS]:
        raise ReplyRejected(f"records: expected one ArrayRecord 'arrays' and one MetricRecord 'metrics', "
                            f"got ArrayRecords {arrays_keys} and MetricRecords {metric_keys}")
    metrics = content[METRICS]
    for key in REQUIRED_METRICS:
        _number(metrics, key)
    for key in metrics:
        _number(metrics, key)  # strategies average every metric: lists and NaNs would poison the round's
    client = metrics[CLIENT_ID]  # compared as sent: SuperNode ids are uint64, beyond a float's 53 bits
    if client != expected.client:
        raise ReplyRejected(f"metrics: client-id {client} but the message was sent to client {expected.client}")
    n = _number(metrics, NUM_EXAMPLES)
    if n != int(n) or not 1 <= n <= expected.max_examples:
        raise ReplyRejected(f"metrics: num-examples {n:g} is not an integer in [1, {expected.max_examples}] "
                            f"(the client's training examples)")
    record = content[ARRAYS]
    names, want = set(record.keys()), set(expected.arrays)
    if names != want:
        raise ReplyRejected(f"arrays: missing {sorted(want - names)}, unexpected {sorted(names - want)}")
    sq = 0.0
    for name in sorted(want):
        try:
            value = record[name].numpy()
        except Exception as e:  # noqa: BLE001 - any undecodable bytes are the client's fault, never the server's
            raise ReplyRejected(f"arrays: {name} cannot be decoded ({type(e).__name__}: {e})") from None
        ref = expected.arrays[name]
        if value.dtype != np.float32:
            raise ReplyRejected(f"arrays: {name} has dtype {value.dtype}, expected float32")
        if value.shape != ref.shape:
            raise ReplyRejected(f"arrays: {name} has shape {value.shape}, expected {ref.shape}")
        if not np.isfinite(value).all():
            raise ReplyRejected(f"arrays: {name} contains NaN or infinite values")
        sq += float(np.sum((value.astype(np.float64) - ref) ** 2))
    norm = math.sqrt(sq)
    if not math.isfinite(norm) or (expected.max_update_norm and norm > expected.max_update_norm):
        raise ReplyRejected(f"update norm {norm:.4g} exceeds robust.max_update_norm = {expected.max_update_norm:g}")
    return norm


def low_median(values: list[float]) -> float:
    """The lower median: with two values it is the smaller, so one huge update cannot set the bar."""
    return sorted(values)[(len(values) - 1) // 2]


class ReplyValidator(RoundPlugin):
    """Rejects malformed or implausible replies before aggregation (see module docstring)."""

    name = "validation"

    def __init__(self, cfg: RobustSection) -> None:
        self.cfg = cfg
        self.per_client_only = False  # client-level DP: no rule may compare one reply with the others

    def setup(self, ctx: RunContext) -> None:
        self.per_client_only = ctx.cfg.privacy.client_level != "off"
        ctx.cfg.privacy.check_robust(self.cfg)  # the config refuses it too; a plugin built by hand must as well
        if ctx.simulated:
            # A simulated client trains on its shard minus the held-out part: that is its num-examples.
            c = ctx.cfg.client
            shards = load_partitions(ctx.files.partitions_path)
            self.max_examples = {k: len(split_holdout(s, c.holdout_fraction, ctx.cfg.run.seed, k)[0])
                                 for k, s in enumerate(shards)}
        else:
            self.max_examples = {}  # real devices: their data is their own; only the configured cap applies

    def _expected(self, info: RoundInfo, client: int) -> Expected:
        return Expected(info.arrays, client, self.max_examples.get(client, self.cfg.max_num_examples),
                        self.cfg.max_update_norm)

    def on_replies(self, info: RoundInfo, replies: list[Message]) -> tuple[list[Message], dict[str, Any]]:
        rejected: list[tuple[str, str]] = []  # (client, reason)
        accepted: list[tuple[int, Message, float]] = []
        for reply in replies:
            client = info.client_of(reply)
            try:
                if client is None:
                    raise ReplyRejected("reply to no training message sent this round")
                if any(c == client for c, _, _ in accepted):
                    raise ReplyRejected("second reply for the same client")
                accepted.append((client, reply, check_reply(reply.content, self._expected(info, client))))
            except ReplyRejected as e:
                rejected.append(("unknown" if client is None else str(client), str(e)))
        # Flower's strategies need every reply to carry the same metric keys: keep the majority's.
        keysets = Counter(frozenset(r.content[METRICS].keys()) for _, r, _ in accepted)
        if len(keysets) > 1 and not self.per_client_only:
            usual = max(keysets, key=lambda k: (keysets[k], sorted(k)))
            odd = {c: r for c, r, _ in accepted if frozenset(r.content[METRICS].keys()) != usual}
            rejected += [(str(c), f"metrics: keys {sorted(set(r.content[METRICS].keys()) ^ usual)} differ from "
                                  f"the other replies'") for c, r in odd.items()]
            accepted = [a for a in accepted if a[0] not in odd]
        if self.cfg.max_norm_ratio and accepted:
            median = low_median([norm for _, _, norm in accepted])
            bar = self.cfg.max_norm_ratio * median
            big = {c: norm for c, _, norm in accepted if bar > 0 and norm > bar}
            rejected += [(str(c), f"update norm {norm:.4g} exceeds robust.max_norm_ratio = {self.cfg.max_norm_ratio:g}"
                                  f" x the round's median {median:.4g}") for c, norm in big.items()]
            accepted = [a for a in accepted if a[0] not in big]
        for client, reason in rejected:
            log(WARNING, "round %d: rejected the reply of client %s: %s", info.number, client, reason)
        norms = [norm for _, _, norm in accepted]
        return [r for _, r, _ in accepted], {
            "rejected": len(rejected), "rejected_reasons": dict(rejected),
            "update_norm_median": float(np.median(norms)) if norms else None,
            "update_norm_max": max(norms) if norms else None,
        }
