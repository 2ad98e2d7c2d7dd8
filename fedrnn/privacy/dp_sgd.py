"""Record-level differential privacy for a client's local training: DP-SGD with RDP accounting.

What this protects. The unit of privacy is **one review** (one record) in a device's local
data set. Whatever the server, other clients or anyone reading the released model updates
learns, they learn (almost) the same whether or not any single review was in the client's
data: the client's sequence of updates over all rounds it trains is (epsilon, delta)-DP with
respect to adding or removing one of its reviews. It says nothing about the device as a
whole: a device's overall writing style, its label balance, its size, or the fact that it
took part are not hidden. That is *client-level* DP (neighbouring data sets differ by an
entire device), obtained on the server side by clipping whole client updates and adding
noise to their aggregate (Flower's ``DifferentialPrivacyServerSideFixedClipping`` /
``...ClientSideFixedClipping`` wrappers); the two compose and answer different questions.

The guarantee covers the model updates only. Training loss/accuracy, the number of examples
and any other metric computed on the private data and sent alongside are *not* privatised.
All randomness (the Poisson batches, and the seed of ``torch``'s generator that draws the
noise) comes from the caller's ``rng``, which must be secret from whoever sees the updates:
``fedrnn.plugins.record_dp.round_generator`` gives a device the OS CSPRNG and a simulated
client its fleet's secret key, never the seeds in a message. The noise itself is drawn by
``torch``'s Mersenne Twister (as in Opacus without ``secure_mode``); the guarantee is the usual
one stated under an ideal Gaussian sampler.

Mechanism. Each step draws a **Poisson** sample of the client's data (every review
independently with probability ``q = batch_size / n``; the batch size varies and may be
zero), computes every sampled review's gradient over the trainable parameters, clips it to
L2 norm ``max_grad_norm`` (C), sums, adds ``N(0, (sigma C)^2)`` to each coordinate and
divides by the *expected* batch size ``q n``. This is exactly the sampled Gaussian
mechanism that Opacus's RDP accountant (``opacus.accountants.RDPAccountant``) analyses, so
the history ``[(sigma, q, steps), ...]`` fed to it gives a valid epsilon (for adding or
removing one review; ``n``, hence ``q``, is treated as public, as Opacus does). The
optimizer (SGD or Adam) only post-processes the privatised gradient.

Accounting across rounds. A Flower ClientApp is a fresh process each round, so the
accountant's whole state is the small ``PrivacyState`` (noise multiplier, clip norm, delta,
optional epsilon budget and the RDP history), which the caller keeps between rounds in
Flower's ``Context.state`` (``to_dict``/``from_dict``: plain numbers and lists, valid for a
``ConfigRecord``) or in a file (``to_json``/``from_json``). Before a round trains, the
epsilon it would reach is computed; if that exceeds the budget the client does not train.

Engines (all exact, all feeding the same batches to the same accountant):
``"microbatch"`` runs each sampled review alone through the plain model, the fastest on
the clients' single CPU thread whenever a recurrent layer trains; ``"fused"`` gets a whole
batch's per-sample gradients in one pass (``fedrnn.privacy.per_sample``), the fastest when only
the head trains and for hardware where batching pays; ``"auto"`` (default) picks between
them by transfer mode. ``"opacus"`` runs Opacus's own ``GradSampleModule`` and
``DPOptimizer`` on the ``DPLSTM`` twin (``to_dp_model``) with any of its grad-sample
modes: 5-50x slower than non-private training, kept as the reference the others are
tested against. Ratios are measured by ``benchmarks/bench_dp.py``.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedrnn.data.tokenizer import Encoded
from fedrnn.model.rnn import TRANSFER_MODES, SentimentRNN, set_trainable
from fedrnn.model.training import to_tensors
from fedrnn.privacy.accounting import PrivacyState, epsilon, merge_history, planned_steps, rdp_epsilon, sample_rate
from fedrnn.privacy.batching import length_chunks, poisson_batches
from fedrnn.privacy.dp_model import from_dp_state, to_dp_model
from fedrnn.privacy.per_sample import clipped_grad_sum, microbatch_clipped_sum, per_sample_taps

ENGINES = ("auto", "microbatch", "fused", "opacus")
OPACUS_MODES = ("hooks", "functorch", "ew", "ghost")
OPTIMIZERS = ("sgd", "adam")
TRAINED, BUDGET_EXHAUSTED = "trained", "budget-exhausted"
FUSED_CHUNK = 4


@dataclass
class DPStats:
    """Outcome of one round. Loss/accuracy/examples are computed on private data and are *not* DP."""

    status: str
    steps: int
    examples: int
    loss: float
    accuracy: float
    seconds: float
    epsilon: float
    noise_multiplier: float
    sample_rate: float


@dataclass
class _Round:
    """What both engines need to privatise and apply one round's updates."""

    noise_multiplier: float  # sigma: the noise on the clipped sum has std sigma * C
    max_grad_norm: float
    expected_batch: float  # q * n, the DP-SGD normaliser
    gen: torch.Generator
    proximal_mu: float
    anchors: dict[str, torch.Tensor]  # the round's starting weights, for the proximal term

    def noisy_mean(self, named: list[tuple[str, nn.Parameter]]) -> None:
        """Turn each ``.grad`` (a clipped sum, absent for an empty batch) into the privatised mean."""
        for _, p in named:
            total = p.grad if p.grad is not None else torch.zeros_like(p)
            if self.noise_multiplier > 0:
                std = self.noise_multiplier * self.max_grad_norm
                total = total + torch.normal(0.0, std, size=p.shape, generator=self.gen)
            p.grad = total / self.expected_batch
        self.add_proximal(named)

    def add_proximal(self, named: list[tuple[str, nn.Parameter]]) -> None:
        """FedProx's ``mu (w - w_start)``: it reads no private data, so adding it after the noise is free."""
        if self.proximal_mu > 0:
            for name, p in named:
                p.grad += self.proximal_mu * (p.detach() - self.anchors[name])


def _make_optimizer(name: str, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    return torch.optim.Adam(params, lr=lr)


def train_dp(
    model: SentimentRNN,
    data: Encoded,
    state: PrivacyState,
    *,
    mode: str,
    batch_size: int,
    lr: float,
    rng: np.random.Generator,
    steps: int | None = None,
    epochs: float | None = None,
    optimizer: str = "adam",
    proximal_mu: float = 0.0,
    engine: str = "auto",
    grad_sample_mode: str = "hooks",
    chunk_size: int | None = FUSED_CHUNK,
) -> tuple[PrivacyState, DPStats]:
    """One round of DP-SGD on ``model`` (updated in place) under transfer ``mode``.

    Trains ``steps`` Poisson-sampled steps (or ``epochs`` expected passes) unless that
    would take the epsilon spent past ``state.target_epsilon``: then nothing is trained and
    the status is ``"budget-exhausted"``. Returns the new state (the caller stores it for the
    next round) and the round's statistics. ``proximal_mu`` > 0 adds FedProx's pull towards
    the round's starting weights. ``grad_sample_mode`` applies to the opacus engine,
    ``chunk_size`` to the fused one (see ``length_chunks``; the microbatch engine takes
    examples one at a time whatever the grouping).
    """
    if mode not in TRANSFER_MODES:
        raise ValueError(f"transfer mode must be one of {TRANSFER_MODES}, got {mode!r}")
    if engine not in ENGINES:
        raise ValueError(f"DP engine must be one of {ENGINES}, got {engine!r}")
    if engine == "opacus" and grad_sample_mode not in OPACUS_MODES:
        raise ValueError(f"grad_sample_mode must be one of {OPACUS_MODES}, got {grad_sample_mode!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not proximal_mu >= 0:
        raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    n = len(data)
    q = sample_rate(n, batch_size)
    k = planned_steps(n, batch_size, steps, epochs)
    history = merge_history([*state.history, (state.noise_multiplier, q, k)])
    fixed = {"noise_multiplier": state.noise_multiplier, "sample_rate": q}
    if state.target_epsilon is not None and rdp_epsilon(history, state.delta) > state.target_epsilon:
        return state, DPStats(BUDGET_EXHAUSTED, 0, 0, math.nan, math.nan, 0.0, epsilon(state), **fixed)

    if engine == "auto":
        engine = "fused" if mode == "feature-extraction" else "microbatch"
    t0 = time.perf_counter()
    set_trainable(model, mode)
    model.train()
    batches = poisson_batches(n, q, k, rng)
    anchors = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad and proximal_mu}
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    rnd = _Round(state.noise_multiplier, state.max_grad_norm, q * n, gen, proximal_mu, anchors)
    if engine == "opacus":
        loss, correct, seen = _run_opacus(model, data, batches, rnd, optimizer, lr, grad_sample_mode)
    else:
        loss, correct, seen = _run_per_sample(model, data, batches, rnd, optimizer, lr, engine == "fused", chunk_size)
    new_state = replace(state, history=history)
    seconds = time.perf_counter() - t0
    return new_state, DPStats(
        TRAINED, k, seen, loss / max(seen, 1), correct / max(seen, 1), seconds, epsilon(new_state), **fixed
    )


def _run_per_sample(
    model: SentimentRNN, data: Encoded, batches: list[np.ndarray], rnd: _Round, optimizer: str, lr: float,
    fused: bool, chunk_size: int | None,
) -> tuple[float, int, int]:
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    opt = _make_optimizer(optimizer, [p for _, p in named], lr)
    total_loss, correct, seen = 0.0, 0, 0
    with per_sample_taps(model) if fused else nullcontext() as taps:
        for index in batches:
            opt.zero_grad(set_to_none=True)
            for chunk in length_chunks(index, data.lengths, chunk_size):
                ids, lengths, labels = to_tensors(data, chunk)
                if fused:
                    losses, logits, _ = clipped_grad_sum(model, taps, ids, lengths, labels, rnd.max_grad_norm)
                else:
                    losses, logits, _ = microbatch_clipped_sum(model, ids, lengths, labels, rnd.max_grad_norm)
                total_loss += float(losses.sum())
                correct += int((logits.argmax(1) == labels).sum())
                seen += len(chunk)
            rnd.noisy_mean(named)
            opt.step()
    return total_loss, correct, seen


def _run_opacus(
    model: SentimentRNN, data: Encoded, batches: list[np.ndarray], rnd: _Round, optimizer: str, lr: float, mode: str
) -> tuple[float, int, int]:
    """The reference engine: Opacus's GradSampleModule + DPOptimizer on the DPLSTM twin, unchunked."""
    from opacus.grad_sample.utils import prepare_module
    from opacus.optimizers import get_optimizer_class
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    dp = to_dp_model(model)
    # noise is drawn parameter by parameter: follow the plain model's order (DPLSTM lists its tensors differently)
    dp_params = dict(dp.named_parameters())
    named = [(name, dp_params[name]) for name, p in model.named_parameters() if p.requires_grad]
    base = _make_optimizer(optimizer, [p for _, p in named], lr)
    extra = {"max_grad_norm": rnd.max_grad_norm} if mode == "ghost" else {}
    gsm = prepare_module(dp, grad_sample_mode=mode, batch_first=True, loss_reduction="mean", **extra)
    opt = get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode=mode)(
        base, noise_multiplier=rnd.noise_multiplier, max_grad_norm=rnd.max_grad_norm,
        expected_batch_size=rnd.expected_batch, loss_reduction="mean", generator=rnd.gen,
    )
    if rnd.proximal_mu:  # runs after Opacus's clip/noise/scale, before the inner optimizer step
        opt.attach_step_hook(lambda _: rnd.add_proximal(named))
    criterion: Any = nn.CrossEntropyLoss()
    if mode == "ghost":
        criterion = DPLossFastGradientClipping(gsm, opt, criterion, "mean")
    total_loss, correct, seen = 0.0, 0, 0
    for index in batches:
        opt.zero_grad(set_to_none=True)
        if not len(index):  # Opacus would skip the step (and its noise) on an empty batch: apply pure noise
            rnd.noisy_mean(named)
            base.step()
            continue
        ids, lengths, labels = to_tensors(data, index)
        logits = gsm(ids, lengths)
        criterion(logits, labels).backward()
        opt.step()
        total_loss += float(F.cross_entropy(logits.detach(), labels, reduction="sum"))
        correct += int((logits.argmax(1) == labels).sum())
        seen += len(index)
    model.load_state_dict(from_dp_state(dp))
    return total_loss, correct, seen
