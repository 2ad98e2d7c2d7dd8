"""Flower strategies chosen by name in the config, and their state for resume.

fedrnn selects clients itself (availability, deadlines, virtual clients), so every
strategy is built to take all nodes it is offered (``fraction_train=1``); Flower's
strategies still do what they are for: configuring messages and aggregating replies.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
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
    """Build the configured Flower strategy (plugins may wrap it, e.g. ``fedrnn.plugins.client_dp``)."""
    common = dict(
        fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1
    )
    name = cfg.run.strategy
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedavgm":
        return AveragedFedAvgM(**common, server_momentum=cfg.server.server_momentum)
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


class AveragedFedAvgM(FedAvgM):
    """Flower's FedAvgM stepping by the bias-corrected average of recent pseudo-gradients.

    FedAvgM's momentum ``m_t = beta m_{t-1} + g_t`` at learning rate 1 steps up to 1/(1 - beta)
    times FedAvg's; at 1 - beta it starts at a tenth of it (beta = 0.9) and needs ~10 rounds to
    catch up. Scaling by (1 - beta) / (1 - beta^t), as Adam corrects its first moment, steps
    exactly as FedAvg in round 1 and afterwards by an average over about 1/(1 - beta) rounds:
    the same step size, with the round-to-round swings of non-IID client samples smoothed out.
    """

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, Any]:
        beta = self.server_momentum
        self.server_learning_rate = (1 - beta) / (1 - beta**server_round) if beta else 1.0
        return super().aggregate_train(server_round, replies)


_STATE_ATTRS = ("current_arrays", "m_t", "v_t")


def strategy_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """Server-optimizer state (FedAdam/FedYogi moments, FedAvgM's momentum) as flat named arrays."""
    out: dict[str, np.ndarray] = {}
    for attr in _STATE_ATTRS:
        value = getattr(strategy, attr, None)
        if isinstance(value, ArrayRecord):  # FedAvgM's weights
            out |= {f"{attr}/{k}": v.numpy() for k, v in value.items()}
        elif value:
            out |= {f"{attr}/{k}": np.asarray(v) for k, v in value.items()}
    momentum = getattr(strategy, "momentum_vector", None)
    if momentum is not None:  # FedAvgM keeps it as a list in its weights' order: saved by tensor name
        out |= {f"momentum_vector/{k}": np.asarray(v) for k, v in zip(strategy.current_arrays, momentum, strict=True)}
    return out


def load_strategy_state(strategy: Strategy, arrays: dict[str, np.ndarray], order: list[str]) -> None:
    """Restore ``strategy_state``. ``order``: the round loop's tensor names in the order its
    records carry them; FedAvgM pairs its weights and momentum with a reply's tensors by position."""

    def part(attr: str) -> dict[str, np.ndarray]:
        return {k[len(attr) + 1 :]: v for k, v in arrays.items() if k.startswith(f"{attr}/")}

    for attr in _STATE_ATTRS:
        value = part(attr)
        if value and attr == "current_arrays" and isinstance(strategy, FedAvgM):
            strategy.current_arrays = ArrayRecord({k: Array.from_numpy_ndarray(value[k]) for k in order})
        elif value:
            setattr(strategy, attr, value)
    momentum = part("momentum_vector")
    if momentum:
        strategy.momentum_vector = [momentum[k] for k in order]
