"""Int8 or int4 on the wire, both ends: the server's global-model broadcast and the clients' updates.

Formats (``fedrnn.edge.quantize``): ``int8``, per-row int8 plus float32 ``name.__scale``
(~3.9x fewer bytes than float32); ``int4``, two values a byte plus a float16 scale per block of
32 (~7x fewer). The descriptions below say int8; int4 works the same way, only coarser.

* **Downlink** (``compression.downlink = "int8"``): the trainable global tensors, rounded to
  nearest. A payload is self-describing (scale entries), so a client decodes whatever it is
  sent, for training and for evaluation alike.
* **Uplink** (``compression.uplink = "int8"``): not the trained weights but the *update*,
  ``trained - received``, which is small and centred on zero, so per-row scales lose far less
  than on the weights themselves. Rounding is to nearest or stochastic (unbiased, so the
  average over clients is too), optionally with error feedback: the client adds the rounding
  error it left out last time before quantizing (``quantize.ErrorFeedback``).

The server keeps the float32 master weights ``w``: a client's model is reconstructed as
``w + update``, and a float32 reply to an int8 broadcast ``q(w)`` is re-based to
``reply - q(w) + w``. So downlink rounding perturbs where clients start, never the global
model itself. Replies that fail to decode (wrong dtype, shape, names, a missing scale, non-
finite values) are dropped before aggregation and counted, never crash the round.

Error-feedback residuals are client state. In simulation a "client" is a virtual id served by
any executor node, so Flower's per-node ``Context.state`` cannot hold it: it lives in a file per
client id under the run directory (``client_state/ID.npz``). On a real device (a SuperNode) it
lives in ``Context.state``, which persists across the rounds of a run. Either way the residual
from *before* the last written round is kept too, so a round replayed after a crash and
``--resume`` starts from the same residual as the first time, keeping resumed runs exact.
"""

from __future__ import annotations

import os
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.logger import log

from fedrnn.config import CompressionSection
from fedrnn.edge.quantize import ErrorFeedback, QuantizationError, decode, encode, is_encoded
from fedrnn.federation.messages import ARRAYS, Task, Uplink
from fedrnn.federation.plugin import RoundInfo, RoundPlugin, RunContext
from fedrnn.federation.wire import from_record, record_nbytes, to_record

CLIENT_STATE_DIR = "client_state"  # under the run directory: error-feedback residuals per virtual client
STATE_KEY = "fedrnn-error-feedback"  # Context.state entry on a real device
BITS = {"int8": 8, "int4": 4}  # wire formats -> bits a value


# ---------------------------------------------------------------------------------------- client side


def decode_downlink(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The float32 tensors a message carries, quantized or not."""
    arrays = from_record(record)
    return decode(arrays) if is_encoded(arrays) else arrays


class ResidualStore:
    """One client's error-feedback residuals: a file in simulation, ``Context.state`` on a device.

    Saved as ``round``, ``before/NAME`` (the residual the round started from) and ``after/NAME``.
    """

    def __init__(self, path: Path | None = None, context: Context | None = None) -> None:
        if (path is None) == (context is None):
            raise ValueError("ResidualStore needs exactly one of a file path or a Flower Context")
        self.path, self.context = path, context

    def _read(self) -> dict[str, np.ndarray]:
        if self.path is not None:
            if not self.path.is_file():
                return {}
            with np.load(self.path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        record = self.context.state.get(STATE_KEY) if self.context is not None else None
        return from_record(record) if isinstance(record, ArrayRecord) else {}

    def load(self, rnd: int) -> dict[str, np.ndarray]:
        """The residuals to use in round ``rnd`` (those it started from, if it is being replayed)."""
        saved = self._read()
        if not saved:
            return {}
        last = int(saved["round"][0])
        if last > rnd:
            where = self.path or f"Context.state[{STATE_KEY!r}]"
            raise ValueError(f"{where}: residuals were written in round {last}, after the current round {rnd}")
        prefix = "before/" if last == rnd else "after/"
        return {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}

    def save(self, rnd: int, before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> None:
        arrays = {"round": np.array([rnd], dtype=np.int64)}
        arrays |= {f"before/{k}": v for k, v in before.items()} | {f"after/{k}": v for k, v in after.items()}
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, self.path)  # atomic: a kill leaves the old or the new file, never half of one
        elif self.context is not None:
            self.context.state[STATE_KEY] = to_record(arrays)


def encode_uplink(cfg: ConfigRecord, task: Task, trained: dict[str, np.ndarray], received: dict[str, np.ndarray],
                  context: Context, simulated: bool) -> dict[str, np.ndarray]:
    """What a client sends back: its trained tensors, or their int8/int4 update if the server asked for it."""
    if not Uplink.present(cfg):
        return trained
    up = Uplink.parse(cfg)
    if up.uplink not in BITS:
        raise ValueError(f"uplink {up.uplink!r} in the message config; only {sorted(BITS)} are encoded")
    rnd, client = task.server_round, task.client_id
    delta = {n: trained[n] - received[n] for n in trained}
    stochastic = up.rounding == "stochastic"
    rng = np.random.default_rng([task.seed, rnd, max(client, 0), 8]) if stochastic else None
    if not up.error_feedback:
        return encode(delta, rng, BITS[up.uplink])
    store = (ResidualStore(path=Path(up.client_state_dir) / f"{client}.npz") if simulated
             else ResidualStore(context=context))
    before = store.load(rnd)
    feedback = ErrorFeedback(before, BITS[up.uplink])
    payload = feedback.compress(delta, rng)
    store.save(rnd, before, feedback.state())
    return payload


# ---------------------------------------------------------------------------------------- server side


class Int8Compression(RoundPlugin):
    """Encodes the broadcast (``encode_down``) and decodes int8/int4 updates before aggregation."""

    name = "compression"

    def __init__(self, cfg: CompressionSection) -> None:
        self.cfg = cfg
        self.reference: dict[str, np.ndarray] = {}  # float32 global tensors of the round being trained
        self.received: dict[str, np.ndarray] = {}  # what the clients decode from the broadcast
        self.payload_bytes = (0, 0)  # one client's broadcast on the wire, and as float32

    def setup(self, ctx: RunContext) -> None:
        self.state_dir = Path(ctx.files.run_dir) / CLIENT_STATE_DIR

    def encode_down(self, arrays: dict[str, np.ndarray], rnd: int, message_type: str) -> dict[str, np.ndarray]:
        quantized = self.cfg.downlink in BITS
        payload = encode(arrays, bits=BITS[self.cfg.downlink]) if quantized else arrays
        if message_type == MessageType.TRAIN:
            self.reference = {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}
            self.received = decode(payload) if quantized else self.reference
            self.payload_bytes = (record_nbytes(to_record(payload)), record_nbytes(to_record(self.reference)))
        return payload

    def configure(self, info: RoundInfo, clients: list[int],
                  rng: np.random.Generator) -> dict[int, dict[str, Any] | None]:
        if self.cfg.uplink not in BITS:
            return {}
        extra = Uplink(uplink=self.cfg.uplink, rounding=self.cfg.rounding, error_feedback=self.cfg.error_feedback,
                       client_state_dir=str(self.state_dir)).to_record()
        return {c: dict(extra) for c in clients}

    def decode_reply(self, record: ArrayRecord) -> dict[str, np.ndarray]:
        """A reply's float32 client model, rebased onto the master weights; raises on a malformed reply."""
        shapes = {k: v.shape for k, v in self.reference.items()}
        if self.cfg.uplink in BITS:
            delta = decode(from_record(record), expected=shapes)
            out = {k: self.reference[k] + delta[k] for k in shapes}
        else:
            arrays = from_record(record)
            if set(arrays) != set(shapes):
                raise QuantizationError(f"reply tensors {sorted(arrays)} differ from those sent {sorted(shapes)}")
            for k, v in arrays.items():
                if v.dtype != np.float32 or v.shape != shapes[k]:
                    raise QuantizationError(f"{k}: {v.dtype} {v.shape}, expected float32 {shapes[k]}")
            if self.cfg.downlink == "float32":
                return arrays
            out = {k: arrays[k] - self.received[k] + self.reference[k] for k in shapes}
        bad = [k for k, v in out.items() if not np.isfinite(v).all()]
        if bad:
            raise QuantizationError(f"{bad[0]}: decoded update is not finite")
        return out

    def on_replies(self, info: RoundInfo, replies: list[Message]) -> tuple[list[Message], dict[str, Any]]:
        kept, rejected = [], []  # rejected: (client, reason)
        for reply in replies:
            client = str(info.client_of(reply))
            try:
                arrays = self.decode_reply(reply.content[ARRAYS])
            except Exception as e:  # noqa: BLE001 - whatever a client sent, it costs its own slot, never the round
                log(WARNING, "round %d: dropped the reply of client %s: %s", info.number, client, e)
                rejected.append((client, f"{type(e).__name__}: {e}"))
                continue
            content = {k: v for k, v in reply.content.items() if k != ARRAYS}
            reply.content = RecordDict({**content, ARRAYS: to_record(arrays)})
            kept.append(reply)
        down, down_fp32 = self.payload_bytes
        return kept, {"uplink_rejected": len(rejected), "uplink_rejected_reasons": dict(rejected),
                      "down_payload_bytes": down, "down_payload_bytes_float32": down_fp32}
