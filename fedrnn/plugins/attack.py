"""Byzantine clients for robustness studies: who is malicious (server side) and what they do (client side).

A seeded set of ``attack.clients`` client ids is malicious for the whole run, as compromised
devices would be. When one of them is selected, ``AttackSimulation.configure`` tells it so
through its per-client config (``attack``, ``attack-scale``) and the ClientApp then:

* ``label-flip``: trains honestly on data whose labels are flipped (a data-poisoning attack
  that a norm check cannot see);
* ``sign-flip``: returns ``w_global - (w_local - w_global)``, the opposite of its honest update;
* ``scale``: returns ``w_global + scale * (w_local - w_global)``, a boosted update that
  dominates a plain average.

Honest clients get no attack keys, so their messages are byte-identical to an attack-free run.
Simulation only: a ClientApp on a real SuperNode refuses a message carrying an attack (it
replies untrained with the reason; ``fedrnn.plugins.refusals`` counts it), so a server cannot
turn honest devices against the run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message

from fedrnn.config import ATTACKS, AttackSection
from fedrnn.data.tokenizer import Encoded
from fedrnn.federation.messages import Attack
from fedrnn.federation.plugin import RoundInfo, RoundPlugin, RunContext


def malicious_clients(num_clients: int, k: int, seed: int) -> list[int]:
    """The seeded, fixed set of ``k`` malicious client ids out of ``num_clients``."""
    rng = np.random.default_rng([seed, 4])
    return sorted(int(c) for c in rng.choice(num_clients, size=k, replace=False))


class AttackSimulation(RoundPlugin):
    name = "attack"

    def __init__(self, cfg: AttackSection) -> None:
        self.cfg = cfg

    def setup(self, ctx: RunContext) -> None:
        run = ctx.cfg.run  # attack.clients <= run.clients is checked by the config
        self.malicious = set(malicious_clients(run.clients, self.cfg.clients, run.seed))
        self.round_attackers: list[int] = []

    def configure(self, info: RoundInfo, clients: list[int],
                  rng: np.random.Generator) -> dict[int, dict[str, Any] | None]:
        self.round_attackers = [c for c in clients if c in self.malicious]
        return {c: Attack(attack=self.cfg.kind, attack_scale=self.cfg.scale).to_record() for c in self.round_attackers}

    def on_replies(self, info: RoundInfo, replies: list[Message]) -> tuple[list[Message], dict[str, Any]]:
        # Called after the validator: how many selected attackers it let through to the aggregation rule.
        through = {info.client_of(r) for r in replies} & set(self.round_attackers)
        return replies, {"attackers": len(self.round_attackers), "attackers_accepted": len(through)}


def attack_of(cfg: ConfigRecord) -> Attack | None:
    """The attack a client's message asks it to carry out (``None`` for an honest client)."""
    if not Attack.present(cfg):
        return None
    attack = Attack.parse(cfg)
    if attack.attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack.attack!r} in the message config; expected one of {ATTACKS}")
    return attack


def poison_data(data: Encoded, kind: str) -> Encoded:
    """Label-flip: the same reviews with every binary label inverted; other kinds leave data alone."""
    if kind != "label-flip":
        return data
    return Encoded(data.ids, data.lengths, (1 - data.labels).astype(data.labels.dtype))


def poison_update(local: dict[str, np.ndarray], received: dict[str, np.ndarray], kind: str,
                  scale: float) -> dict[str, np.ndarray]:
    """Sign-flip or scale the update ``local - received``; other kinds return ``local`` unchanged."""
    factor = {"sign-flip": -1.0, "scale": scale}.get(kind)
    if factor is None:
        return local
    return {k: (received[k] + factor * (v - received[k])).astype(np.float32) for k, v in local.items()}
