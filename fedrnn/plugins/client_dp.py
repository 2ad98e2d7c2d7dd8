"""Client-level (user-level) differential privacy: server-side clipping and noise, accounted per round.

What this protects. The unit of privacy is **a whole device**: everything one client
contributes in a round (all of its reviews together, its label mix, its writing style).
The server clips each client's model update to L2 norm ``C`` (``privacy.clipping_norm``;
with ``adaptive`` the norm follows a target quantile of the updates' norms, privately
estimated), sums the clipped updates, divides by ``m`` and adds ``N(0, (sigma C / m)^2)``.
The sequence of global models is then (epsilon, delta)-DP with respect to adding or removing
one client's entire data: nobody who sees the global models can tell much whether a given
device took part. It assumes a trusted server, which sees the raw updates before clipping and
noise; record-level DP (``fedrnn.plugins.record_dp``) protects single reviews even from the
server, and the two compose.

Sensitivity. ``m`` is the number of clients *sampled* for the round (fixed by the server's
seeded selection before any client answers), not the number of replies that survive: a client
that fails, refuses, is out of budget or is rejected counts as a zero update. Every rule that
drops a reply looks at that reply alone (``fedrnn.plugins.robust`` refuses its median-based
norm ratio under client-level DP and skips its majority-of-metric-keys rule). So adding or
removing one client changes the sum of clipped updates by one clipped update, of norm at most
``C``, and nothing else: the pre-noise average moves by at most ``C / m``, which is the
sensitivity the Gaussian noise ``sigma C / m`` is calibrated to. (Dividing by the surviving
count instead, as Flower's wrappers do, lets one client's presence change the denominator and,
through relative rejection rules, which other updates are kept.) The average is uniform: one
vote per client, whatever ``num-examples`` it claims.

Adaptive clipping (Andrew et al. 2021). Each round uses the current norm ``C_t`` for
everything: updates are clipped to ``C_t``, the noise is ``sigma_u C_t / m``, the reported
``dp_client_noise_std`` is that value; only then is the norm moved for the next round, from the
noisy fraction of clipped updates, as ``C_{t+1} = C_t exp(lr (clipped_fraction - target))``.
Flower 1.42's ``DifferentialPrivacyServerSideAdaptiveClipping`` differs twice: it updates the
norm *between* clipping and noising, so the noise is scaled to ``C_{t+1}`` (too little whenever
the norm shrinks: the accounted epsilon is then too low), and its update has the opposite sign
(``exp(-lr (...))``), which drives the norm to 0 or infinity. The split of ``sigma`` between the
update noise ``sigma_u`` and the clipped-count noise is Flower's (``compute_adaptive_noise_params``).

Accounting. Every round whose aggregate is released is one Gaussian mechanism with noise
multiplier sigma on the sum of clipped updates (for adaptive clipping sigma is the effective
multiplier of the update and clipped-count noise together). Releases are composed by Flower's
own ``RdpAccountant`` (``flwr[dp]``, Google's dp-accounting) with ``no-amplification``
sampling: no credit is taken for the server sampling only some clients per round, so the
epsilon holds whatever decides who takes part (device availability, deadlines, exhausted
record-level budgets) and is conservative for uniform sampling.

Randomness. The noise (and the clipped-count noise) comes from a generator keyed by the
server's own secret key (``fedrnn.privacy.entropy``, ``server.key`` in the server's state
directory) and labelled with (run seed, round): a run and its resume are reproducible, but the
seed every client receives does not let it reproduce the noise and subtract it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import (
    GaussianPrivacyEvent,
    Grid,
    NeighboringRelation,
    PrivacyConfig,
    RdpAccountant,
    SamplingMethod,
)
from flwr.serverapp.strategy import FedAvg, FedProx, Strategy
from flwr.supercore.differential_privacy import (
    adaptive_clip_inputs_inplace,
    compute_adaptive_noise_params,
    compute_stdv,
    get_norm,
)

from fedrnn.config import ConfigError, RunConfig
from fedrnn.federation.messages import ARRAYS
from fedrnn.federation.plugin import RoundInfo, RoundPlugin
from fedrnn.federation.wire import from_record, to_record
from fedrnn.privacy.entropy import SERVER_KEY, keyed_generator, load_key


def _accountant(delta: float, population: int, max_epsilon: float | None) -> RdpAccountant:
    return RdpAccountant(PrivacyConfig(
        target_delta=delta, population_size=population, neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION, max_epsilon=max_epsilon,
    ))


def gaussian_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Epsilon of ``releases`` Gaussian releases without amplification, by Flower's RDP accountant."""
    acc = _accountant(delta, 1, None)
    acc.compose(GaussianPrivacyEvent(noise_multiplier, 1, 1), releases)
    return acc.get_epsilon(delta)


def calibrate_client_noise(target_epsilon: float, delta: float, releases: int, rel_tol: float = 1e-4) -> float:
    """Smallest noise multiplier (to ``rel_tol``) keeping ``releases`` rounds within ``target_epsilon``."""
    if not target_epsilon > 0 or releases < 1:
        raise ValueError(f"need target_epsilon > 0 and releases >= 1, got {target_epsilon}, {releases}")
    lo, hi = 1e-3, 1.0
    while gaussian_epsilon(hi, releases, delta) > target_epsilon:
        lo, hi = hi, hi * 2
    while hi - lo > rel_tol * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gaussian_epsilon(mid, releases, delta) > target_epsilon else (lo, mid)
    return hi


def clipped_sum(updates: Iterable[list[np.ndarray]], clip: float) -> tuple[list[np.ndarray], int]:
    """Sum of the updates each clipped to L2 norm ``clip`` (Flower's flat clip), and how many were clipped."""
    total: list[np.ndarray] | None = None
    clipped = 0
    for update in updates:
        if get_norm(update) > 0:  # Flower's clip divides by the norm
            clipped += int(adaptive_clip_inputs_inplace(update, clip))
        total = update if total is None else [t + u for t, u in zip(total, update, strict=True)]
    if total is None:
        raise ValueError("clipped_sum needs at least one update")
    return total, clipped


class ClientLevelDP(Strategy):
    """Server-side clipping and Gaussian noise around a FedAvg/FedProx, with its releases accounted.

    ``inner`` configures the rounds (FedProx adds its ``proximal-mu``); the aggregate is computed
    here (see the module docstring): ``sum of clipped updates / m + N(0, (sigma_u C_t / m)^2)``.
    ``sampled[round]`` is ``m``, set by ``ClientLevelLedger.configure`` when the clients are chosen.
    """

    def __init__(self, inner: Strategy, cfg: RunConfig) -> None:
        super().__init__()
        p, run = cfg.privacy, cfg.run
        self.inner = inner
        self.delta, self.seed, self.population = p.delta, run.seed, run.clients
        self.clients_per_round = run.clients_per_round
        self.target_epsilon = p.clients_target_epsilon or None
        self.noise_multiplier = p.clients_noise_multiplier or calibrate_client_noise(
            p.clients_target_epsilon, p.delta, run.rounds)
        self.accountant = _accountant(p.delta, run.clients, self.target_epsilon)
        self.adaptive = p.client_level == "adaptive"
        self.clipping_norm = p.clipping_norm
        self.target_quantile, self.clip_norm_lr = p.target_clipped_quantile, p.clip_norm_lr
        # sigma_u: the multiplier on the update noise (adaptive: part of sigma pays for the clipped count)
        self.count_stddev, self.update_noise_multiplier = 0.0, self.noise_multiplier
        if self.adaptive:
            try:
                self.count_stddev, self.update_noise_multiplier = compute_adaptive_noise_params(
                    self.noise_multiplier, run.clients_per_round, p.clipped_count_stddev or None)
            except ValueError as e:
                raise ConfigError(f"privacy.clipped_count_stddev too small for noise multiplier "
                                  f"{self.noise_multiplier:.3f} ({e})") from None
        self.sampled: dict[int, int] = {}  # round -> m, the clients sampled
        self.current: dict[str, np.ndarray] = {}  # the global tensors the round's updates are measured against
        # round -> what was released: the noise std added to the average, the clip C_t it is scaled to,
        # m (the clients sampled: the denominator) and how many updates the clip cut
        self.released: dict[int, dict[str, float]] = {}
        self._key: bytes | None = None

    # ---------------------------------------------------------------- accounting
    def epsilon(self) -> float:
        return self.accountant.get_epsilon(self.delta) if self.accountant.num_releases else 0.0

    def exhausted(self) -> bool:
        """Whether one more release would take epsilon past the budget."""
        event = GaussianPrivacyEvent(self.noise_multiplier, 1, self.population)
        return self.target_epsilon is not None and self.accountant.would_exceed(event)

    def state(self) -> dict[str, Any]:
        return {"accountant": self.accountant.state_dict(), "clipping_norm": self.clipping_norm}

    def load_state(self, state: dict[str, Any]) -> None:
        if state:
            self.accountant.load_state_dict(state["accountant"])
            self.clipping_norm = float(state["clipping_norm"])

    def generator(self, server_round: int) -> np.random.Generator:
        """This round's noise: keyed by the server's secret, so knowing (seed, round) does not reproduce it."""
        if self._key is None:
            self._key = load_key(SERVER_KEY)
        return keyed_generator(self._key, "client-dp", self.seed, server_round)

    # ---------------------------------------------------------------- Strategy
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current = {k: v.astype(np.float64) for k, v in from_record(arrays).items()}
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if not replies or self.exhausted():
            return None, None
        m = max(self.sampled.pop(server_round, self.clients_per_round), len(replies))
        names, clip = list(self.current), self.clipping_norm  # C_t: clips, scales the noise, is reported
        received = (from_record(r.content[ARRAYS]) for r in replies)
        total, clipped = clipped_sum(([a[k].astype(np.float64) - self.current[k] for k in names] for a in received),
                                     clip)
        rng = self.generator(server_round)
        std = compute_stdv(self.update_noise_multiplier, clip, m)
        new = {k: (self.current[k] + t / m + rng.normal(0.0, std, t.shape)).astype(np.float32)
               for k, t in zip(names, total, strict=True)}
        if self.adaptive:  # only now, for the next round: Andrew et al.'s sign, from the noisy clipped fraction
            fraction = (clipped + rng.normal(0.0, self.count_stddev)) / m
            self.clipping_norm = clip * math.exp(self.clip_norm_lr * (fraction - self.target_quantile))
        self.accountant.compose(GaussianPrivacyEvent(self.noise_multiplier, min(m, self.population), self.population))
        self.released[server_round] = {"noise_std": std, "clip": clip, "sampled": m, "clipped": clipped}
        return to_record(new), MetricRecord()

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()


class ClientLevelLedger(RoundPlugin):
    """Wraps the strategy in :class:`ClientLevelDP`; puts the client-level epsilon in every round's metrics,
    stops training at the budget and saves the accountant."""

    name = "client_dp"

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    def wrap_strategy(self, strategy: Strategy) -> Strategy:
        """Client-level DP around a FedAvg/FedProx (the noise is calibrated to a plain mean of clipped updates)."""
        if not isinstance(strategy, FedAvg) or type(strategy) not in (FedAvg, FedProx):
            raise ConfigError(f"privacy.client_level needs FedAvg or FedProx, got {type(strategy).__name__}")
        self.dp = ClientLevelDP(strategy, self.cfg)
        return self.dp

    def candidates(self, rnd: int, clients: list[int]) -> list[int]:
        return [] if self.dp.exhausted() else clients

    def configure(self, info: RoundInfo, clients: list[int],
                  rng: np.random.Generator) -> dict[int, dict[str, Any] | None]:
        """Records ``m``, the clients sampled, before any of them can answer (the average's denominator)."""
        if clients:
            self.dp.sampled[info.number] = len(clients)
        return {}

    def after_aggregate(self, info: RoundInfo, grid: Grid, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        rnd = info.number
        eps = self.dp.epsilon()
        self.dp.sampled.pop(rnd, None)  # a round without any reply released nothing
        release = self.dp.released.pop(rnd, {"noise_std": 0.0, "clip": None, "sampled": 0, "clipped": 0})
        return {f"dp_client_{k}": v for k, v in release.items()} | {
            "dp_client_epsilon": eps, "dp_client_releases": self.dp.accountant.num_releases,
            "dp_client_noise_multiplier": self.dp.noise_multiplier, "dp_client_clipping_norm": self.dp.clipping_norm,
            "dp_client_exhausted": self.dp.exhausted(),
            "dp_client_budget": self.dp.target_epsilon,
        }

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return self.dp.state(), {}

    def load_state(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.dp.load_state(state)
