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
Noise comes from ``torch``'s (non-cryptographic) generator, as in Opacus without
``secure_mode``; the guarantee is the usual one stated under an ideal Gaussian sampler.

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

import functools
import json
import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedrnn.data.tokenizer import Encoded
from fedrnn.model.rnn import TRANSFER_MODES, SentimentRNN, set_trainable
from fedrnn.model.training import to_tensors
from fedrnn.privacy.per_sample import clipped_grad_sum, microbatch_clipped_sum, per_sample_taps

ENGINES = ("auto", "microbatch", "fused", "opacus")
OPACUS_MODES = ("hooks", "functorch", "ew", "ghost")
OPTIMIZERS = ("sgd", "adam")
TRAINED, BUDGET_EXHAUSTED = "trained", "budget-exhausted"
FUSED_CHUNK = 4

Entry = tuple[float, float, int]  # (noise multiplier, sample rate, steps), as RDPAccountant.history


@dataclass
class PrivacyState:
    """Everything the accountant needs to continue across rounds and processes.

    ``history`` holds one ``(noise_multiplier, sample_rate, steps)`` entry per run of equal
    parameters (consecutive equal rounds are merged, so it stays small).
    ``target_epsilon`` is the budget at ``delta``; ``None`` means account but never stop.
    """

    noise_multiplier: float
    max_grad_norm: float
    delta: float
    target_epsilon: float | None = None
    history: list[Entry] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"privacy noise_multiplier must be a finite number >= 0, got {self.noise_multiplier!r}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"privacy max_grad_norm must be > 0, got {self.max_grad_norm!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"privacy delta must be in (0, 1), got {self.delta!r}")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ValueError(f"privacy target_epsilon must be > 0, got {self.target_epsilon!r}")
        for i, entry in enumerate(self.history):
            sigma, q, steps = entry
            if not (sigma >= 0 and 0 < q <= 1 and isinstance(steps, int) and steps >= 1):
                raise ValueError(f"privacy history[{i}] = {entry!r} is not (noise >= 0, rate in (0, 1], steps >= 1)")
        self.history = [(float(s), float(q), int(k)) for s, q, k in self.history]

    def to_dict(self) -> dict[str, float | list[float] | list[int]]:
        """Plain numbers and lists, storable as a Flower ``ConfigRecord``."""
        d: dict[str, float | list[float] | list[int]] = {
            "noise-multiplier": self.noise_multiplier,
            "max-grad-norm": self.max_grad_norm,
            "delta": self.delta,
            "history-noise": [e[0] for e in self.history],
            "history-rate": [e[1] for e in self.history],
            "history-steps": [e[2] for e in self.history],
        }
        if self.target_epsilon is not None:
            d["target-epsilon"] = self.target_epsilon
        return d

    @classmethod
    def from_dict(cls, d: Any) -> PrivacyState:
        """Inverse of ``to_dict``; accepts any mapping (a ``ConfigRecord`` too)."""
        try:
            d = dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"privacy state must be a mapping, got {type(d).__name__}") from e
        required = ("noise-multiplier", "max-grad-norm", "delta", "history-noise", "history-rate", "history-steps")
        missing = [k for k in required if k not in d]
        unknown = set(d) - set(required) - {"target-epsilon"}
        if missing or unknown:
            raise ValueError(f"privacy state: missing keys {missing}, unknown keys {sorted(unknown)}")
        noise, rate, steps = (list(d[k]) for k in ("history-noise", "history-rate", "history-steps"))
        if not len(noise) == len(rate) == len(steps):
            raise ValueError(f"privacy state: history lists differ in length ({len(noise)}, {len(rate)}, {len(steps)})")
        if any(isinstance(k, bool) or not float(k).is_integer() for k in steps):
            raise ValueError(f"privacy state: history-steps must be integers, got {steps}")
        target = d.get("target-epsilon")
        return cls(
            noise_multiplier=float(d["noise-multiplier"]),
            max_grad_norm=float(d["max-grad-norm"]),
            delta=float(d["delta"]),
            target_epsilon=None if target is None else float(target),
            history=[(float(s), float(q), int(k)) for s, q, k in zip(noise, rate, steps, strict=True)],
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> PrivacyState:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"privacy state: not valid JSON ({e})") from e
        return cls.from_dict(d)


def sample_rate(num_examples: int, batch_size: int) -> float:
    """Poisson sampling probability giving ``batch_size`` examples per step on average."""
    if num_examples < 1:
        raise ValueError(f"DP training needs at least one example, got {num_examples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return min(1.0, batch_size / num_examples)


def planned_steps(num_examples: int, batch_size: int, steps: int | None = None, epochs: float | None = None) -> int:
    """Steps of one round: ``steps`` as given, or ``epochs`` passes of ``1/q`` steps each."""
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps and epochs")
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return int(steps)
    if not epochs > 0:
        raise ValueError(f"epochs must be > 0, got {epochs}")
    return max(1, round(epochs / sample_rate(num_examples, batch_size)))


def _merge(history: list[Entry]) -> list[Entry]:
    """Fold consecutive entries with equal (noise, rate); RDP adds over steps, so epsilon is unchanged."""
    out: list[Entry] = []
    for sigma, q, steps in history:
        if out and out[-1][:2] == (sigma, q):
            out[-1] = (sigma, q, out[-1][2] + steps)
        else:
            out.append((sigma, q, steps))
    return out


@functools.lru_cache(maxsize=4096)
def _step_rdp(noise_multiplier: float, rate: float) -> np.ndarray:
    """RDP of one step at each of ``RDPAccountant``'s orders.

    Cached because it is what costs (a slowly converging series per fractional order, ~0.1 s)
    and a client's rounds repeat the same (sigma, q); RDP is linear in steps, so the sum below
    is exactly what ``RDPAccountant.get_epsilon`` computes for the same history.
    """
    from opacus.accountants.analysis import rdp as rdp_analysis

    return rdp_analysis.compute_rdp(q=rate, noise_multiplier=noise_multiplier, steps=1, orders=_rdp_orders())


def _rdp_orders() -> list[float]:
    """Opacus's RDP orders. Opacus is imported only when privacy is used: it takes ~1.2 s to
    import, which every simulation worker and the server would otherwise pay at start-up."""
    from opacus.accountants import RDPAccountant

    return RDPAccountant.DEFAULT_ALPHAS


def _rdp_epsilon(history: list[Entry], delta: float) -> float:
    if not history:
        return 0.0
    from opacus.accountants.analysis import rdp as rdp_analysis

    rdp = sum(_step_rdp(sigma, q) * steps for sigma, q, steps in history)
    eps, _ = rdp_analysis.get_privacy_spent(orders=_rdp_orders(), rdp=rdp, delta=delta)
    return float(eps)


def epsilon(state: PrivacyState, delta: float | None = None) -> float:
    """Epsilon spent so far (at ``delta``, default the state's), by Opacus's RDP accountant."""
    return _rdp_epsilon(state.history, state.delta if delta is None else delta)


def remaining_budget(state: PrivacyState) -> float:
    """Epsilon left before the budget (``inf`` without one)."""
    if state.target_epsilon is None:
        return math.inf
    return max(0.0, state.target_epsilon - epsilon(state))


def calibrate_noise(target_epsilon: float, delta: float, rate: float, total_steps: int) -> float:
    """Smallest noise multiplier (to Opacus's tolerance) keeping ``total_steps`` steps within the budget.

    The search evaluates RDP at the accountant's integer orders only: ~20x faster (a client
    calibrates once, on a device), and safe, since the accountant's epsilon (a minimum over
    more orders) can only be lower than the one the noise was calibrated for.
    """
    from opacus.accountants.utils import get_noise_multiplier

    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    integer_orders = [a for a in _rdp_orders() if float(a).is_integer()]
    with warnings.catch_warnings():  # the search starts at sigma = 20, whose best order is the largest: harmless
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=delta, sample_rate=rate, steps=total_steps,
                accountant="rdp", alphas=integer_orders,
            )
        )


def new_privacy_state(
    *,
    num_examples: int,
    batch_size: int,
    max_grad_norm: float,
    delta: float,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    expected_rounds: int | None = None,
    steps: int | None = None,
    epochs: float | None = None,
) -> PrivacyState:
    """A client's state before its first round.

    With ``noise_multiplier`` it is used as is (and ``target_epsilon``, if given, is only
    the stopping budget). Without it, the noise is calibrated so that ``expected_rounds``
    rounds of ``steps`` (or ``epochs``) each at this batch size just fit ``target_epsilon``;
    the noise is then fixed for all later rounds, and a client asked to train more rounds
    than planned is stopped by the budget.
    """
    state = PrivacyState(noise_multiplier or 0.0, max_grad_norm, delta, target_epsilon)  # validates the rest
    if noise_multiplier is not None:
        return state
    if target_epsilon is None or expected_rounds is None:
        raise ValueError("give noise_multiplier, or target_epsilon with expected_rounds to calibrate it")
    if expected_rounds < 1:
        raise ValueError(f"expected_rounds must be >= 1, got {expected_rounds}")
    total = planned_steps(num_examples, batch_size, steps, epochs) * expected_rounds
    sigma = calibrate_noise(target_epsilon, delta, sample_rate(num_examples, batch_size), total)
    return replace(state, noise_multiplier=sigma)


def to_dp_model(model: SentimentRNN) -> SentimentRNN:
    """The Opacus twin of ``model`` (``DPLSTM`` layers), same weights, trainable flags and mode."""
    dp = SentimentRNN(model.cfg, dp=True)
    src, dst = dict(model.named_parameters()), dict(dp.named_parameters())
    if set(src) != set(dst):
        raise ValueError(f"DP model parameters differ from the plain model's: {sorted(set(src) ^ set(dst))}")
    with torch.no_grad():
        for name, p in dst.items():
            p.copy_(src[name])
            p.requires_grad_(src[name].requires_grad)
    return dp.train(model.training)


def from_dp_state(dp_model: SentimentRNN) -> dict[str, torch.Tensor]:
    """A state dict for the plain model: ``DPLSTM``'s alias keys (``l0.ih.weight``…) dropped."""
    with torch.device("meta"):
        plain_keys = list(SentimentRNN(dp_model.cfg).state_dict())
    state = dp_model.state_dict()
    missing = [k for k in plain_keys if k not in state]
    if missing:
        raise ValueError(f"DP model state lacks plain-model keys {missing}")
    return {k: state[k].detach().clone() for k in plain_keys}


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


def poisson_batches(num_examples: int, rate: float, steps: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Index sets of ``steps`` independent Poisson samples (each example kept with prob. ``rate``)."""
    return [np.flatnonzero(rng.random(num_examples) < rate) for _ in range(steps)]


def length_chunks(index: np.ndarray, lengths: np.ndarray, chunk_size: int | None) -> list[np.ndarray]:
    """Split a sampled batch into groups of similar length, each at most ``chunk_size`` examples.

    Poisson batches cannot be length-bucketed across the data set the way non-private
    training is, and on short-review data (Amazon: median ~110 tokens, 9% at the 400 cap)
    padding a whole batch to its longest review costs ~3x. Per-example gradients do not care
    how a batch is grouped, so sorting by length and running small groups recovers most of
    it; groups of 4 were the fastest of 1 to 64 on the default model on one CPU thread.
    """
    if not len(index):
        return []
    if chunk_size is None:
        return [index]
    ordered = index[np.argsort(lengths[index], kind="stable")]
    return np.array_split(ordered, -(-len(ordered) // chunk_size))


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
    history = _merge([*state.history, (state.noise_multiplier, q, k)])
    fixed = {"noise_multiplier": state.noise_multiplier, "sample_rate": q}
    if state.target_epsilon is not None and _rdp_epsilon(history, state.delta) > state.target_epsilon:
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
