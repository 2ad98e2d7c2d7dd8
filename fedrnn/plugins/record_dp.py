"""Record-level DP across rounds: each client's privacy accountant, kept between ephemeral ClientApps.

What this protects. One **review** of one device (see ``fedrnn.privacy.dp_sgd``): every model update
a client ever sends is the output of DP-SGD, so the server, the other clients and anyone who
sees a global model learn almost the same whether or not any single review was in that
device's data. It does not hide a device's overall data (its style, label mix, size, or that
it took part); that is client-level DP (``fedrnn.plugins.client_dp``). Metrics sent next to an
update (loss, accuracy, example count) are not privatised.

How epsilon is accounted. A ClientApp is a fresh process each round, so the accountant's
whole state (a ``PrivacyState``: noise multiplier, clip norm, delta, budget and the RDP
history ``[(sigma, sampling rate, steps), ...]``) travels with the work:

* simulation: the server's ``PrivacyLedger`` keeps every virtual client's state, sends it
  in the client's config (``messages.RecordDP.dp_state_json``), and stores the updated state
  each reply carries (a ``ConfigRecord`` named ``privacy``). The ledger is a round plugin, so the
  states are saved with every round and restored by ``--resume``.
* real devices (``node_config`` has ``data-path``): the device keeps its own state in
  ``<state-dir>/privacy-<hash of data-path>.json`` (node config ``state-dir``, default
  ``~/.fedrnn``) and trusts only that file, written before the update is sent. The budget
  belongs to the device's data, so it survives restarts, resumes and later runs; the noise,
  clip, delta and budget fixed when the file was created apply until it is deleted.

Randomness. The Poisson batches and the noise come from ``round_generator``: a real device's
OS CSPRNG, or in simulation a generator keyed by the simulated fleet's secret key
(``fedrnn.privacy.entropy``) and labelled (seed, round, client). Nothing the server sends or
receives determines them, so it cannot regenerate the noise and subtract it, nor tell which
reviews a batch sampled, which the subsampling credit in the accountant relies on.

Device policy. A device's node config may set the least privacy it accepts
(``fedrnn.privacy.policy``: ``dp-required``, ``dp-max-epsilon``, ``dp-delta``,
``dp-min-noise-multiplier``, ``dp-max-clip-norm``). A request for less is refused before
training (``policy_refusal``; the ClientApp replies with the reason), and the device's bounds
are applied to its state, so a server can tighten the device's privacy but never loosen it.

A client's epsilon covers exactly the rounds it trained in: Opacus's RDP accountant over its
history, computed by the client (which reports it as ``dp-epsilon`` with the history) and
recorded by the ledger. With ``privacy.target_epsilon`` and no ``noise_multiplier``, each
client calibrates its noise at its first round so that ``planned_rounds`` rounds just fit the
budget. Before each round the client checks that the round would stay within its budget; if
not it sends its received weights back untrained, and the ledger drops that reply (it is not
an update) and counts it. A client that reports its *next* round would not fit is never
selected again. The ledger acts before the reply validator, so even an update the validator
later rejects is accounted: it was released to the server.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import replace
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message
from flwr.common.logger import log

from fedrnn.config import PrivacySection
from fedrnn.data.tokenizer import Encoded
from fedrnn.federation.local import LocalTrainConfig
from fedrnn.federation.messages import METRICS, REPLY_PRIVACY, RecordDP, RecordDPReport, Task, TrainReport
from fedrnn.federation.plugin import RoundInfo, RoundPlugin, RunContext, percentile
from fedrnn.federation.wire import state_to_arrays
from fedrnn.io import write_json
from fedrnn.model.rnn import SentimentRNN
from fedrnn.privacy.accounting import PrivacyState, epsilon, new_privacy_state, planned_steps
from fedrnn.privacy.dp_sgd import TRAINED, train_dp
from fedrnn.privacy.entropy import DEFAULT_STATE_DIR, SIMULATED_DEVICES_KEY, fresh_generator, keyed_generator, load_key
from fedrnn.privacy.policy import DevicePolicy


def record_dp_config(p: PrivacySection, planned_rounds: int, state: PrivacyState | None) -> dict[str, Any]:
    """Message keys that switch a client to DP-SGD, with its state so far (none before its first round)."""
    return RecordDP(
        dp_record=True, dp_noise_multiplier=p.noise_multiplier, dp_target_epsilon=p.target_epsilon,
        dp_max_grad_norm=p.max_grad_norm, dp_delta=p.delta, dp_planned_rounds=planned_rounds,
        dp_state_json=state.to_json() if state is not None else "",
    ).to_record()


# ---------------------------------------------------------------------------- client side
def device_state_file(node_config: Any) -> Path | None:
    """Where a real device keeps its privacy state; ``None`` in simulation (the server keeps it)."""
    if "data-path" not in node_config:
        return None
    data = Path(str(node_config["data-path"])).expanduser().resolve()
    root = Path(str(node_config.get("state-dir", DEFAULT_STATE_DIR))).expanduser()
    return root / f"privacy-{hashlib.sha256(str(data).encode()).hexdigest()[:16]}.json"


def _client_state(dp: RecordDP, state_file: Path | None, n: int, batch_size: int, steps: int,
                  policy: DevicePolicy) -> PrivacyState:
    """The device's own file, else the state the server sent, else a new one (calibrated if asked);
    in every case within the device's policy."""
    if state_file is not None and state_file.is_file():
        try:
            return policy.tighten(PrivacyState.from_json(state_file.read_text()))
        except ValueError as e:
            raise ValueError(f"{state_file}: {e}") from None
    if dp.dp_state_json:
        return policy.tighten(PrivacyState.from_json(dp.dp_state_json))
    budget = policy.budget(dp.dp_target_epsilon or None)
    return policy.tighten(new_privacy_state(
        num_examples=n, batch_size=batch_size, max_grad_norm=dp.dp_max_grad_norm,
        delta=min(dp.dp_delta, policy.delta or 1.0),
        noise_multiplier=dp.dp_noise_multiplier or (None if budget else policy.min_noise_multiplier),
        target_epsilon=budget, expected_rounds=dp.dp_planned_rounds, steps=steps,
    ))


def policy_refusal(cfg: Mapping[str, Any], node_config: Mapping[str, Any]) -> str | None:
    """Why the device's privacy policy (``fedrnn.privacy.policy``) refuses this instruction; ``None``: it may train."""
    policy = DevicePolicy.from_node_config(node_config)
    if not RecordDP.present(cfg):
        return policy.refusal(record_dp=False)
    dp = RecordDP.parse(cfg)
    return policy.refusal(record_dp=True, noise_multiplier=dp.dp_noise_multiplier,
                          target_epsilon=dp.dp_target_epsilon, max_grad_norm=dp.dp_max_grad_norm, delta=dp.dp_delta)


def round_generator(task: Task, node_config: Mapping[str, Any]) -> np.random.Generator:
    """Where a round's DP-SGD randomness (Poisson batches, noise, dropout) comes from: never from the message.

    A real device draws it from the OS CSPRNG. A simulated client derives it from the simulated
    fleet's secret key and (seed, round, client), so a simulation is reproducible and resumes
    exactly, while the seed, round and client id the server sends do not determine it.
    """
    if "data-path" in node_config:
        return fresh_generator()
    return keyed_generator(load_key(SIMULATED_DEVICES_KEY), "record-dp", task.seed, task.server_round, task.client_id)


def record_dp_train(model: SentimentRNN, data: Encoded, local: LocalTrainConfig, names: list[str],
                    task: Task, dp: RecordDP, node_config: Any) -> tuple[dict[str, np.ndarray], dict[str, float],
                                                                         dict[str, ConfigRecord]]:
    """One round of DP-SGD in place of ``local_train``: (arrays, metrics, extra reply records).

    Same step count as non-private training (``local.epochs`` expected passes, capped by
    ``local.max_steps``). A client out of budget returns the weights it received, untrained.
    The caller has checked the request against the device's policy (``policy_refusal``).
    """
    state_file = device_state_file(node_config)
    n, b = len(data), local.batch_size
    steps = planned_steps(n, b, epochs=local.epochs)
    steps = min(steps, local.max_steps) if local.max_steps else steps
    state = _client_state(dp, state_file, n, b, steps, DevicePolicy.from_node_config(node_config))
    rng = round_generator(task, node_config)
    torch.manual_seed(int(rng.integers(2**63)))  # dropout draws from torch's global generator
    new, stats = train_dp(model, data, state, mode=task.trains, batch_size=b,
                          lr=local.lr, rng=rng, steps=steps, proximal_mu=local.proximal_mu)
    if state_file is not None:  # spent before the update leaves the device
        state_file.parent.mkdir(parents=True, exist_ok=True)
        write_json(state_file, new.to_dict())
    trained = stats.status == TRAINED
    next_round = replace(new, history=[*new.history, (new.noise_multiplier, stats.sample_rate, steps)])
    exhausted = not trained or (new.target_epsilon is not None and epsilon(next_round) > new.target_epsilon)
    metrics = {
        TrainReport.key("train_loss"): stats.loss if trained else 0.0,
        TrainReport.key("train_accuracy"): stats.accuracy if trained else 0.0,
        TrainReport.key("train_seconds"): stats.seconds, TrainReport.key("steps"): float(stats.steps),
        TrainReport.key("samples"): float(stats.examples),
    } | RecordDPReport(dp_epsilon=stats.epsilon, dp_noise_multiplier=stats.noise_multiplier,
                       dp_trained=float(trained), dp_exhausted=float(exhausted)).to_record()
    return state_to_arrays(model.state_dict(), names), metrics, {REPLY_PRIVACY: ConfigRecord(new.to_dict())}


# ---------------------------------------------------------------------------- server side
class PrivacyLedger(RoundPlugin):
    """Keeps every client's record-level accountant, drops untrained replies, reports epsilon per round."""

    name = "privacy"

    def __init__(self, cfg: PrivacySection) -> None:
        self.cfg = cfg
        self.states: dict[int, PrivacyState] = {}
        self.eps: dict[int, float] = {}
        self.exhausted: set[int] = set()

    def setup(self, ctx: RunContext) -> None:
        run = ctx.cfg.run
        self.planned_rounds = self.cfg.planned_rounds or math.ceil(run.rounds * run.clients_per_round / run.clients)

    def candidates(self, rnd: int, clients: list[int]) -> list[int]:
        return [c for c in clients if c not in self.exhausted]

    def configure(self, info: RoundInfo, clients: list[int],
                  rng: np.random.Generator) -> dict[int, dict[str, Any] | None]:
        return {c: record_dp_config(self.cfg, self.planned_rounds, self.states.get(c)) for c in clients}

    def _record(self, client: int, state: PrivacyState, eps: float) -> float:
        self.states[client], self.eps[client] = state, eps
        return eps

    def on_replies(self, info: RoundInfo, replies: list[Message]) -> tuple[list[Message], dict[str, Any]]:
        kept: list[Message] = []
        round_eps: dict[str, float] = {}
        skipped = unaccounted = 0
        for reply in replies:
            client = info.client_of(reply)
            try:
                if client is None:
                    raise ValueError("reply to no training message sent this round")
                if REPLY_PRIVACY not in reply.content.config_records:
                    raise ValueError(f"no {REPLY_PRIVACY!r} record: the client did not run DP-SGD")
                state = PrivacyState.from_dict(reply.content.config_records[REPLY_PRIVACY])
                report = RecordDPReport.parse(reply.content[METRICS])
                trained, exhausted = bool(report.dp_trained), bool(report.dp_exhausted)
                eps = report.dp_epsilon  # the client ran the same accountant on this same history
                if not (math.isfinite(eps) and eps >= 0):
                    raise ValueError(f"dp-epsilon {eps} is not a finite number >= 0")
            except (KeyError, TypeError, ValueError) as e:
                log(WARNING, "round %d: dropped an unaccounted reply of client %s: %s", info.number, client, e)
                unaccounted += 1
                continue
            round_eps[str(client)] = self._record(client, state, eps)
            if exhausted:
                self.exhausted.add(client)
            if trained:
                kept.append(reply)
            else:
                skipped += 1
        return kept, self.metrics(round_eps) | {"dp_record_skipped": skipped, "dp_record_unaccounted": unaccounted}

    def metrics(self, round_eps: dict[str, float]) -> dict[str, Any]:
        """Epsilon of this round's clients and its distribution over every client that has taken part."""
        eps = list(self.eps.values())
        return {
            "dp_record_epsilon": round_eps,
            "dp_record_epsilon_max": max(eps) if eps else 0.0,
            "dp_record_epsilon_mean": float(np.mean(eps)) if eps else 0.0,
            **{f"dp_record_epsilon_p{q}": percentile(eps, q) if eps else 0.0 for q in (10, 50, 90)},
            "dp_record_participants": len(eps),
            "dp_record_exhausted": len(self.exhausted),
            "dp_record_noise_multiplier_mean": float(np.mean([s.noise_multiplier for s in self.states.values()]))
            if self.states else 0.0,
            "dp_record_budget": self.cfg.target_epsilon or None,
        }

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"states": {str(c): s.to_dict() for c, s in self.states.items()},
                "epsilon": {str(c): e for c, e in self.eps.items()}, "exhausted": sorted(self.exhausted)}, {}

    def load_state(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        spent = state.get("epsilon", {})
        for c, d in state.get("states", {}).items():
            s = PrivacyState.from_dict(d)
            self._record(int(c), s, float(spent[c]) if c in spent else epsilon(s))
        self.exhausted = {int(c) for c in state.get("exhausted", [])}
