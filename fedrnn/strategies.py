"""Flower strategies chosen by name in the config, and their state for resume.

fedrnn selects clients itself (availability, deadlines, virtual clients), so every
strategy is built to take all nodes it is offered (``fraction_train=1``); Flower's
strategies still do what they are for: configuring messages and aggregating replies.
"""

from __future__ import annotations

import numpy as np
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from fedrnn.config import RunConfig


def make_strategy(cfg: RunConfig) -> Strategy:
    """Build the configured Flower strategy."""
    common = dict(
        fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1
    )
    name = cfg.run.strategy
    if cfg.privacy.client_level != "off":  # Flower's DP wrapper around a uniform FedAvg/FedProx (see client_dp)
        from fedrnn.client_dp import UNIFORM_WEIGHT, ClientLevelDP  # lazy: client_dp imports the round loop

        uniform = {**common, "weighted_by_key": UNIFORM_WEIGHT}
        inner = FedProx(**uniform, proximal_mu=cfg.client.proximal_mu) if name == "fedprox" else FedAvg(**uniform)
        return ClientLevelDP(inner, cfg)
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(**common, proximal_mu=cfg.client.proximal_mu)
    if name == "fedadam":
        return FedAdam(**common, eta=cfg.server.server_lr, eta_l=cfg.client.lr, beta_1=0.9, beta_2=0.99, tau=1e-3)
    if name == "fedyogi":
        return FedYogi(**common, eta=cfg.server.server_lr, eta_l=cfg.client.lr, beta_1=0.9, beta_2=0.99, tau=1e-3)
    if name == "fedmedian":
        return FedMedian(**common)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=cfg.server.trimmed_beta)
    if name == "krum":
        return Krum(**common, num_malicious_nodes=cfg.server.krum_byzantine)
    if name == "multikrum":
        keep = max(1, cfg.run.clients_per_round - cfg.server.krum_byzantine)
        return MultiKrum(**common, num_malicious_nodes=cfg.server.krum_byzantine, num_nodes_to_select=keep)
    raise ValueError(f"run.strategy {name!r} unknown")


_STATE_ATTRS = ("current_arrays", "m_t", "v_t")


def strategy_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """Server-optimizer state (FedAdam/FedYogi moments) as flat named arrays."""
    out: dict[str, np.ndarray] = {}
    for attr in _STATE_ATTRS:
        value = getattr(strategy, attr, None)
        if value:
            out |= {f"{attr}/{k}": np.asarray(v) for k, v in value.items()}
    return out


def load_strategy_state(strategy: Strategy, arrays: dict[str, np.ndarray]) -> None:
    for attr in _STATE_ATTRS:
        prefix = f"{attr}/"
        value = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
        if value:
            setattr(strategy, attr, value)
