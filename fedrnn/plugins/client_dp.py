"""Client-level (user-level) differential privacy: Flower's central-DP wrappers, accounted per round.

What this protects. The unit of privacy is **a whole device**: everything one client
contributes in a round (all of its reviews together, its label mix, its writing style).
The server clips each client's model update to L2 norm ``C`` (``privacy.clipping_norm``;
with ``adaptive`` the norm follows a target quantile of the updates' norms, privately
estimated) and adds ``N(0, (sigma C / m)^2)`` to the average of the ``m`` clipped updates
(Flower's ``DifferentialPrivacyServerSide{Fixed,Adaptive}Clipping``). The sequence of
global models is then (epsilon, delta)-DP with respect to adding or removing one client's
entire data: nobody who sees the global models can tell much whether a given device took
part. It assumes a trusted server, which sees the raw updates before clipping and noise;
record-level DP (``fedrnn.plugins.record_dp``) protects single reviews even from the server,
and the two compose.

Accounting. Every round whose aggregate is released is one Gaussian mechanism with noise
multiplier sigma on the sum of clipped updates (for the adaptive wrapper sigma is the
effective multiplier of the update and clipped-count noise together, Andrew et al. 2021,
as Flower constructs it). Releases are composed by Flower's own ``RdpAccountant``
(``flwr[dp]``, Google's dp-accounting) with ``no-amplification`` sampling: no credit is
taken for the server sampling only some clients per round, so the epsilon holds whatever
decides who takes part (device availability, deadlines, exhausted record-level budgets)
and is conservative for uniform sampling. This is also the only mode Flower's
fixed-clipping wrapper accepts for accounting.

Two adaptations to fedrnn's round loop, both needed for the accounted epsilon to be true:
the average is uniform (one vote per client; weighting by example counts would change the
sensitivity ``C / m``), and the noise is scaled to the number of updates actually averaged
(a straggler or a dropped reply would otherwise leave less noise than accounted). Flower's
wrappers draw noise from NumPy's global generator; it is seeded from (run seed, round) so
that runs and resumes are reproducible, which means the guarantee is against parties who
do not know the run's seed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
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
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedProx,
    Strategy,
)

from fedrnn.config import ConfigError, RunConfig
from fedrnn.federation.plugin import RoundInfo, RoundPlugin

UNIFORM_WEIGHT = "dp-uniform-weight"  # the weight key the inner FedAvg averages by: 1 per client


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


@contextmanager
def _seeded_numpy(seed: int, rnd: int) -> Iterator[None]:
    """Seed NumPy's global generator (which Flower's DP code draws from) for one round, then restore it."""
    saved = np.random.get_state()
    np.random.seed(int(np.random.SeedSequence([seed, rnd, 0xD1F]).generate_state(1)[0]))
    try:
        yield
    finally:
        np.random.set_state(saved)


class _AdaptiveClipping(DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower 1.42's server-side adaptive clipping with the clip-norm update's sign corrected.

    Flower multiplies the norm by ``exp(-lr (clipped_fraction - target))``: when more updates
    are clipped than the target, the norm *shrinks*, so more get clipped, and it runs off to 0
    (or to infinity from the other side). Andrew et al. (2021) move it the other way.
    """

    def _geometric_update(self, clipped_fraction: float) -> None:
        self.clipping_norm *= math.exp(self.clip_norm_lr * (clipped_fraction - self.target_clipped_quantile))


class ClientLevelDP(Strategy):
    """Flower's server-side clipping wrapper around a FedAvg/FedProx, with its releases accounted.

    ``inner`` must average by ``UNIFORM_WEIGHT`` (``ClientLevelLedger.wrap_strategy`` sets it); every
    reply is given weight 1 here, and ``num_sampled_clients`` follows the replies averaged.
    """

    def __init__(self, inner: Strategy, cfg: RunConfig) -> None:
        super().__init__()
        p, run = cfg.privacy, cfg.run
        self.delta, self.seed, self.population = p.delta, run.seed, run.clients
        self.target_epsilon = p.clients_target_epsilon or None
        self.noise_multiplier = p.clients_noise_multiplier or calibrate_client_noise(
            p.clients_target_epsilon, p.delta, run.rounds)
        self.accountant = _accountant(p.delta, run.clients, self.target_epsilon)
        self.noise_std: dict[int, float] = {}  # round -> std of the noise added to the averaged update
        if p.client_level == "fixed":
            self.dp: Strategy = DifferentialPrivacyServerSideFixedClipping(
                inner, self.noise_multiplier, p.clipping_norm, run.clients_per_round)
        else:
            try:
                self.dp = _AdaptiveClipping(
                    inner, self.noise_multiplier, run.clients_per_round, initial_clipping_norm=p.clipping_norm,
                    target_clipped_quantile=p.target_clipped_quantile, clip_norm_lr=p.clip_norm_lr,
                    clipped_count_stddev=p.clipped_count_stddev or None)
            except ValueError as e:
                raise ConfigError(f"privacy.clipped_count_stddev too small for noise multiplier "
                                  f"{self.noise_multiplier:.3f} ({e})") from None

    # ---------------------------------------------------------------- accounting
    @property
    def clipping_norm(self) -> float:
        return float(self.dp.clipping_norm)  # type: ignore[attr-defined]

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
            self.dp.clipping_norm = float(state["clipping_norm"])  # type: ignore[attr-defined]

    # ---------------------------------------------------------------- Strategy
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.dp.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if not replies or self.exhausted():
            return None, None
        for reply in replies:
            for metrics in reply.content.metric_records.values():
                metrics[UNIFORM_WEIGHT] = 1.0
        self.dp.num_sampled_clients = len(replies)  # type: ignore[attr-defined]
        clip = self.clipping_norm  # before the adaptive wrapper updates it for the next round
        with _seeded_numpy(self.seed, server_round):
            arrays, metrics = self.dp.aggregate_train(server_round, replies)
        if arrays is not None:
            size = min(len(replies), self.population)  # metadata only without amplification
            self.accountant.compose(GaussianPrivacyEvent(self.noise_multiplier, size, self.population))
            self.noise_std[server_round] = self.noise_multiplier_on_update * clip / len(replies)
        return arrays, metrics

    @property
    def noise_multiplier_on_update(self) -> float:
        """The multiplier on the update noise: sigma, or larger for adaptive (part of sigma pays for the count)."""
        return float(self.dp.noise_multiplier)  # type: ignore[attr-defined]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.dp.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.dp.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.dp.summary()


class ClientLevelLedger(RoundPlugin):
    """Wraps the strategy in :class:`ClientLevelDP`; puts the client-level epsilon in every round's metrics,
    stops training at the budget and saves the accountant."""

    name = "client_dp"

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    def wrap_strategy(self, strategy: Strategy) -> Strategy:
        """Flower's central-DP wrapper around a uniform FedAvg/FedProx (the noise is calibrated to a plain mean)."""
        if not isinstance(strategy, FedAvg) or type(strategy) not in (FedAvg, FedProx):
            raise ConfigError(f"privacy.client_level needs FedAvg or FedProx, got {type(strategy).__name__}")
        strategy.weighted_by_key = UNIFORM_WEIGHT
        self.dp = ClientLevelDP(strategy, self.cfg)
        return self.dp

    def candidates(self, rnd: int, clients: list[int]) -> list[int]:
        return [] if self.dp.exhausted() else clients

    def after_aggregate(self, info: RoundInfo, grid: Grid, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        rnd = info.number
        eps = self.dp.epsilon()
        return {
            "dp_client_epsilon": eps, "dp_client_releases": self.dp.accountant.num_releases,
            "dp_client_noise_multiplier": self.dp.noise_multiplier, "dp_client_clipping_norm": self.dp.clipping_norm,
            "dp_client_noise_std": self.dp.noise_std.pop(rnd, 0.0), "dp_client_exhausted": self.dp.exhausted(),
            "dp_client_budget": self.dp.target_epsilon,
        }

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return self.dp.state(), {}

    def load_state(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.dp.load_state(state)
