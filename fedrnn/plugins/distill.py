"""Round plugin: distil a compact student from the federated model, ship it to devices as int8.

Every ``distill.every_k_rounds`` rounds (and after the last) the server trains a small
``SentimentRNN`` (``fedrnn.edge.distill``) to mimic the freshly aggregated global model — or, with
``distill.feddf``, the ensemble of the round's client models (FedDF) — on a fresh random
subsample of the unlabelled IMDB reviews it holds. The student is warm-started from the
previous distillation (kept in the plugin state, so ``--resume`` continues it) and its
vocabulary is the teacher's, so both read the same tokenizer's ids.

Each distillation:
* evaluates the student server-side like the global model (``student_target_accuracy``, ...),
  both in float32 and as the int8 weights a device receives;
* saves ``runs/NAME/student/`` (a checkpoint with the teacher's tokenizer), which
  ``python -m fedrnn.edge.export runs/NAME`` turns into the deployable ONNX model;
* with ``distill.ship``, sends every weight of the student, embedding included, as int8
  (``fedrnn.edge.quantize``) to the round's clients in an EVALUATE message flagged ``student=1``;
  each decodes it, builds the student from the config sent alongside and reports its accuracy
  on its own held-out reviews. The bytes shipped are counted from the records that travel.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid
from tokenizers import Tokenizer

from fedrnn.config import DistillSection
from fedrnn.data.loaders import load_imdb
from fedrnn.data.tokenizer import Encoded
from fedrnn.data.tokenizer import encode as encode_texts
from fedrnn.edge.distill import STUDENT_SUBDIR, distill, make_student
from fedrnn.edge.quantize import decode, encode
from fedrnn.federation.local import local_evaluate
from fedrnn.federation.messages import ARRAYS, CONFIG, METRICS, EvalReport, Student, TrainReport
from fedrnn.federation.plugin import RoundInfo, RoundPlugin, RunContext, percentile
from fedrnn.federation.prepare import cache_dir
from fedrnn.federation.wire import from_record, record_nbytes, to_record
from fedrnn.model.checkpoint import load_checkpoint, save_checkpoint
from fedrnn.model.rnn import ModelConfig, SentimentRNN, num_parameters
from fedrnn.model.training import evaluate

TRANSFER_SEED = 13  # fixes which unlabelled reviews form a pool of a given size


# ---------------------------------------------------------------------------------------- transfer set


def transfer_cache_path(directory: Path, tokenizer: Tokenizer, max_len: int, size: int) -> Path:
    digest = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:12]
    return Path(directory) / f"imdb-unsup-{digest}-len{max_len}-n{size}.npz"


def prepare_transfer(tokenizer: Tokenizer, max_len: int, size: int, directory: Path, data_dir: str | None) -> Path:
    """Tokenize ``size`` unlabelled IMDB reviews once (a fixed random choice); returns the cache file."""
    path = transfer_cache_path(directory, tokenizer, max_len, size)
    if path.is_file():
        return path
    unsup = load_imdb("unsup", data_dir)
    if size > len(unsup):
        raise ValueError(f"distill.transfer_pool = {size} exceeds the {len(unsup)} unlabelled IMDB reviews")
    idx = np.sort(np.random.default_rng(TRANSFER_SEED).permutation(len(unsup))[:size])
    enc = encode_texts(tokenizer, [unsup.texts[i] for i in idx], np.full(size, -1), max_len)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, ids=enc.ids, lengths=enc.lengths)
    tmp.replace(path)
    return path


def load_transfer(path: str | Path) -> Encoded:
    with np.load(path, allow_pickle=False) as z:
        ids, lengths = z["ids"], z["lengths"]
    return Encoded(ids, lengths, np.full(len(lengths), -1, dtype=np.int64))


# ---------------------------------------------------------------------------------------- client side


def is_student_message(msg: Message) -> bool:
    return Student.present(msg.content[CONFIG]) and Student.parse(msg.content[CONFIG]).student


def evaluate_student(content: RecordDict, held: Encoded) -> dict[str, float]:
    """On-device accuracy of a shipped int8 student; a malformed payload raises ``QuantizationError``."""
    model = SentimentRNN(ModelConfig.from_dict(json.loads(Student.parse(content[CONFIG]).student_model)))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    weights = decode(from_record(content[ARRAYS]), expected)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    return local_evaluate(model, held)


# ---------------------------------------------------------------------------------------- server side


class StudentDistillation(RoundPlugin):
    name = "distill"

    def __init__(self, cfg: DistillSection) -> None:
        self.cfg = cfg
        self.student_state: dict[str, np.ndarray] = {}  # the latest student, warm start of the next distillation
        self.round_clients: list[int] = []
        self.client_arrays: list[dict[str, np.ndarray]] = []

    def setup(self, ctx: RunContext) -> None:
        self.ctx = ctx
        _, self.tokenizer, meta = load_checkpoint(ctx.files.teacher_dir)
        self.max_len = int(meta["max_len"])
        path = prepare_transfer(self.tokenizer, self.max_len, self.cfg.transfer_pool, cache_dir() / "transfer",
                                ctx.cfg.run.data_dir or None)
        self.transfer = load_transfer(path)
        self.student_dir = Path(ctx.files.run_dir) / STUDENT_SUBDIR

    def _due(self, rnd: int) -> bool:
        return rnd % self.cfg.every_k_rounds == 0 or rnd == self.ctx.cfg.run.rounds

    def on_replies(self, info: RoundInfo, replies: list[Message]) -> tuple[list[Message], dict[str, Any]]:
        self.round_clients = [int(r.content[METRICS][TrainReport.key("client_id")]) for r in replies]
        # FedDF's teachers; replies reach this plugin already decoded to float32 (see build_plugins' order)
        self.client_arrays = ([from_record(r.content[ARRAYS]) for r in replies]
                              if self.cfg.feddf and self._due(info.number) else [])
        return replies, {}

    def _student(self) -> SentimentRNN:
        c = self.cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.ctx.cfg.run.seed)
            student = make_student(self.ctx.base.cfg, c.embed_dim, c.hidden_size, c.num_layers, c.cell)
        if self.student_state:
            student.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in self.student_state.items()})
        return student

    def after_aggregate(self, info: RoundInfo, grid: Grid, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        rnd = info.number
        if not self._due(rnd):
            return {}
        c, ctx = self.cfg, self.ctx
        teachers = [ctx.global_model(a) for a in self.client_arrays] or [ctx.global_model(arrays)]
        rng = np.random.default_rng([ctx.cfg.run.seed, rnd, 31])
        subset = self.transfer.subset(np.sort(rng.choice(len(self.transfer), c.transfer_examples, replace=False)))
        student = self._student()
        stats = distill(teachers, student, subset, c.steps, c.batch_size, c.temperature, c.lr, rng)
        self.student_state = {k: v.detach().numpy().copy() for k, v in student.state_dict().items()}
        payload = encode(self.student_state)
        shipped = SentimentRNN(student.cfg)
        shipped.load_state_dict({k: torch.from_numpy(v) for k, v in decode(payload).items()})
        metrics: dict[str, Any] = {f"student_{k}": v for k, v in ctx.evaluator(student).items()}
        metrics |= {
            "student_int8_target_accuracy": evaluate(shipped, ctx.evaluator.test)["accuracy"],
            "student_params": num_parameters(student),
            "student_int8_bytes": record_nbytes(to_record(payload)),
            "student_fp32_bytes": record_nbytes(to_record(self.student_state)),
            "student_teachers": len(teachers),
            "student_distill_loss_start": stats.loss_start, "student_distill_loss_end": stats.loss_end,
            "student_distill_agreement": stats.agreement, "student_distill_seconds": stats.seconds,
        }
        save_checkpoint(self.student_dir, student, self.tokenizer, self.max_len,
                        metrics={"round": rnd, "teacher": ctx.files.teacher_dir, "distill": stats.to_dict(),
                                 **metrics})
        if c.ship:
            metrics |= self._ship(rnd, grid, payload, student.cfg)
        return metrics

    def _ship(self, rnd: int, grid: Grid, payload: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
        """Send the int8 student to the round's clients; their accuracy on their own held-out data."""
        flag = Student(student=True, student_model=json.dumps(cfg.to_dict())).to_record()
        clients = self.round_clients
        replies = self.ctx.send(grid, rnd, payload, clients, MessageType.EVALUATE, {k: flag for k in clients},
                                encoded=True)
        acc_key = EvalReport.key("eval_accuracy")
        accs = [float(r.content[METRICS][acc_key]) for r in replies if acc_key in r.content[METRICS]]
        shipped = record_nbytes(to_record(payload)) * len(clients)
        return {"student_bytes_shipped": shipped, "bytes_down_extra": shipped,  # on top of the training broadcast
                "student_device_clients": len(accs),
                "student_device_accuracy_mean": float(np.mean(accs)) if accs else None,
                "student_device_accuracy_p10": percentile(accs, 10) if accs else None}

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {}, dict(self.student_state)

    def load_state(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.student_state = {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}
