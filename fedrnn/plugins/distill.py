"""Round plugin: distil a compact student from the federated model, ship it to devices as int8.

Every ``distill.every_k_rounds`` rounds (and after the last) the server trains a small
``SentimentRNN`` (``fedrnn.edge.distill``) to mimic the freshly aggregated global model — or, with
``distill.feddf``, the ensemble of the round's client models (FedDF) — on a fresh random
subsample of the unlabelled IMDB reviews it holds. The first student's embedding starts from the
teacher's (PCA-projected to its width, as the student search does); later ones are warm-started
from the previous distillation (kept in the plugin state, so ``--resume`` continues it). Its
vocabulary is the teacher's, so both read the same tokenizer's ids (or a cut of it, below).

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
from dataclasses import dataclass
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
from fedrnn.edge.distill import STUDENT_SUBDIR, dataset_logits, distill, init_embedding_from, make_student
from fedrnn.edge.prune import ReadsTeacherIds, id_map, prune_vocab, shrink_tokenizer, token_counts
from fedrnn.edge.quantize import QuantizationError, decode, encode, is_encoded
from fedrnn.federation.local import local_evaluate
from fedrnn.federation.messages import ARRAYS, CONFIG, METRICS, VOCAB_IDS, EvalReport, Student, TrainReport
from fedrnn.federation.plugin import RoundInfo, RoundPlugin, RunContext, percentile
from fedrnn.federation.prepare import cache_dir
from fedrnn.federation.wire import from_record, record_nbytes, to_record
from fedrnn.model.checkpoint import load_checkpoint, save_checkpoint
from fedrnn.model.rnn import ModelConfig, SentimentRNN, num_parameters
from fedrnn.model.training import evaluate
from fedrnn.plugins.devices import build_fleet

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


# ---------------------------------------------------------------------------------------- students


@dataclass(frozen=True)
class StudentSpec:
    """One student's shape: a cell, sizes, a vocabulary (0 = the teacher's) and whether it travels as int8."""

    cell: str
    embed_dim: int
    hidden_size: int
    num_layers: int
    vocab_size: int = 0
    int8: bool = True


def student_specs(cfg: DistillSection, classes: list[str]) -> dict[str, StudentSpec]:
    """The students to distil: one named ``all``, or with ``per_class`` one per device class.

    A class's shape is the search's choice for it (``class_students``: the ``summary.json`` that
    ``python -m fedrnn.edge.search`` writes; hidden units after its pruning, its vocabulary size,
    int8 or not); a class the search did not cover, or found nothing for, gets the section's own.
    """
    own = StudentSpec(cfg.cell, cfg.embed_dim, cfg.hidden_size, cfg.num_layers)
    if not cfg.per_class:
        return {"all": own}
    chosen: dict[str, dict[str, Any]] = {}
    if cfg.class_students:
        path = Path(cfg.class_students)
        try:
            summary = json.loads(path.read_text())
            chosen = {e["device_class"]: e["chosen"] for e in summary["classes"] if e.get("chosen")}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"distill.class_students: cannot read a student search summary from {path}: {e}") from e
    specs = {}
    for cls in classes:
        c = chosen.get(cls)
        specs[cls] = own if c is None else StudentSpec(
            str(c["cell"]), int(c["embed_dim"]), int(c["final_hidden"]), int(c["num_layers"]),
            int(c["vocab_size"]), bool(c["int8"]))
    return specs


# ---------------------------------------------------------------------------------------- client side


def is_student_message(msg: Message) -> bool:
    return Student.present(msg.content[CONFIG]) and Student.parse(msg.content[CONFIG]).student


def evaluate_student(content: RecordDict, held: Encoded) -> dict[str, float]:
    """On-device accuracy of a shipped student; a malformed payload raises ``QuantizationError``."""
    spec = Student.parse(content[CONFIG])
    model = SentimentRNN(ModelConfig.from_dict(json.loads(spec.student_model)))
    arrays = from_record(content[ARRAYS])
    old_ids = arrays.pop(VOCAB_IDS, None)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    weights = decode(arrays, expected) if is_encoded(arrays) else _checked_float(arrays, expected)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    if spec.teacher_vocab:
        if old_ids is None or len(old_ids) != model.cfg.vocab_size:
            raise QuantizationError(f"{VOCAB_IDS}: a pruned-vocabulary student needs its "
                                    f"{model.cfg.vocab_size} kept teacher ids")
        return local_evaluate(ReadsTeacherIds(model, old_ids, spec.teacher_vocab), held)
    return local_evaluate(model, held)


def _checked_float(arrays: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """A float32 student's tensors, checked against the shapes its config implies."""
    got = {k: tuple(v.shape) for k, v in arrays.items()}
    if got != expected or any(v.dtype != np.float32 or not np.isfinite(v).all() for v in arrays.values()):
        raise QuantizationError("float32 student payload: tensors differ from the config's or are not finite")
    return arrays


# ---------------------------------------------------------------------------------------- server side


class StudentDistillation(RoundPlugin):
    name = "distill"

    def __init__(self, cfg: DistillSection) -> None:
        self.cfg = cfg
        self.student_state: dict[str, dict[str, np.ndarray]] = {}  # per student, the warm start of the next
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
        self.client_class = build_fleet(ctx.cfg).device_class if self.cfg.per_class else None
        self.specs = student_specs(self.cfg, sorted(set(self.client_class or [])))
        teacher_vocab = ctx.base.cfg.vocab_size
        counts = token_counts([self.transfer], teacher_vocab)
        # a cut vocabulary: the shrunk tokenizer (saved with the student) and the teacher ids it keeps
        self.vocab: dict[str, tuple[Tokenizer, np.ndarray]] = {
            name: shrink_tokenizer(self.tokenizer, counts, s.vocab_size)
            for name, s in self.specs.items() if 0 < s.vocab_size < teacher_vocab}
        self.id_maps = {name: id_map(old_ids, teacher_vocab) for name, (_, old_ids) in self.vocab.items()}

    def _due(self, rnd: int) -> bool:
        return rnd % self.cfg.every_k_rounds == 0 or rnd == self.ctx.cfg.run.rounds

    def on_replies(self, info: RoundInfo, replies: list[Message]) -> tuple[list[Message], dict[str, Any]]:
        self.round_clients = [int(r.content[METRICS][TrainReport.key("client_id")]) for r in replies]
        # FedDF's teachers; replies reach this plugin already decoded to float32 (see build_plugins' order)
        self.client_arrays = ([from_record(r.content[ARRAYS]) for r in replies]
                              if self.cfg.feddf and self._due(info.number) else [])
        return replies, {}

    def _student(self, name: str) -> SentimentRNN:
        s = self.specs[name]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.ctx.cfg.run.seed)
            student = make_student(self.ctx.base.cfg, s.embed_dim, s.hidden_size, s.num_layers, s.cell)
        if name in self.vocab:
            student = prune_vocab(student, self.vocab[name][1])
        if name in self.student_state:
            student.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in self.student_state[name].items()})
        else:  # the first distillation starts from the teacher's word embeddings, as the search's students do
            kept = self.vocab[name][1] if name in self.vocab else np.arange(self.ctx.base.cfg.vocab_size)
            init_embedding_from(student, self.ctx.base.state["embedding.weight"], kept)
        return student

    def _reads_teacher_ids(self, name: str, student: SentimentRNN) -> torch.nn.Module:
        if name not in self.vocab:
            return student
        return ReadsTeacherIds(student, self.vocab[name][1], self.ctx.base.cfg.vocab_size)

    def after_aggregate(self, info: RoundInfo, grid: Grid, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        rnd = info.number
        if not self._due(rnd):
            return {}
        c, ctx = self.cfg, self.ctx
        teachers = [ctx.global_model(a) for a in self.client_arrays] or [ctx.global_model(arrays)]
        rng = np.random.default_rng([ctx.cfg.run.seed, rnd, 31])
        subset = self.transfer.subset(np.sort(rng.choice(len(self.transfer), c.transfer_examples, replace=False)))
        targets = dataset_logits(teachers, subset)  # one teacher pass, shared by every student
        metrics: dict[str, Any] = {"student_teachers": len(teachers)}
        payloads: dict[str, tuple[dict[str, np.ndarray], ModelConfig]] = {}
        for name, spec in self.specs.items():
            sfx = "" if name == "all" else f"/{name}"
            student = self._student(name)
            data = subset if name not in self.vocab else Encoded(
                self.id_maps[name][subset.ids], subset.lengths, subset.labels)
            stats = distill(teachers, student, data, c.steps, c.batch_size, c.temperature, c.lr,
                            rng, teacher_logits=targets)
            self.student_state[name] = {k: v.detach().numpy().copy() for k, v in student.state_dict().items()}
            payload = encode(self.student_state[name]) if spec.int8 else dict(self.student_state[name])
            shipped = SentimentRNN(student.cfg)
            shipped.load_state_dict({k: torch.from_numpy(v) for k, v in decode(payload).items()}
                                    if spec.int8 else student.state_dict())
            m = {f"student_{k}": v for k, v in ctx.evaluator(self._reads_teacher_ids(name, student)).items()}
            m |= {"student_int8_target_accuracy" if spec.int8 else "student_shipped_target_accuracy":
                  evaluate(self._reads_teacher_ids(name, shipped), ctx.evaluator.test)["accuracy"],
                  "student_params": num_parameters(student),
                  "student_int8_bytes" if spec.int8 else "student_shipped_bytes": record_nbytes(to_record(payload)),
                  "student_fp32_bytes": record_nbytes(to_record(self.student_state[name])),
                  "student_distill_loss_start": stats.loss_start, "student_distill_loss_end": stats.loss_end,
                  "student_distill_agreement": stats.agreement, "student_distill_seconds": stats.seconds}
            metrics |= {k + sfx: v for k, v in m.items()}
            tok = self.vocab[name][0] if name in self.vocab else self.tokenizer
            save_checkpoint(self.student_dir if name == "all" else self.student_dir / name, student, tok,
                            self.max_len, metrics={"round": rnd, "teacher": ctx.files.teacher_dir,
                                                   "distill": stats.to_dict(), **m})
            if name in self.vocab:  # the kept ids travel with the student: devices hold the teacher's ids
                old = self.vocab[name][1]
                payload[VOCAB_IDS] = old.astype(np.uint16 if old.max() < 2**16 else np.int32)
            payloads[name] = payload, student.cfg
        if c.ship:
            metrics |= self._ship(rnd, grid, payloads)
        return metrics

    def _ship(self, rnd: int, grid: Grid, payloads: dict[str, tuple[dict[str, np.ndarray], ModelConfig]]
              ) -> dict[str, Any]:
        """Send each round client its (class's) student; their accuracy on their own held-out data.

        Bytes are counted from the records that travel, per class and in all (``bytes_down_extra``:
        on top of the training broadcast).
        """
        acc_key = EvalReport.key("eval_accuracy")
        out: dict[str, Any] = {}
        every: list[float] = []
        total = 0
        for name, (payload, student_cfg) in payloads.items():
            clients = [k for k in self.round_clients if self.client_class is None or self.client_class[k] == name]
            if not clients:
                continue
            flag = Student(student=True, student_model=json.dumps(student_cfg.to_dict()),
                           teacher_vocab=self.ctx.base.cfg.vocab_size if name in self.vocab else 0).to_record()
            replies = self.ctx.send(grid, rnd, payload, clients, MessageType.EVALUATE, {k: flag for k in clients},
                                    encoded=True)  # travels as built here
            accs = [float(r.content[METRICS][acc_key]) for r in replies if acc_key in r.content[METRICS]]
            shipped = record_nbytes(to_record(payload)) * len(clients)
            every += accs
            total += shipped
            if name != "all":
                out |= {f"student_bytes_shipped/{name}": shipped, f"student_device_clients/{name}": len(accs),
                        f"student_device_accuracy/{name}": float(np.mean(accs)) if accs else None}
        return out | {"student_bytes_shipped": total, "bytes_down_extra": total,
                      "student_device_clients": len(every),
                      "student_device_accuracy_mean": float(np.mean(every)) if every else None,
                      "student_device_accuracy_p10": percentile(every, 10) if every else None}

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        if list(self.student_state) == ["all"]:  # the single student keeps its tensors' own names
            return {}, dict(self.student_state["all"])
        return {}, {f"{name}/{k}": v for name, state in self.student_state.items() for k, v in state.items()}

    def load_state(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        if not arrays:
            return
        if not self.cfg.per_class:
            self.student_state = {"all": {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}}
            return
        for key, v in arrays.items():
            name, _, k = key.partition("/")
            self.student_state.setdefault(name, {})[k] = np.asarray(v, dtype=np.float32)
