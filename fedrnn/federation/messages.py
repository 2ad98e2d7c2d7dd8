"""The message schema: every key a server instruction or a client reply carries, with its type and default.

Flower messages carry flat ``ConfigRecord``/``MetricRecord`` dicts with hyphenated keys. Each
dataclass below is one part of that dict; a field ``local_epochs`` travels as ``"local-epochs"``.
The round loop and the plugins build instructions from these classes, the ClientApp parses them
back with :meth:`Schema.parse`, and the reply validator checks replies against them, so a key is
spelled, typed and defaulted in exactly one place.

Parts of a training or evaluation instruction (one ``ConfigRecord`` named ``config``):

* :class:`Task` - always: which client, what to train, where its data and the teacher are.
* :class:`RecordDP` - ``[privacy] record_level``: run DP-SGD, with the client's budget so far.
* :class:`Uplink` - ``[compression] uplink = "int8"``: send the update as int8.
* :class:`Attack`, :class:`Fault` - robustness studies and fault tests (simulated clients only).
* :class:`Student` - an evaluation message carrying the distilled int8 student.

A reply's ``MetricRecord`` named ``metrics``: :class:`TrainReport` (+ :class:`RecordDPReport`)
or :class:`EvalReport`. A device that will not carry out an instruction replies with a
:class:`Refusal` (a ``ConfigRecord`` named ``refusal``) and metrics ``client-id`` and
``refused-dp`` or ``refused-instruction`` = 1 instead.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

CONFIG = "config"  # the instruction's ConfigRecord
ARRAYS = "arrays"  # the tensors (global model, update or student)
METRICS = "metrics"  # the reply's MetricRecord


class MessageError(ValueError):
    """An instruction or report lacks a key or has a value of the wrong type; the message names the key."""


def wire_key(field_name: str) -> str:
    return field_name.replace("_", "-")


class Schema:
    """Mixin for a dataclass that is one part of a flat message dict."""

    _hints: ClassVar[dict[str, Any]]

    @classmethod
    def keys(cls) -> dict[str, str]:
        """Field name -> wire key."""
        return {f.name: wire_key(f.name) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]

    def to_record(self) -> dict[str, Any]:
        """The wire dict (``None`` fields are left out: they mean "not set")."""
        return {wire_key(k): v for k, v in dataclasses.asdict(self).items() if v is not None}  # type: ignore[call-overload]

    @classmethod
    def key(cls, name: str) -> str:
        """The wire key of field ``name`` (a typo fails here, not as a silently missing key)."""
        if name not in cls.keys():
            raise TypeError(f"{cls.__name__} has no field {name!r}")
        return wire_key(name)

    @classmethod
    def present(cls, record: Mapping[str, Any]) -> bool:
        """Whether ``record`` carries this part (its first field, which every part requires)."""
        return wire_key(dataclasses.fields(cls)[0].name) in record  # type: ignore[arg-type]

    @classmethod
    def parse(cls, record: Mapping[str, Any]) -> Self:
        """Read this part from a wire dict: defaults for missing optional keys, types checked."""
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            key = wire_key(f.name)
            if key not in record:
                if f.default is dataclasses.MISSING:
                    raise MessageError(f"{cls.__name__}: missing key {key!r}")
                continue
            values[f.name] = _coerce(cls.__name__, key, record[key], hints[f.name])
        return cls(**values)

    @classmethod
    def overrides(cls, **fields: Any) -> dict[str, Any]:
        """Wire keys for a few of this part's fields (a plugin changing them for one client)."""
        names = cls.keys()
        unknown = set(fields) - set(names)
        if unknown:
            raise TypeError(f"{cls.__name__} has no fields {sorted(unknown)}")
        return {names[k]: v for k, v in fields.items()}


def _coerce(part: str, key: str, value: Any, hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and value is None:
        return None
    hint = args[0] if args else hint
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
        str: lambda v: isinstance(v, str),
    }[hint]
    if not ok(value):
        raise MessageError(f"{part}: {key!r} = {value!r} is not a {hint.__name__}")
    return float(value) if hint is float else value


# ---------------------------------------------------------------------------------------------- instructions
@dataclass(frozen=True)
class Task(Schema):
    """What every training/evaluation message says. ``client_id`` is the virtual client in simulation."""

    server_round: int
    client_id: int
    seed: int
    mode: str  # the transfer mode: which tensors travel
    lr: float
    local_epochs: int
    batch_size: int
    max_steps: int  # 0 = whole epochs
    clip_norm: float
    holdout_fraction: float
    threads: int  # torch threads of a simulation worker (a real device sets its own in node config)
    deadline_s: float  # a job running longer is aborted by the client mod
    teacher_path: str
    target_path: str
    partitions_path: str
    train_mode: str = ""  # a device short of memory may train fewer tensors than travel; "" = mode
    proximal_mu: float = 0.0  # FedProx's, added by the strategy
    frozen_cache_mb: int = 0  # replay the frozen bottom layer across local epochs (fedrnn.model.training.FrozenBottom)

    @property
    def trains(self) -> str:
        return self.train_mode or self.mode


@dataclass(frozen=True)
class RecordDP(Schema):
    """Record-level DP-SGD (``fedrnn.plugins.record_dp``); ``state_json``: the client's accountant so far."""

    dp_record: bool
    dp_noise_multiplier: float  # 0 = calibrate from dp_target_epsilon
    dp_target_epsilon: float  # 0 = no budget (account only)
    dp_max_grad_norm: float
    dp_delta: float
    dp_planned_rounds: int
    dp_state_json: str = ""  # "" before the client's first round


@dataclass(frozen=True)
class Uplink(Schema):
    """Send the update quantized (``fedrnn.plugins.compression``)."""

    uplink: str  # "int8" | "int4"
    rounding: str  # nearest | stochastic
    error_feedback: bool
    client_state_dir: str  # simulation: where each virtual client's residual lives


@dataclass(frozen=True)
class Attack(Schema):
    """A Byzantine client in a robustness study (``fedrnn.plugins.attack``)."""

    attack: str  # sign-flip | scale | label-flip
    attack_scale: float = 1.0


@dataclass(frozen=True)
class Fault(Schema):
    """An injected failure in a fault test (``fedrnn.plugins.faults``)."""

    fault: str  # raise | hang | crash
    hang_s: float = 30.0


@dataclass(frozen=True)
class Student(Schema):
    """An evaluation message whose arrays are the student (``fedrnn.plugins.distill``), int8 or float32.

    With a pruned vocabulary the arrays also hold ``VOCAB_IDS`` (the teacher token ids the student
    keeps) and ``teacher_vocab`` says how many ids the device's reviews may hold.
    """

    student: bool
    student_model: str  # the student's ModelConfig as JSON
    teacher_vocab: int = 0  # > 0: the student reads the teacher's ids through ``VOCAB_IDS``


VOCAB_IDS = "vocab.old_ids"  # a pruned-vocabulary student's kept teacher token ids (uint16 or int32)


# ---------------------------------------------------------------------------------------------- replies
@dataclass(frozen=True)
class TrainReport(Schema):
    """Metrics of a training reply; the round loop and the strategy read these."""

    num_examples: int
    client_id: int
    train_loss: float
    train_seconds: float
    train_accuracy: float = 0.0
    steps: float = 0.0
    samples: float = 0.0
    client_seconds: float = 0.0
    train_cpu_seconds: float = 0.0  # CPU time of the training (wall time on a busy core overstates the work)


@dataclass(frozen=True)
class RecordDPReport(Schema):
    """What a DP-SGD client adds to its training metrics."""

    dp_epsilon: float
    dp_noise_multiplier: float
    dp_trained: float  # 1 = trained, 0 = out of budget, returned untrained
    dp_exhausted: float  # 1 = its next round would not fit its budget


@dataclass(frozen=True)
class EvalReport(Schema):
    """Metrics of an evaluation reply (no eval keys when the client holds no held-out data)."""

    num_examples: int
    client_id: int
    eval_loss: float | None = None
    eval_accuracy: float | None = None


@dataclass(frozen=True)
class Refusal(Schema):
    """Why a device did not carry out an instruction (``fedrnn.plugins.refusals``)."""

    refused: str  # "dp": less privacy than its policy allows; "instruction": a fault or attack sent to a real device
    reason: str

    @property
    def metric(self) -> str:
        """The reply metric (= 1) that flags this refusal."""
        return f"refused-{self.refused}"


REFUSALS = ("dp", "instruction")
REPLY_PRIVACY = "privacy"  # ConfigRecord of a DP-SGD reply: the client's updated accountant state
REPLY_REFUSAL = "refusal"  # ConfigRecord of a refusing device's reply: a Refusal
