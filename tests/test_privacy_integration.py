"""Differential privacy in the federation: accounting across rounds and resumes, budgets, client-level noise.

Unit tests drive the real pieces (Flower's DP wrapper and accountant, the client's DP-SGD
round, the server's ledger) in-process; the end-to-end tests run ``python -m fedrnn.simulate``
with record-level and client-level DP together, resume with more rounds (and, in a slow
test, SIGKILL a run and resume it: same metrics), and check every reported epsilon against
Opacus's accountant computed here independently.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from messages import reply_metadata, round_info, task
from opacus.accountants import RDPAccountant
from processes import kill_after_round
from safetensors.numpy import load_file

from fedrnn.config import ConfigError, PrivacySection, config_from_dict
from fedrnn.data.partitions import load_partitions, split_holdout
from fedrnn.data.tokenizer import Encoded
from fedrnn.federation.local import LocalTrainConfig
from fedrnn.federation.loop import OneNodeGrid
from fedrnn.federation.messages import REPLY_PRIVACY, RecordDP
from fedrnn.federation.rundir import RunDir
from fedrnn.federation.strategies import make_strategy
from fedrnn.federation.wire import from_record, to_record
from fedrnn.model.checkpoint import load_checkpoint
from fedrnn.model.rnn import ModelConfig, SentimentRNN, trainable_names
from fedrnn.plugins.client_dp import ClientLevelDP, ClientLevelLedger, calibrate_client_noise, gaussian_epsilon
from fedrnn.plugins.record_dp import (
    PrivacyLedger,
    device_state_file,
    record_dp_config,
    record_dp_train,
)
from fedrnn.privacy.accounting import PrivacyState, epsilon

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 420
DELTA = 1e-5


def _opacus_epsilon(history: list[tuple[float, float, int]], delta: float = DELTA) -> float:
    """The independent reference: Opacus's RDP accountant on a (noise, sample rate, steps) history."""
    acc = RDPAccountant()
    acc.history = list(history)
    return float(acc.get_epsilon(delta))


# ------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(("section", "key"), [
    ({"record_level": True}, "privacy.noise_multiplier/target_epsilon"),
    ({"record_level": True, "noise_multiplier": 1.0, "max_grad_norm": 0}, "privacy.max_grad_norm"),
    ({"delta": 1.5}, "privacy.delta"),
    ({"client_level": "central"}, "privacy.client_level"),
    ({"client_level": "fixed"}, "privacy.clients_noise_multiplier/clients_target_epsilon"),
    ({"client_level": "adaptive", "clients_noise_multiplier": 1.0, "target_clipped_quantile": 2},
     "privacy.target_clipped_quantile"),
])
def test_bad_privacy_config_is_named(section: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict({"privacy": section})


def test_client_level_dp_needs_a_plain_average() -> None:
    with pytest.raises(ConfigError, match=r"run\.strategy"):
        config_from_dict({"run": {"strategy": "fedadam"}, "privacy": {"client_level": "fixed",
                                                                      "clients_noise_multiplier": 1.0}})


# ------------------------------------------------------------------------------------- client level


def test_client_level_epsilon_matches_opacus_and_calibration_hits_the_target() -> None:
    for sigma, releases in ((0.8, 1), (2.0, 10), (5.0, 40)):
        assert gaussian_epsilon(sigma, releases, DELTA) == pytest.approx(_opacus_epsilon([(sigma, 1.0, releases)]),
                                                                         rel=1e-9)
    sigma = calibrate_client_noise(4.0, DELTA, 10)
    assert 3.99 < gaussian_epsilon(sigma, 10, DELTA) <= 4.0 < gaussian_epsilon(sigma * 0.99, 10, DELTA)


def _reply(arrays: dict[str, np.ndarray], client: int, num_examples: int = 10) -> Message:
    meta = reply_metadata(f"m{client}", src_node_id=7)
    content = RecordDict({"arrays": to_record(arrays),
                          "metrics": MetricRecord({"client-id": client, "num-examples": num_examples})})
    return Message(content, metadata=meta)


def _client_dp(privacy: dict, rounds: int = 3) -> ClientLevelDP:
    cfg = config_from_dict({"run": {"clients": 20, "clients_per_round": 5, "rounds": rounds, "seed": 3},
                            "privacy": privacy, "robust": {"max_norm_ratio": 0.0}})
    strategy = ClientLevelLedger(cfg).wrap_strategy(make_strategy(cfg))
    assert isinstance(strategy, ClientLevelDP)
    return strategy


def _round(strategy: ClientLevelDP, rnd: int, glob: np.ndarray, updates: list[np.ndarray],
           weights: list[int] | None = None, sampled: int | None = None) -> np.ndarray | None:
    """One round; ``sampled`` (default: one per update) is m, as ``ClientLevelLedger.configure`` records it."""
    strategy.sampled[rnd] = sampled or len(updates)
    list(strategy.configure_train(rnd, to_record({"w": glob}), ConfigRecord(), OneNodeGrid(7)))
    replies = [_reply({"w": glob + u}, i, (weights or [10] * len(updates))[i]) for i, u in enumerate(updates)]
    arrays, _ = strategy.aggregate_train(rnd, replies)
    return None if arrays is None else from_record(arrays)["w"]


def test_fixed_clipping_averages_clipped_updates_uniformly(task_identity: None) -> None:
    """Almost no noise: the aggregate is the *unweighted* mean of updates clipped to C."""
    dp = _client_dp({"client_level": "fixed", "clients_noise_multiplier": 1e-6, "clipping_norm": 1.0})
    rng = np.random.default_rng(0)
    glob = rng.normal(size=50).astype(np.float32)
    updates = [rng.normal(size=50).astype(np.float32) * s for s in (0.01, 1.0, 10.0)]  # norms ~0.07, ~7, ~70
    out = _round(dp, 1, glob, updates, weights=[1, 100, 10_000])  # example counts must not weigh in
    clipped = [u * min(1.0, 1.0 / float(np.linalg.norm(u))) for u in updates]
    np.testing.assert_allclose(out, glob + np.mean(clipped, axis=0), atol=1e-5)


def test_noise_is_scaled_to_the_clients_sampled_and_accounted(task_identity: None) -> None:
    """3 replies of 5 sampled: the 2 missing count as zero updates, the sum is divided by 5 and the noise is
    sigma C / 5: the sensitivity of a mean over the sampled clients, whoever answers."""
    dp = _client_dp({"client_level": "fixed", "clients_noise_multiplier": 1.5, "clipping_norm": 0.2})
    glob, d = np.zeros(40_000, np.float32), 40_000
    updates = [np.full(d, 1e-6, np.float32) for _ in range(3)]
    out = _round(dp, 1, glob, updates, sampled=5)
    noise = out - 3 * 1e-6 / 5
    assert dp.released[1] == {"noise_std": pytest.approx(1.5 * 0.2 / 5), "clip": 0.2, "sampled": 5, "clipped": 0}
    assert float(noise.std()) == pytest.approx(1.5 * 0.2 / 5, rel=0.02)
    assert abs(float(noise.mean())) < 4 * 0.06 / math.sqrt(d)
    assert dp.epsilon() == pytest.approx(_opacus_epsilon([(1.5, 1.0, 1)]), rel=1e-9)
    again = _client_dp({"client_level": "fixed", "clients_noise_multiplier": 1.5, "clipping_norm": 0.2})
    # the same server key and (run seed, round): a resumed round is replayed exactly; clients cannot replay it
    # (tests/test_privacy_threats.py::test_clients_cannot_reproduce_client_level_noise)
    np.testing.assert_array_equal(_round(again, 1, glob, updates, sampled=5), out)


def test_client_level_budget_stops_release_and_state_survives_resume(task_identity: None) -> None:
    dp = _client_dp({"client_level": "fixed", "clients_target_epsilon": 3.0, "clipping_norm": 0.5}, rounds=3)
    glob, upd = np.zeros(10, np.float32), [np.full(10, 0.01, np.float32)] * 5
    for rnd in (1, 2):
        assert _round(dp, rnd, glob, upd) is not None
    resumed = _client_dp({"client_level": "fixed", "clients_target_epsilon": 3.0, "clipping_norm": 0.5}, rounds=3)
    resumed.load_state(json.loads(json.dumps(dp.state())))  # through JSON, as state.json stores it
    assert resumed.epsilon() == pytest.approx(dp.epsilon()) and not resumed.exhausted()
    assert _round(resumed, 3, glob, upd) is not None
    assert resumed.epsilon() == pytest.approx(_opacus_epsilon([(resumed.noise_multiplier, 1.0, 3)]), rel=1e-9)
    assert 2.99 < resumed.epsilon() <= 3.0 and resumed.exhausted()
    assert _round(resumed, 4, glob, upd) is None  # a fourth release would break the budget


def test_adaptive_clipping_moves_its_norm_and_restores_it(task_identity: None) -> None:
    privacy = {"client_level": "adaptive", "clients_noise_multiplier": 0.5, "clipping_norm": 0.1,
               "clipped_count_stddev": 1.0}
    dp = _client_dp(privacy)
    glob = np.zeros(20, np.float32)
    _round(dp, 1, glob, [np.full(20, 1.0, np.float32)] * 5)  # every update is far above the clip
    assert dp.clipping_norm > 0.1  # the norm grows towards the median update norm
    resumed = _client_dp(privacy)
    resumed.load_state(dp.state())
    assert resumed.clipping_norm == dp.clipping_norm and resumed.epsilon() == pytest.approx(dp.epsilon())


# ------------------------------------------------------------------------------------- record level


def _data(n: int = 48, width: int = 12, seed: int = 0) -> Encoded:
    r = np.random.default_rng(seed)
    lengths = r.integers(2, width + 1, n)
    ids = r.integers(1, 50, (n, width)).astype(np.int32)
    ids[np.arange(width)[None] >= lengths[:, None]] = 0
    return Encoded(ids, lengths.astype(np.int64), r.integers(0, 2, n).astype(np.int64))


def _model() -> tuple[SentimentRNN, list[str]]:
    torch.manual_seed(0)
    model = SentimentRNN(ModelConfig(vocab_size=60, embed_dim=8, hidden_size=8, num_layers=2, dropout=0.0))
    return model, trainable_names(model, "fine-tune")


LOCAL = LocalTrainConfig(lr=0.01, epochs=1, batch_size=8, max_steps=4, proximal_mu=0.0, clip_norm=1.0, seed=5)


def _device_round(tmp_path: Path, privacy: PrivacySection, server_state: PrivacyState | None = None):
    model, names = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dp = RecordDP.parse(record_dp_config(privacy, 2, server_state))
    node = {"data-path": str(tmp_path / "reviews.csv"), "state-dir": str(tmp_path / "state")}
    arrays, metrics, extra = record_dp_train(model, _data(), LOCAL, names, task(), dp, node)
    changed = any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    return arrays, metrics, PrivacyState.from_dict(extra[REPLY_PRIVACY]), changed, device_state_file(node)


def test_device_keeps_its_budget_in_its_own_file_across_rounds(tmp_path: Path) -> None:
    privacy = PrivacySection(record_level=True, noise_multiplier=1.2, target_epsilon=6.0, max_grad_norm=0.5)
    q, steps = 8 / 48, 4
    _, m1, s1, changed, path = _device_round(tmp_path, privacy)
    assert changed and path is not None and path.is_file() and m1["dp-trained"] == 1.0
    assert m1["dp-epsilon"] == pytest.approx(_opacus_epsilon([(1.2, q, steps)]), rel=1e-9)
    # The next round's ClientApp is a new process: only the file carries the history. The server's
    # copy is ignored on a device (here a forged empty history that would reset the budget).
    forged = PrivacyState(1.2, 0.5, DELTA, 6.0, [])
    _, m2, s2, _, _ = _device_round(tmp_path, privacy, forged)
    assert s2.history == [(1.2, q, 2 * steps)]
    assert m2["dp-epsilon"] == pytest.approx(_opacus_epsilon([(1.2, q, 2 * steps)]), rel=1e-9)
    assert PrivacyState.from_json(path.read_text()) == s2


def test_exhausted_client_returns_its_weights_untrained(tmp_path: Path) -> None:
    privacy = PrivacySection(record_level=True, noise_multiplier=1.0, target_epsilon=0.2)
    model, names = _model()
    sent = {n: model.state_dict()[n].numpy().copy() for n in names}
    arrays, metrics, state, changed, path = _device_round(tmp_path, privacy)
    assert not changed and metrics["dp-trained"] == 0.0 and metrics["dp-exhausted"] == 1.0
    assert state.history == [] and metrics["dp-epsilon"] == 0.0
    assert all(np.array_equal(arrays[n], sent[n]) for n in names)
    assert all(math.isfinite(v) for v in metrics.values())  # the reply validator rejects NaN metrics
    assert PrivacyState.from_json(path.read_text()).history == []


def test_simulated_client_calibrates_its_noise_to_the_planned_rounds(tmp_path: Path) -> None:
    privacy = PrivacySection(record_level=True, target_epsilon=3.0)
    model, names = _model()
    dp = RecordDP.parse(record_dp_config(privacy, 2, None))
    _, m, extra = record_dp_train(model, _data(), LOCAL, names, task(), dp, {})  # no data-path: simulation, no file
    state = PrivacyState.from_dict(extra[REPLY_PRIVACY])
    two_rounds = _opacus_epsilon([(state.noise_multiplier, 8 / 48, 8)])
    assert 2.85 <= two_rounds <= 3.0 and m["dp-exhausted"] == 0.0  # calibrated on integer orders: a bit under
    assert not list(tmp_path.iterdir())


def test_dp_round_is_reproducible_whatever_ran_before() -> None:
    """Ray workers serve many clients in turn: a simulated round depends on the simulated fleet's key and
    (seed, round, client), never on what the worker drew before."""
    dp = RecordDP.parse(record_dp_config(PrivacySection(record_level=True, noise_multiplier=1.0), 1, None))
    outputs = []
    for earlier_draws in (1, 5):
        torch.manual_seed(0)
        model = SentimentRNN(ModelConfig(vocab_size=60, embed_dim=8, hidden_size=8, num_layers=2, dropout=0.5))
        torch.rand(earlier_draws)  # an earlier client's dropout on the same worker
        outputs.append(record_dp_train(model, _data(), LOCAL, trainable_names(model, "fine-tune"), task(), dp, {})[0])
    assert all(np.array_equal(outputs[0][n], outputs[1][n]) for n in outputs[0])


def _ledger_reply(client: int, state: PrivacyState | None, trained: bool, exhausted: bool) -> Message:
    meta = reply_metadata(f"m{client}", src_node_id=7)
    content = RecordDict({"metrics": MetricRecord({"client-id": client, "dp-trained": float(trained),
                                                   "dp-exhausted": float(exhausted),
                                                   "dp-noise-multiplier": state.noise_multiplier if state else 0.0,
                                                   "dp-epsilon": epsilon(state) if state else 0.0})})
    if state is not None:
        content[REPLY_PRIVACY] = ConfigRecord(state.to_dict())
    return Message(content, metadata=meta)


def test_ledger_drops_untrained_replies_and_excludes_spent_clients() -> None:
    ledger = PrivacyLedger(PrivacySection(record_level=True, noise_multiplier=1.0, target_epsilon=5.0))
    run = SimpleNamespace(rounds=10, clients_per_round=3, clients=10)
    ledger.setup(SimpleNamespace(cfg=SimpleNamespace(run=run)))  # type: ignore[arg-type]
    assert ledger.planned_rounds == 3
    assert ledger.configure(round_info(1), [0], np.random.default_rng())[0]["dp-state-json"] == ""
    s = {c: PrivacyState(1.0, 1.0, DELTA, 5.0, [(1.0, 0.1, 10 * (c + 1))]) for c in range(4)}
    replies = [_ledger_reply(0, s[0], True, False), _ledger_reply(1, s[1], True, True),
               _ledger_reply(2, s[2], False, True), _ledger_reply(3, None, True, False)]
    kept, metrics = ledger.on_replies(round_info(1, prefix="m"), replies)
    assert [int(r.content["metrics"]["client-id"]) for r in kept] == [0, 1]
    assert metrics["dp_record_skipped"] == 1 and metrics["dp_record_unaccounted"] == 1
    assert metrics["dp_record_exhausted"] == 2 and ledger.candidates(2, list(range(5))) == [0, 3, 4]
    assert metrics["dp_record_epsilon"] == {str(c): pytest.approx(epsilon(s[c])) for c in range(3)}
    assert metrics["dp_record_epsilon_max"] == pytest.approx(epsilon(s[2]))
    sent = ledger.configure(round_info(2), [0], np.random.default_rng())[0]
    assert PrivacyState.from_json(sent["dp-state-json"]).history == s[0].history  # the state goes back to the client
    restored = PrivacyLedger(ledger.cfg)
    restored.load_state(*ledger.state())
    assert restored.states == ledger.states and restored.exhausted == ledger.exhausted


# ------------------------------------------------------------------------------------- end to end

E2E_CONFIG = """
[run]
clients = 8
rounds = {rounds}
clients_per_round = 4
target = "amazon"
seed = 0
[client]
batch_size = 8
lr = 0.002
max_steps = 3
[server]
retention_examples = 64
target_test_examples = 128
keep_checkpoints = 0
[privacy]
record_level = true
target_epsilon = 2.0
planned_rounds = 2
{client_level}
"""
CLIENT_LEVEL = ('client_level = "fixed"\nclients_noise_multiplier = 2.0\nclipping_norm = 0.5\n'
                '[robust]\nmax_norm_ratio = 0')  # relative to the round's median: refused under client-level DP


def _simulate(args: list[str], cache: Path) -> None:
    env = {**os.environ, "FEDRNN_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "fedrnn.simulate", *args], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]



@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: tuple[Path, dict]) -> Path:
    """Record- and client-level DP: 2 rounds, then ``--resume`` with the run extended to 4."""
    tmp = tmp_path_factory.mktemp("dp")
    config, out = tmp / "dp.toml", tmp / "run"
    config.write_text(E2E_CONFIG.format(rounds=2, client_level=CLIENT_LEVEL))
    _simulate(["--config", str(config), "--teacher", str(tiny_teacher[0]), "--out", str(out)], tmp / "cache")
    _simulate(["--resume", str(out), "--rounds", "4"], tmp / "cache")
    return out


def _sample_rates(run: Path) -> dict[int, float]:
    """Each simulated client's Poisson rate: batch size over its training examples (its shard minus hold-out)."""
    cfg = config_from_dict(json.loads((run / "config.json").read_text()))
    shards = load_partitions(str(run / "partitions.npz"))
    return {c: cfg.client.batch_size / len(split_holdout(s, cfg.client.holdout_fraction, cfg.run.seed, c)[0])
            for c, s in enumerate(shards)}


def test_record_epsilon_covers_every_round_a_client_trained_across_resume(dp_run: Path) -> None:
    rows = RunDir(dp_run).read_metrics()[1:]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    q = _sample_rates(dp_run)
    states = json.loads((dp_run / "state.json").read_text())["plugins"]["privacy"]["states"]
    trained: dict[int, list[int]] = {}
    spent: dict[int, float] = {}
    for r in rows:
        assert r["dp_record_skipped"] == 0 and r["dp_record_unaccounted"] == 0 and r["trained"] == len(r["clients"])
        assert sorted(map(int, r["dp_record_epsilon"])) == r["clients"]
        for c in r["clients"]:
            trained.setdefault(c, []).append(r["round"])
            sigma = states[str(c)]["noise-multiplier"]
            spent[c] = _opacus_epsilon([(sigma, q[c], 3 * len(trained[c]))])
            assert r["dp_record_epsilon"][str(c)] == pytest.approx(spent[c], rel=1e-9)
        # the distribution covers every client that has trained so far, not only this round's
        assert r["dp_record_participants"] == len(spent)
        assert r["dp_record_epsilon_max"] == pytest.approx(max(spent.values()))
        assert r["dp_record_epsilon_mean"] == pytest.approx(np.mean(list(spent.values())))
        assert r["dp_record_epsilon_p10"] <= r["dp_record_epsilon_p50"] <= r["dp_record_epsilon_p90"]
    # the resumed half continued histories from the first half (state.json -> ledger -> clients)
    assert any(rs[0] <= 2 < rs[1] for rs in trained.values() if len(rs) == 2)


def test_record_budget_stops_a_client_whose_next_round_would_exceed_it(dp_run: Path) -> None:
    """Independently: after each round, a client is out iff one more 3-step round would take it past 2.0."""
    rows = RunDir(dp_run).read_metrics()[1:]
    q = _sample_rates(dp_run)
    ledger = json.loads((dp_run / "state.json").read_text())["plugins"]["privacy"]
    sigma = {int(c): s["noise-multiplier"] for c, s in ledger["states"].items()}
    steps: dict[int, int] = {}
    out: set[int] = set()
    for r in rows:
        assert not out & set(r["clients"]), f"round {r['round']} selected clients out of budget"
        for c in r["clients"]:
            steps[c] = steps.get(c, 0) + 3
            if _opacus_epsilon([(sigma[c], q[c], steps[c] + 3)]) > 2.0:
                out.add(c)
        assert r["dp_record_exhausted"] == len(out) and r["dp_record_epsilon_max"] <= 2.0
    assert sorted(ledger["exhausted"]) == sorted(out) and out  # the budget did stop clients
    # noise calibrated for 2 planned rounds: every client fits 2, and 2 nearly spend the budget
    assert min(steps[c] for c in out) >= 6
    assert all(1.9 <= _opacus_epsilon([(sigma[c], q[c], 6)]) <= 2.0 for c in sigma)


def test_client_level_epsilon_per_round_across_resume(dp_run: Path) -> None:
    rows = RunDir(dp_run).read_metrics()[1:]
    for r in rows:
        trained = r["trained"] > 0
        assert r["dp_client_releases"] == sum(x["trained"] > 0 for x in rows if x["round"] <= r["round"])
        assert r["dp_client_epsilon"] == pytest.approx(_opacus_epsilon([(2.0, 1.0, r["dp_client_releases"])]),
                                                       rel=1e-9)
        # m = the clients sampled, whoever answered
        assert r["dp_client_noise_std"] == (pytest.approx(2.0 * 0.5 / len(r["selected"])) if trained else 0.0)
        assert r["dp_client_sampled"] == (len(r["selected"]) if trained else 0) and r["dp_client_clip"] in (0.5, None)


@pytest.mark.slow
def test_same_seed_and_kill_resume_give_the_same_dp_metrics(dp_run: Path, tiny_teacher: tuple[Path, dict]) -> None:
    """A fresh 4-round run of the same config, SIGKILLed after a round and resumed, ends with exactly the metrics of
    ``dp_run`` (2 rounds, then resumed to 4): DP noise is secret (keyed) yet reproducible from the same keys."""
    tmp = dp_run.parent
    config, out = tmp / "dp4.toml", tmp / "killed"
    config.write_text(E2E_CONFIG.format(rounds=4, client_level=CLIENT_LEVEL))
    env = {**os.environ, "FEDRNN_CACHE_DIR": str(tmp / "cache"), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "fedrnn.simulate", "--config", str(config), "--teacher", str(tiny_teacher[0]),
           "--out", str(out)]
    assert 1 <= kill_after_round(cmd, out, env, ROOT, TIMEOUT) < 4
    _simulate(["--resume", str(out)], tmp / "cache")

    resumed, reference = RunDir(out).read_metrics(), RunDir(dp_run).read_metrics()
    assert [r["round"] for r in resumed] == [0, 1, 2, 3, 4]
    for a, b in zip(resumed, reference, strict=True):
        # dp_run's round 2 ended its first leg, so it also evaluated on clients; otherwise the rows match key by key
        assert set(a) <= set(b) and (a["round"] == 2 or set(a) == set(b))
        assert {k: v for k, v in a.items() if "seconds" not in k} == {k: b[k] for k in a if "seconds" not in k}
    assert all(r["dp_client_noise_std"] > 0 and r["dp_record_epsilon"] for r in resumed[1:])


@pytest.mark.slow
def test_client_level_noise_changes_the_model(dp_run: Path, tiny_teacher: tuple[Path, dict]) -> None:
    """Same seed, same record-level clients, no client-level DP: round 1 differs by the server's noise."""
    tmp = dp_run.parent
    config, out = tmp / "record-only.toml", tmp / "record-only"
    config.write_text(E2E_CONFIG.format(rounds=1, client_level=""))
    _simulate(["--config", str(config), "--teacher", str(tiny_teacher[0]), "--out", str(out)], tmp / "cache")
    with_noise = load_file(str(dp_run / "checkpoints" / "round_001.safetensors"))
    without = load_file(str(out / "checkpoints" / "round_001.safetensors"))
    names = trainable_names(load_checkpoint(tiny_teacher[0])[0], "fine-tune")
    diff = np.concatenate([(with_noise[k] - without[k]).ravel() for k in names])
    # clipping and uniform weights move the model by at most ~C = 0.5 in norm; the noise, std 0.25 per coordinate
    assert float(diff.std()) == pytest.approx(RunDir(dp_run).read_metrics()[1]["dp_client_noise_std"], rel=0.1)
    assert np.array_equal(with_noise["embedding.weight"], without["embedding.weight"])  # frozen: never noised
