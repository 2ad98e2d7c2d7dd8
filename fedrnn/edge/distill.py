"""Server-side knowledge distillation of a compact student from a teacher or an ensemble.

The server holds an unlabelled transfer set (by default the 50,000 unlabelled IMDB reviews)
and trains a small ``SentimentRNN`` to match the teacher's softened output distribution
(Hinton et al., 2015). With several teachers the target is the average of their logits,
as in FedDF (Lin et al., 2020), so client models can be fused into one compact student
without any labelled data on the server.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedrnn.data.tokenizer import Encoded
from fedrnn.model.rnn import ModelConfig, SentimentRNN
from fedrnn.model.training import length_bucketed_batches, predict_logits, to_tensors

# Where a run directory keeps its student checkpoint. Defined here, not in fedrnn.edge.export, so the
# ClientApp (through fedrnn.plugins.distill) never imports the ONNX tooling a device does not install.
STUDENT_SUBDIR = "student"


def make_student(
    teacher_cfg: ModelConfig, embed_dim: int = 32, hidden_size: int = 64, num_layers: int = 1, cell: str = "lstm"
) -> SentimentRNN:
    """A smaller model over the teacher's vocabulary, so both read the same tokenizer's ids."""
    cfg = ModelConfig(
        **{**teacher_cfg.to_dict(), "embed_dim": embed_dim, "hidden_size": hidden_size, "num_layers": num_layers,
           "cell": cell}
    )
    return SentimentRNN(cfg)


@torch.no_grad()
def init_embedding_from(student: SentimentRNN, teacher_embedding: torch.Tensor, old_ids: np.ndarray) -> None:
    """Start the student's embedding from the teacher's: the kept tokens' rows projected onto their top
    ``embed_dim`` principal directions (PCA), so a short distillation starts from word meanings the
    teacher learnt rather than from noise."""
    rows = teacher_embedding[torch.as_tensor(np.asarray(old_ids), dtype=torch.long)]
    dim = student.cfg.embed_dim
    if dim >= rows.shape[1]:
        student.embedding.weight[:, : rows.shape[1]] = rows
        return
    _, _, v = torch.linalg.svd(rows - rows.mean(0), full_matrices=False)
    student.embedding.weight.copy_(rows @ v[:dim].T)
    student.embedding.weight[0].zero_()  # padding stays the zero vector


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(teacher_T || student_T)``, the standard Hinton direction (soft-target cross-entropy).

    The ``T^2`` keeps gradient magnitudes comparable across temperatures.
    """
    t = temperature
    return F.kl_div(
        F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean", log_target=True,
    ) * (t * t)


@torch.no_grad()
def ensemble_logits(teachers: Sequence[nn.Module], ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean logits of the teachers on one batch (FedDF's ensemble target)."""
    return torch.stack([t(ids, lengths) for t in teachers]).mean(0)


def dataset_logits(teachers: Sequence[nn.Module], data: Encoded, batch_size: int = 256) -> torch.Tensor:
    """Mean teacher logits for a whole data set, e.g. to cache targets of a fixed transfer subset."""
    return torch.stack([predict_logits(t, data, batch_size) for t in teachers]).mean(0)


def agreement(student: nn.Module, teachers: nn.Module | Sequence[nn.Module], data: Encoded) -> float:
    """Fraction of reviews where the student's predicted class equals the (ensemble) teacher's."""
    teachers = _as_list(teachers)
    with _eval_mode([*teachers, student]):
        target = dataset_logits(teachers, data).argmax(1)
        return float((predict_logits(student, data).argmax(1) == target).float().mean())


@dataclass
class DistillStats:
    steps: int
    examples: int
    seconds: float
    loss: float  # mean distillation objective over all steps
    loss_start: float  # mean over the first 10% of steps
    loss_end: float  # mean over the last 10% of steps
    agreement: float  # student/teacher argmax agreement on the training batches

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def distill(
    teacher: nn.Module | Sequence[nn.Module],
    student: SentimentRNN,
    transfer: Encoded,
    steps: int,
    batch_size: int = 64,
    temperature: float = 2.0,
    lr: float = 3e-3,
    rng: np.random.Generator | None = None,
    hard_label_weight: float = 0.0,
    teacher_logits: torch.Tensor | None = None,
    clip_norm: float | None = 1.0,
    cosine: bool = False,
) -> DistillStats:
    """Train ``student`` for ``steps`` batches to mimic the teacher(s) on ``transfer``.

    Labels in ``transfer`` are ignored unless ``hard_label_weight`` > 0, in which case rows
    with a label >= 0 add ``w * CE`` to ``(1 - w) * KD`` (unlabelled rows carry label -1).
    Teacher logits are computed per batch under ``no_grad``; pass ``teacher_logits`` (one
    row per transfer review, e.g. from ``dataset_logits``) to reuse cached targets instead;
    then the student may read another tokenizer's ids than the teacher (a pruned vocabulary),
    as long as row ``i`` of ``transfer`` is the same review the targets were computed on.
    ``cosine`` decays the learning rate to zero over the ``steps`` (cosine annealing): a long
    distillation at a constant rate ends noisy, one that decays ends in the minimum it found.
    Batches are drawn with ``rng``, so each call sees a fresh random subsample of a large
    transfer set; the student's dropout is seeded from ``rng`` too, without touching the
    global torch RNG, so a call is reproducible from its ``rng``.
    """
    teachers = _as_list(teacher)
    _check_args(teachers, student, transfer, steps, batch_size, temperature, lr, hard_label_weight, teacher_logits)
    rng = rng if rng is not None else np.random.default_rng()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps) if cosine else None
    losses: list[float] = []
    seen = agree = 0
    t0 = time.perf_counter()
    with _eval_mode(teachers), torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(rng.integers(2**62)))
        student.train()
        while len(losses) < steps:
            for index in length_bucketed_batches(transfer.lengths, batch_size, rng):
                if len(losses) >= steps:
                    break
                ids, lengths, labels = to_tensors(transfer, index)
                target = (
                    ensemble_logits(teachers, ids, lengths) if teacher_logits is None
                    else teacher_logits[torch.from_numpy(index)]
                )
                logits = student(ids, lengths)
                loss = kd_loss(logits, target, temperature)
                labelled = labels >= 0
                if hard_label_weight > 0 and bool(labelled.any()):
                    ce = F.cross_entropy(logits[labelled], labels[labelled])
                    loss = (1 - hard_label_weight) * loss + hard_label_weight * ce
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if clip_norm:
                    nn.utils.clip_grad_norm_(params, clip_norm)
                optimizer.step()
                if schedule is not None:
                    schedule.step()
                losses.append(float(loss.detach()))
                seen += len(index)
                agree += int((logits.detach().argmax(1) == target.argmax(1)).sum())
    student.eval()
    tenth = max(1, steps // 10)
    return DistillStats(
        steps=steps, examples=seen, seconds=time.perf_counter() - t0, loss=float(np.mean(losses)),
        loss_start=float(np.mean(losses[:tenth])), loss_end=float(np.mean(losses[-tenth:])), agreement=agree / seen,
    )


@contextmanager
def _eval_mode(models: Sequence[nn.Module]) -> Iterator[None]:
    """Put models in eval mode (no dropout) and restore each one's mode afterwards."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)


def _as_list(teacher: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    teachers = [teacher] if isinstance(teacher, nn.Module) else list(teacher)
    if not teachers:
        raise ValueError("distillation needs at least one teacher")
    return teachers


def _check_args(
    teachers: list[nn.Module], student: SentimentRNN, transfer: Encoded, steps: int, batch_size: int,
    temperature: float, lr: float, hard_label_weight: float, teacher_logits: torch.Tensor | None,
) -> None:
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    if not temperature > 0 or not lr > 0:
        raise ValueError(f"temperature and lr must be > 0, got {temperature} and {lr}")
    if not 0 <= hard_label_weight <= 1:
        raise ValueError(f"hard_label_weight must be in [0, 1], got {hard_label_weight}")
    if len(transfer) == 0:
        raise ValueError("the transfer set is empty")
    for i, t in enumerate(teachers if teacher_logits is None else []):  # cached targets: any tokenizer will do
        cfg = getattr(t, "cfg", None)
        if cfg is not None and (cfg.vocab_size, cfg.num_classes) != (student.cfg.vocab_size, student.cfg.num_classes):
            raise ValueError(
                f"teacher {i} has vocab_size/num_classes {cfg.vocab_size}/{cfg.num_classes}, the student "
                f"{student.cfg.vocab_size}/{student.cfg.num_classes}; they must share tokenizer and classes"
            )
    top = int(transfer.ids.max())
    if top >= student.cfg.vocab_size:
        raise ValueError(f"transfer ids reach {top}, beyond the student vocab {student.cfg.vocab_size}")
    want = (len(transfer), student.cfg.num_classes)
    if teacher_logits is not None and tuple(teacher_logits.shape) != want:
        raise ValueError(f"teacher_logits has shape {tuple(teacher_logits.shape)}, expected {want}")
