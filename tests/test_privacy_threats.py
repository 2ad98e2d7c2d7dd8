"""Privacy against the parties in the run: the server, the other clients, and the devices' own policy.

Each attack test plays one party with everything that party sees (messages, replies, run config;
for the client-level attack even every other client's update) and tries to regenerate the DP noise
and subtract it. The attacker only subtracts a candidate that makes the released update smaller
(a right guess leaves just the clipped signal, far below the noise), so a failed attack leaves the
whole noise and a successful one (the pre-fix seeding from run seed, round and client id) leaves
almost nothing.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from messages import reply_metadata, round_info, task

import clients.client_app as client_app
import fedrnn.plugins.record_dp as record_dp
import fedrnn.privacy.dp_sgd as dp_sgd
from fedrnn.config import ConfigError, PrivacySection, RobustSection, config_from_dict
from fedrnn.data.tokenizer import Encoded
from fedrnn.federation.local import LocalTrainConfig
from fedrnn.federation.loop import OneNodeGrid
from fedrnn.federation.messages import CONFIG, REPLY_PRIVACY, REPLY_REFUSAL, Fault, RecordDP, Refusal
from fedrnn.federation.strategies import make_strategy
from fedrnn.federation.wire import from_record, to_record
from fedrnn.model.rnn import ModelConfig, SentimentRNN, trainable_names
from fedrnn.plugins.client_dp import ClientLevelDP, ClientLevelLedger
from fedrnn.plugins.record_dp import record_dp_config, record_dp_train
from fedrnn.plugins.refusals import RefusalRecord
from fedrnn.plugins.robust import ReplyValidator
from fedrnn.privacy.accounting import PrivacyState
from fedrnn.privacy.dp_sgd import train_dp
from fedrnn.privacy.entropy import keyed_generator, load_key
from fedrnn.privacy.policy import DevicePolicy

SIGMA, CLIP, LR = 1.0, 0.5, 0.01
LOCAL = LocalTrainConfig(lr=LR, epochs=1, batch_size=8, max_steps=1, proximal_mu=0.0, clip_norm=1.0, seed=5)


def _best_guess(released: np.ndarray, candidates: list[np.ndarray]) -> np.ndarray:
    """The attacker's estimate of the noiseless update: the release minus the candidate noise that shrinks it most.

    A right candidate leaves only the clipped signal; a wrong one (independent noise) makes the
    release larger, so the attacker keeps the release as it is.
    """
    best = released
    for noise in candidates:
        if np.linalg.norm(released - noise) < np.linalg.norm(best):
            best = released - noise
    return best


# ------------------------------------------------------------------------------------- record level


def _data(n: int = 48, width: int = 12) -> Encoded:
    r = np.random.default_rng(0)
    lengths = r.integers(2, width + 1, n)
    ids = r.integers(1, 50, (n, width)).astype(np.int32)
    ids[np.arange(width)[None] >= lengths[:, None]] = 0
    return Encoded(ids, lengths.astype(np.int64), r.integers(0, 2, n).astype(np.int64))


def _flat(model: SentimentRNN, names: list[str]) -> np.ndarray:
    state = model.state_dict()
    return np.concatenate([state[n].numpy().ravel() for n in names]).astype(np.float64)


def _fresh_model() -> tuple[SentimentRNN, list[str]]:
    torch.manual_seed(0)
    model = SentimentRNN(ModelConfig(vocab_size=60, embed_dim=8, hidden_size=8, num_layers=2, dropout=0.0))
    return model, trainable_names(model, "fine-tune")


def _device_update(dp: RecordDP, node: dict, state: PrivacyState | None = None,
                   rng: np.random.Generator | None = None) -> np.ndarray:
    """What a client releases (``record_dp_train``), or, given ``state`` and ``rng``, ``train_dp`` on the same data."""
    model, names = _fresh_model()
    start = _flat(model, names)
    if state is None:
        record_dp_train(model, _data(), LOCAL, names, task(), dp, node)
    else:
        rng.integers(2**63)  # what record_dp_train draws first (its dropout seed)
        train_dp(model, _data(), state, mode="fine-tune", batch_size=8, lr=LR, rng=rng, steps=1)
    return _flat(model, names) - start


@pytest.mark.parametrize("where", ["simulation", "device"])
def test_server_cannot_remove_record_dp_noise(where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # SGD: one step's update is -lr (clipped sum + noise) / (q n), linear in the noise, so its scale is known
    monkeypatch.setattr(dp_sgd, "_make_optimizer", lambda name, params, lr: torch.optim.SGD(params, lr=lr))
    drawn: list[dict] = []  # the device's OS entropy, recorded only so the test (not the server) can replay it
    real_fresh = record_dp.fresh_generator

    def recorded_fresh() -> np.random.Generator:
        g = real_fresh()
        drawn.append(copy.deepcopy(g.bit_generator.state))
        return g

    monkeypatch.setattr(record_dp, "fresh_generator", recorded_fresh)
    privacy = PrivacySection(record_level=True, noise_multiplier=SIGMA, max_grad_norm=CLIP)
    message = record_dp_config(privacy, 2, None)  # with task(): everything the server sent
    dp = RecordDP.parse(message)
    node = {"data-path": str(tmp_path / "reviews.csv"), "state-dir": str(tmp_path / "state")} if where == "device" \
        else {}
    released = _device_update(dp, node)

    # The test's oracle: the same round without noise, from the device's own generator.
    if where == "device":
        replay = np.random.default_rng()
        replay.bit_generator.state = drawn[0]
    else:
        replay = record_dp.round_generator(task(), {})
    noiseless = _device_update(dp, node, PrivacyState(0.0, CLIP, 1e-5), replay)
    d, expected_batch = released.size, 8.0  # q n = batch size
    noise_norm = LR * SIGMA * CLIP * math.sqrt(d) / expected_batch
    assert np.linalg.norm(released - noiseless) == pytest.approx(noise_norm, rel=0.1)  # the noise is there

    # The server: reruns the client's code on what it saw (even the true data), without the device's
    # secret (its own key; on a device, its own entropy), and the pre-fix derivation from the seeds it sent.
    monkeypatch.setenv("FEDRNN_STATE_DIR", str(tmp_path / "server-side"))
    candidates = []
    for seed_rng in (lambda: record_dp.round_generator(task(), {}), lambda: np.random.default_rng(LOCAL.seed),
                     lambda: np.random.default_rng([0, 1, 0])):
        noisy = _device_update(dp, node, PrivacyState(SIGMA, CLIP, 1e-5), seed_rng())
        candidates.append(noisy - _device_update(dp, node, PrivacyState(0.0, CLIP, 1e-5), seed_rng()))
    candidates.append(_device_update(dp, node) - noiseless)  # its own rerun of record_dp_train
    residual = _best_guess(released, candidates) - noiseless
    assert np.linalg.norm(residual) == pytest.approx(noise_norm, rel=0.2)


def test_simulated_devices_reproduce_their_round_only_with_their_key(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Same key, same round: same draws (reproducible runs, exact resume); another key: different ones."""
    first = record_dp.round_generator(task(), {}).random(4)
    np.testing.assert_array_equal(record_dp.round_generator(task(), {}).random(4), first)
    assert not np.array_equal(record_dp.round_generator(task(client_id=1), {}).random(4), first)
    monkeypatch.setenv("FEDRNN_STATE_DIR", str(tmp_path))
    assert not np.array_equal(record_dp.round_generator(task(), {}).random(4), first)
    key = tmp_path / "simulated-devices.key"
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 32
    assert load_key("simulated-devices.key") == key.read_bytes()  # created once, then read back
    key.write_bytes(b"short")
    with pytest.raises(ValueError, match="simulated-devices.key.*32 bytes"):
        load_key("simulated-devices.key")


# ------------------------------------------------------------------------------------- client level


def _client_dp(privacy: dict, clients_per_round: int = 5, robust: dict | None = None):
    cfg = config_from_dict({"run": {"clients": 20, "clients_per_round": clients_per_round, "rounds": 10, "seed": 3},
                            "privacy": privacy, "robust": robust or {"max_norm_ratio": 0.0}})
    ledger = ClientLevelLedger(cfg)
    strategy = ledger.wrap_strategy(make_strategy(cfg))
    assert isinstance(strategy, ClientLevelDP)
    return cfg, ledger, strategy


def _reply(arrays: dict[str, np.ndarray], client: int, **metrics: float) -> Message:
    content = RecordDict({"arrays": to_record(arrays), "metrics": MetricRecord(
        {"client-id": client, "num-examples": 10, "train-loss": 0.5, "train-seconds": 1.0, **metrics})})
    return Message(content, metadata=reply_metadata(f"m{client}", src_node_id=7))


def _aggregate(dp: ClientLevelDP, ledger: ClientLevelLedger, rnd: int, glob: np.ndarray, updates: dict[int, np.ndarray],
               sampled: list[int], validator: ReplyValidator | None = None) -> np.ndarray:
    """One round as the loop runs it: configure (m = sampled), validate the replies, aggregate."""
    info = round_info(rnd, {"w": glob}, range(20), prefix="m")
    ledger.configure(info, sampled, np.random.default_rng())
    list(dp.configure_train(rnd, to_record({"w": glob}), ConfigRecord(), OneNodeGrid(7)))
    replies = [_reply({"w": (glob + u).astype(np.float32)}, c) for c, u in updates.items()]
    if validator is not None:
        replies, _ = validator.on_replies(info, replies)
    arrays, _ = dp.aggregate_train(rnd, replies)
    assert arrays is not None
    return from_record(arrays)["w"].astype(np.float64)


def _pre_fix_noise(seed: int, rnd: int, std: float, d: int) -> np.ndarray:
    """The noise as it was drawn before: NumPy's global generator seeded from (run seed, round)."""
    rng = np.random.RandomState(int(np.random.SeedSequence([seed, rnd, 0xD1F]).generate_state(1)[0]))
    return rng.normal(0, std, d)


def test_clients_cannot_reproduce_client_level_noise(task_identity: None, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _, ledger, dp = _client_dp({"client_level": "fixed", "clients_noise_multiplier": SIGMA, "clipping_norm": CLIP})
    d, m, rnd = 20_000, 5, 2
    rng = np.random.default_rng(1)
    glob = rng.normal(size=d).astype(np.float32).astype(np.float64)
    updates = {c: rng.normal(size=d) * 0.01 for c in range(m)}
    out = _aggregate(dp, ledger, rnd, glob, updates, list(range(m)))
    # Colluding clients know every update, hence the noiseless aggregate exactly.
    clipped = [u * min(1.0, CLIP / np.linalg.norm(u)) for u in updates.values()]
    noiseless = glob + np.sum(clipped, axis=0) / m
    std = SIGMA * CLIP / m
    noise_norm = std * math.sqrt(d)
    assert np.linalg.norm(out - noiseless) == pytest.approx(noise_norm, rel=0.05)
    # From the seed (3) and round in their messages: the pre-fix derivation, plain seeds, and a rerun
    # of the server's own code (with a server key of their own: they do not hold the server's).
    candidates = [_pre_fix_noise(3, rnd, std, d), np.random.default_rng([3, rnd]).normal(0, std, d),
                  np.random.default_rng(3).normal(0, std, d)]
    monkeypatch.setenv("FEDRNN_STATE_DIR", str(tmp_path / "client-side"))
    _, ledger2, rerun = _client_dp({"client_level": "fixed", "clients_noise_multiplier": SIGMA, "clipping_norm": CLIP})
    candidates.append(_aggregate(rerun, ledger2, rnd, glob, updates, list(range(m))) - noiseless)
    residual = _best_guess(out - noiseless, candidates)
    assert np.linalg.norm(residual) == pytest.approx(noise_norm, rel=0.2)
    # while the server, with its key, replays the round exactly (resume)
    monkeypatch.undo()
    _, ledger3, again = _client_dp({"client_level": "fixed", "clients_noise_multiplier": SIGMA, "clipping_norm": CLIP})
    np.testing.assert_array_equal(_aggregate(again, ledger3, rnd, glob, updates, list(range(m))), out)


def test_adaptive_clipping_noise_matches_accounting(task_identity: None) -> None:
    """Rounds where the norm grows (every update clipped) then shrinks (none): noise = sigma_u x the clip used / m."""
    _, ledger, dp = _client_dp({"client_level": "adaptive", "clients_noise_multiplier": 0.5, "clipping_norm": 1.0,
                                "clipped_count_stddev": 1.0, "clip_norm_lr": 0.2})
    d, m = 40_000, 5
    rng = np.random.default_rng(2)
    glob = np.zeros(d)
    used = []
    for rnd, scale in enumerate([10.0, 10.0, 10.0, 1e-4, 1e-4, 1e-4], start=1):
        updates = {c: rng.normal(size=d) * scale / math.sqrt(d) for c in range(m)}  # norm ~scale
        clip = dp.clipping_norm
        out = _aggregate(dp, ledger, rnd, glob, updates, list(range(m)))
        noiseless = np.sum([u * min(1.0, clip / np.linalg.norm(u)) for u in updates.values()], axis=0) / m
        accounted = dp.update_noise_multiplier * clip / m
        release = ledger.after_aggregate(round_info(rnd), OneNodeGrid(7), {})
        assert release["dp_client_clip"] == clip and release["dp_client_noise_std"] == pytest.approx(accounted)
        assert float(np.std(out - noiseless)) == pytest.approx(accounted, rel=0.02)
        used.append(clip)
    assert used[0] < used[1] < used[2] < used[3] and used[3] > used[4] > used[5]  # grew, then shrank


def test_client_level_sensitivity_is_bounded(task_identity: None) -> None:
    """Removing any one client (huge, odd-metrics, malformed or ordinary) moves the pre-noise aggregate <= C/m."""
    cfg, ledger, dp = _client_dp({"client_level": "fixed", "clients_noise_multiplier": 1e-9, "clipping_norm": CLIP})
    validator = ReplyValidator(cfg.robust)
    validator.setup(SimpleNamespace(cfg=cfg, simulated=False))  # type: ignore[arg-type]
    d, sampled = 50, list(range(8))  # 8 sampled, client 7 never answers
    rng = np.random.default_rng(3)
    glob = rng.normal(size=d).astype(np.float32).astype(np.float64)
    updates = {c: rng.normal(size=d) * s for c, s in zip(range(7), (0.01, 0.02, 0.3, 0.05, 30.0, 0.02, 0.04),
                                                         strict=True)}
    updates[6] = np.full(d, np.nan)  # malformed: rejected for itself
    full = _aggregate(dp, ledger, 1, glob, updates, sampled, validator)
    for j in updates:
        without = _aggregate(dp, ledger, 1, glob, {c: u for c, u in updates.items() if c != j}, sampled, validator)
        assert np.linalg.norm(full - without) <= CLIP / len(sampled) * (1 + 1e-5), j


def test_client_level_dp_refuses_median_relative_rejection() -> None:
    with pytest.raises(ConfigError, match=r"robust\.max_norm_ratio must be 0 with privacy\.client_level"):
        _client_dp({"client_level": "fixed", "clients_noise_multiplier": 1.0}, robust={"max_norm_ratio": 10.0})
    cfg = config_from_dict({"privacy": {"client_level": "fixed", "clients_noise_multiplier": 1.0},
                            "robust": {"max_norm_ratio": 0.0}})
    validator = ReplyValidator(RobustSection(max_norm_ratio=3.0))  # a plugin built by hand is refused as well
    with pytest.raises(ConfigError, match=r"robust\.max_norm_ratio"):
        validator.setup(SimpleNamespace(cfg=cfg, simulated=False))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- device policy


def test_device_policy_refuses_weaker_privacy() -> None:
    policy = DevicePolicy.from_node_config({"dp-required": True, "dp-max-epsilon": 2.0, "dp-delta": 1e-6,
                                            "dp-min-noise-multiplier": 0.8, "dp-max-clip-norm": 1.0})
    assert "dp-required" in policy.refusal(record_dp=False)
    assert policy.refusal(record_dp=True, noise_multiplier=1.0, target_epsilon=1.0, max_grad_norm=0.5,
                          delta=1e-7) is None  # tighter on every bound
    for ask, key in (({"target_epsilon": 4.0}, "dp-max-epsilon"), ({"delta": 1e-5}, "dp-delta"),
                     ({"noise_multiplier": 0.5}, "dp-min-noise-multiplier"), ({"max_grad_norm": 2.0},
                                                                              "dp-max-clip-norm")):
        assert key in policy.refusal(record_dp=True, **({"max_grad_norm": 1.0} | ask)), key
    assert DevicePolicy.from_node_config({}).refusal(record_dp=False) is None
    with pytest.raises(ValueError, match="dp-max-epsilon"):
        DevicePolicy.from_node_config({"dp-max-epsilon": "lots"})
    with pytest.raises(ValueError, match="dp-required"):
        DevicePolicy.from_node_config({"dp-required": 1})


def test_device_fills_in_its_own_bounds(tmp_path: Path) -> None:
    """A server leaving the budget open (noise only) gets the device's budget and noise floor in the state file."""
    node = {"data-path": str(tmp_path / "r.csv"), "state-dir": str(tmp_path / "state"), "dp-max-epsilon": 3.0,
            "dp-min-noise-multiplier": 1.5}
    dp = RecordDP.parse(record_dp_config(PrivacySection(record_level=True, noise_multiplier=1.5), 2, None))
    model, names = _fresh_model()
    _, metrics, extra = record_dp_train(model, _data(), LOCAL, names, task(), dp, node)
    state = PrivacyState.from_dict(extra[REPLY_PRIVACY])
    assert state.target_epsilon == 3.0 and state.noise_multiplier == 1.5 and metrics["dp-trained"] == 1.0


def _train_message(**extra: object) -> Message:
    config = ConfigRecord({**task(client_id=42).to_record(), **extra})
    return Message(RecordDict({CONFIG: config}), dst_node_id=1, message_type="train")


@pytest.mark.parametrize(("node", "extra", "refused"), [
    ({"data-path": "reviews.csv"}, Fault("crash").to_record(), "instruction"),
    ({"data-path": "reviews.csv"}, {"attack": "sign-flip"}, "instruction"),
    ({"dp-required": True}, {}, "dp"),
    ({"dp-max-epsilon": 1.0}, record_dp_config(PrivacySection(record_level=True, target_epsilon=8.0), 2, None), "dp"),
])
def test_client_app_refuses_before_it_trains(task_identity: None, node: dict, extra: dict, refused: str) -> None:
    """A real device refuses faults and attacks; any device refuses less privacy than its policy. Nothing runs:
    the message names no data, teacher or model, so training would fail."""
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    reply = client_app.train(_train_message(**extra), context)
    refusal = Refusal.parse(reply.content.config_records[REPLY_REFUSAL])
    assert refusal.refused == refused and reply.content["metrics"][refusal.metric] == 1.0
    assert reply.content["metrics"]["client-id"] == 42 and not reply.content.array_records


def test_server_records_refusals_and_drops_them(task_identity: None) -> None:
    refusals = [Refusal("dp", "dp-required = true but ..."), Refusal("instruction", "a real device does not ...")]
    replies = [Message(RecordDict({"metrics": MetricRecord({"client-id": c, r.metric: 1.0}),
                                   REPLY_REFUSAL: ConfigRecord(r.to_record())}),
                       metadata=reply_metadata(f"m{c}")) for c, r in enumerate(refusals)]
    ordinary = _reply({"w": np.zeros(2, np.float32)}, 5)
    kept, metrics = RefusalRecord().on_replies(round_info(1, prefix="m"), [*replies, ordinary])
    assert kept == [ordinary]
    assert metrics == {"dp_refused": 1, "dp_refused_reasons": {"0": refusals[0].reason},
                       "refused_instructions": 1, "refused_instructions_reasons": {"1": refusals[1].reason}}


def test_keyed_generators_differ_by_label_and_key() -> None:
    a = keyed_generator(b"k" * 32, "record-dp", 0, 1, 2).random(3)
    np.testing.assert_array_equal(keyed_generator(b"k" * 32, "record-dp", 0, 1, 2).random(3), a)
    assert not np.array_equal(keyed_generator(b"k" * 32, "record-dp", 0, 1, 3).random(3), a)
    assert not np.array_equal(keyed_generator(b"j" * 32, "record-dp", 0, 1, 2).random(3), a)
