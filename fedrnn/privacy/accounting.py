"""Record-level DP accounting: a client's privacy state across rounds and Opacus's RDP accountant over it.

A Flower ClientApp is a fresh process each round, so the accountant's whole state is the small
``PrivacyState`` (noise multiplier, clip norm, delta, optional epsilon budget and the RDP
history ``[(sigma, q, steps), ...]``), kept between rounds by the caller (``to_dict``/``from_dict``
for a ``ConfigRecord``, ``to_json``/``from_json`` for a file). ``epsilon`` runs Opacus's RDP
analysis of the sampled Gaussian mechanism over that history; ``calibrate_noise`` finds the
smallest noise that keeps a planned number of steps within a budget. ``n`` (hence ``q``) is
treated as public, as Opacus does.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

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


def merge_history(history: list[Entry]) -> list[Entry]:
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


def rdp_epsilon(history: list[Entry], delta: float) -> float:
    if not history:
        return 0.0
    from opacus.accountants.analysis import rdp as rdp_analysis

    rdp = sum(_step_rdp(sigma, q) * steps for sigma, q, steps in history)
    eps, _ = rdp_analysis.get_privacy_spent(orders=_rdp_orders(), rdp=rdp, delta=delta)
    return float(eps)


def epsilon(state: PrivacyState, delta: float | None = None) -> float:
    """Epsilon spent so far (at ``delta``, default the state's), by Opacus's RDP accountant."""
    return rdp_epsilon(state.history, state.delta if delta is None else delta)


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


