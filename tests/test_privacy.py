"""Record-level DP-SGD: per-sample clipping, noise, Opacus agreement, accounting, budgets."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from torch.nn import functional as F

from fedrnn.data.tokenizer import Encoded
from fedrnn.model.rnn import ModelConfig, SentimentRNN, set_trainable
from fedrnn.privacy.accounting import (
    PrivacyState,
    calibrate_noise,
    epsilon,
    new_privacy_state,
    planned_steps,
    remaining_budget,
    sample_rate,
)
from fedrnn.privacy.batching import length_chunks, poisson_batches
from fedrnn.privacy.dp_model import from_dp_state, to_dp_model
from fedrnn.privacy.dp_sgd import BUDGET_EXHAUSTED, TRAINED, train_dp
from fedrnn.privacy.per_sample import clipped_grad_sum, per_sample_taps

TINY = ModelConfig(vocab_size=200, embed_dim=16, hidden_size=16, dropout=0.0)
MODES = ("full", "fine-tune", "feature-extraction")


def _data(n: int = 40, width: int = 14, seed: int = 0) -> Encoded:
    """Random reviews of varied length, right-padded with 0, with repeated tokens."""
    r = np.random.default_rng(seed)
    lengths = r.integers(1, width + 1, n)
    ids = r.integers(1, 30, (n, width)).astype(np.int32)  # small id range: tokens repeat within a review
    ids[np.arange(width)[None] >= lengths[:, None]] = 0
    return Encoded(ids, lengths.astype(np.int64), r.integers(0, 2, n).astype(np.int64))


def _model(cfg: ModelConfig = TINY, seed: int = 0) -> SentimentRNN:
    torch.manual_seed(seed)
    return SentimentRNN(cfg)


def _per_example_grads(model: SentimentRNN, data: Encoded, index: np.ndarray) -> list[list[torch.Tensor]]:
    """Reference: one autograd pass per example on the plain fused model, trimmed to its length."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in index:
        n = int(data.lengths[i])
        ids = torch.from_numpy(data.ids[i : i + 1, :n].astype(np.int64))
        loss = F.cross_entropy(model(ids, torch.tensor([n])), torch.tensor([int(data.labels[i])]))
        out.append(list(torch.autograd.grad(loss, params)))
    return out


def _clipped_mean(grads: list[list[torch.Tensor]], clip: float, denominator: float) -> list[torch.Tensor]:
    norms = [math.sqrt(sum(float(g.square().sum()) for g in gs)) for gs in grads]
    factors = [min(1.0, clip / (n + 1e-6)) for n in norms]
    return [sum(f * gs[j] for f, gs in zip(factors, grads, strict=True)) / denominator for j in range(len(grads[0]))]


def _state_dict_diff(a: SentimentRNN, b: SentimentRNN) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


# --- the DPLSTM twin ---------------------------------------------------------------------


def test_dp_model_round_trip_is_exact_and_computes_the_same_function() -> None:
    plain = _model()
    set_trainable(plain, "fine-tune")
    dp = to_dp_model(plain)
    assert type(dp.rnn[0]["fwd"]).__name__ == "DPLSTM"
    assert {n: p.requires_grad for n, p in dp.named_parameters()} == {
        n: p.requires_grad for n, p in plain.named_parameters()
    }
    back = from_dp_state(dp)
    assert list(back) == list(plain.state_dict())  # alias keys such as rnn.0.fwd.l0.ih.weight dropped
    restored = SentimentRNN(TINY)
    restored.load_state_dict(back)  # strict: loads into nn.LSTM exactly
    for k, v in plain.state_dict().items():
        assert torch.equal(restored.state_dict()[k], v)
    data = _data()
    ids, lengths = torch.from_numpy(data.ids.astype(np.int64)), torch.from_numpy(data.lengths)
    with torch.no_grad():
        torch.testing.assert_close(dp.eval()(ids, lengths), plain.eval()(ids, lengths), atol=1e-5, rtol=1e-5)


# --- per-sample gradients --------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("bidirectional", "pooling"), [(False, "meanmax"), (True, "last"), (True, "mean")])
def test_fused_per_sample_gradients_are_exact(mode: str, bidirectional: bool, pooling: str) -> None:
    cfg = ModelConfig(vocab_size=200, embed_dim=8, hidden_size=6, dropout=0.0, bidirectional=bidirectional,
                      pooling=pooling)
    model, data = _model(cfg), _data(n=6)
    set_trainable(model, mode)
    index = np.arange(6)
    ref = _per_example_grads(model, data, index)
    ref_norms = torch.tensor([math.sqrt(sum(float(g.square().sum()) for g in gs)) for gs in ref])
    clip = float(ref_norms.median())  # half the examples get clipped
    ids = torch.from_numpy(data.ids.astype(np.int64))
    with per_sample_taps(model) as taps:
        _, _, norms = clipped_grad_sum(model, taps, ids, torch.from_numpy(data.lengths),
                                       torch.from_numpy(data.labels), clip)
    torch.testing.assert_close(norms, ref_norms, atol=1e-5, rtol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    for p, r in zip(params, _clipped_mean(ref, clip, 1.0), strict=True):
        torch.testing.assert_close(p.grad, r, atol=1e-6, rtol=1e-5)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert set(model.state_dict()) == set(SentimentRNN(cfg).state_dict())  # layers put back


def test_clipped_per_sample_norms_are_bounded() -> None:
    model, data = _model(), _data(n=8)
    ids = torch.from_numpy(data.ids.astype(np.int64))
    with per_sample_taps(model) as taps:
        for k in range(8):  # each example alone: its clipped gradient is the accumulated grad
            model.zero_grad(set_to_none=True)
            _, _, norm = clipped_grad_sum(model, taps, ids[k : k + 1], torch.from_numpy(data.lengths[k : k + 1]),
                                          torch.from_numpy(data.labels[k : k + 1]), 0.05)
            clipped = math.sqrt(sum(float(p.grad.square().sum()) for p in model.parameters()))
            assert float(norm) > 0.05  # the bound binds, so this checks clipping rather than a no-op
            assert clipped == pytest.approx(0.05, rel=1e-4)


def test_partially_trainable_layer_is_refused() -> None:
    model = _model()
    model.head.bias.requires_grad_(False)
    with pytest.raises(ValueError, match="wholly trainable"), per_sample_taps(model):
        pass


# --- the DP-SGD step -------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["microbatch", "fused"])
@pytest.mark.parametrize("mode", MODES)
def test_noiseless_update_is_mean_of_clipped_per_sample_gradients(mode: str, engine: str) -> None:
    model, data = _model(), _data()
    set_trainable(model, mode)
    before = copy.deepcopy(model)
    state = PrivacyState(noise_multiplier=0.0, max_grad_norm=0.3, delta=1e-5)
    batch_size, lr = 8, 0.5
    (index,) = poisson_batches(len(data), sample_rate(len(data), batch_size), 1, np.random.default_rng(3))
    train_dp(model, data, state, mode=mode, batch_size=batch_size, lr=lr, steps=1, optimizer="sgd", engine=engine,
             rng=np.random.default_rng(3))
    assert not model.embedding.sparse  # the microbatch engine's sparse embedding gradients are switched back off
    expected = _clipped_mean(_per_example_grads(before, data, index), 0.3, denominator=batch_size)
    trainable = [n for n, p in before.named_parameters() if p.requires_grad]
    for name, g in zip(trainable, expected, strict=True):
        step = before.state_dict()[name] - model.state_dict()[name]
        torch.testing.assert_close(step, lr * g, atol=1e-6, rtol=1e-4)
    for name, p in before.named_parameters():
        if name not in trainable:
            assert torch.equal(p, model.state_dict()[name]), f"frozen {name} changed"


def test_noise_has_the_calibrated_standard_deviation() -> None:
    data, lr, batch_size, sigma, clip = _data(), 1.0, 8, 2.0, 0.5
    runs = []
    for noise in (0.0, sigma):
        model = _model()
        train_dp(model, data, PrivacyState(noise, clip, 1e-5), mode="full", batch_size=batch_size, lr=lr, steps=1,
                 optimizer="sgd", rng=np.random.default_rng(11))
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    noise = (runs[0] - runs[1]) / lr  # same batch and clipping, so only the noise differs
    expected_std = sigma * clip / batch_size  # N(0, (sigma C)^2) on the sum, divided by q n
    assert noise.numel() > 5000
    assert float(noise.std()) == pytest.approx(expected_std, rel=0.05)
    assert abs(float(noise.mean())) < 4 * expected_std / math.sqrt(noise.numel())


def test_empty_poisson_batch_still_adds_noise() -> None:
    data, seed = _data(n=20), 0
    while len(poisson_batches(20, sample_rate(20, 1), 1, np.random.default_rng(seed))[0]):
        seed += 1  # find a seed whose single batch is empty (probability 0.95^20 = 0.36 each)
    for engine in ("microbatch", "fused", "opacus"):
        moved = []
        for noise in (0.0, 1.0):
            model, before = _model(), _model()
            state, stats = train_dp(model, data, PrivacyState(noise, 1.0, 1e-5), mode="feature-extraction",
                                    batch_size=1, lr=0.1, steps=1, optimizer="sgd", engine=engine,
                                    rng=np.random.default_rng(seed))
            assert stats.examples == 0 and state.history == [(noise, 0.05, 1)]
            moved.append(_state_dict_diff(model, before))
        assert moved[0] == 0.0 and moved[1] > 0.0, engine


@pytest.mark.parametrize(("mode", "grad_sample_mode"), [("full", "hooks"), ("fine-tune", "ghost")])
def test_engines_match_opacus(mode: str, grad_sample_mode: str) -> None:
    """Same batches, same noise draws: Opacus's DPOptimizer on DPLSTM lands on the same weights."""
    data, state = _data(), PrivacyState(noise_multiplier=0.7, max_grad_norm=0.4, delta=1e-5)
    models = {}
    for engine in ("opacus", "microbatch", "fused"):
        models[engine] = _model()
        train_dp(models[engine], data, state, mode=mode, batch_size=8, lr=0.05, steps=3, optimizer="sgd",
                 proximal_mu=0.1, engine=engine, grad_sample_mode=grad_sample_mode, rng=np.random.default_rng(5))
    assert _state_dict_diff(models["opacus"], _model()) > 1e-3  # it did train
    assert _state_dict_diff(models["microbatch"], models["opacus"]) < 1e-5
    assert _state_dict_diff(models["fused"], models["opacus"]) < 1e-5


def test_chunking_does_not_change_the_update() -> None:
    data, state = _data(), PrivacyState(noise_multiplier=0.5, max_grad_norm=0.4, delta=1e-5)
    a, b = _model(), _model()
    for model, chunk in ((a, None), (b, 3)):
        train_dp(model, data, state, mode="full", batch_size=12, lr=0.05, steps=2, optimizer="sgd", engine="fused",
                 chunk_size=chunk, rng=np.random.default_rng(2))
    assert _state_dict_diff(a, b) < 1e-6


def test_length_chunks_partition_a_batch_by_length() -> None:
    lengths = np.array([5, 1, 9, 3, 7, 2, 8])
    chunks = length_chunks(np.array([0, 2, 3, 4, 6]), lengths, 2)
    assert [len(c) for c in chunks] == [2, 2, 1]
    assert sorted(np.concatenate(chunks).tolist()) == [0, 2, 3, 4, 6]
    assert [lengths[c].tolist() for c in chunks] == [[3, 5], [7, 8], [9]]
    assert length_chunks(np.array([], dtype=np.int64), lengths, 2) == []


# --- accounting ------------------------------------------------------------------------


def test_epsilon_matches_direct_rdp_computation_and_prv() -> None:
    history = [(1.1, 0.01, 1500), (0.9, 0.02, 300)]
    state = PrivacyState(1.1, 1.0, 1e-5, history=history)
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(rdp_analysis.compute_rdp(q=q, noise_multiplier=s, steps=k, orders=orders) for s, q, k in history)
    eps_ref, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    assert epsilon(state) == pytest.approx(float(eps_ref), rel=1e-12)
    prv = PRVAccountant()
    prv.history = list(history)
    eps_prv = prv.get_epsilon(delta=1e-5, eps_error=0.01)
    assert eps_prv < epsilon(state) < 1.5 * eps_prv  # RDP is the looser, but not by much, bound
    assert epsilon(state, delta=1e-3) < epsilon(state)


def test_calibrated_noise_just_fits_the_budget() -> None:
    q, steps = 0.05, 400
    sigma = calibrate_noise(2.0, 1e-5, q, steps)
    spent = epsilon(PrivacyState(sigma, 1.0, 1e-5, history=[(sigma, q, steps)]))
    assert 1.9 < spent <= 2.0
    assert epsilon(PrivacyState(0.97 * sigma, 1.0, 1e-5, history=[(0.97 * sigma, q, steps)])) > 2.0


def test_state_persists_across_rounds_and_equals_one_accountant_run() -> None:
    from flwr.app import ConfigRecord

    data, model = _data(n=30), _model()
    state = new_privacy_state(num_examples=30, batch_size=6, max_grad_norm=1.0, delta=1e-5, noise_multiplier=1.2)
    reference, eps = RDPAccountant(), [0.0]
    for rnd in range(3):
        stored = state.to_json() if rnd % 2 else ConfigRecord(state.to_dict())  # a file, or Flower's Context
        state = PrivacyState.from_json(stored) if rnd % 2 else PrivacyState.from_dict(stored)
        state, stats = train_dp(model, data, state, mode="fine-tune", batch_size=6, lr=0.01, steps=4,
                                rng=np.random.default_rng(rnd))
        assert stats.status == TRAINED and stats.steps == 4 and stats.epsilon == epsilon(state)
        for _ in range(4):
            reference.step(noise_multiplier=1.2, sample_rate=0.2)
        eps.append(epsilon(state))
        assert eps[-1] == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-12)
    assert eps == sorted(eps) and len(set(eps)) == 4  # strictly growing
    assert state.history == [(1.2, 0.2, 12)]  # equal rounds merge: the state stays small


def test_budget_exhaustion_stops_a_client() -> None:
    data, model = _data(n=30), _model()
    state = new_privacy_state(num_examples=30, batch_size=6, max_grad_norm=1.0, delta=1e-5, target_epsilon=3.0,
                              expected_rounds=2, steps=5)
    for _ in range(2):
        state, stats = train_dp(model, data, state, mode="full", batch_size=6, lr=0.01, steps=5,
                                rng=np.random.default_rng(0))
        assert stats.status == TRAINED
    assert epsilon(state) <= 3.0 and remaining_budget(state) == pytest.approx(3.0 - epsilon(state))
    frozen = copy.deepcopy(model)
    after, stats = train_dp(model, data, state, mode="full", batch_size=6, lr=0.01, steps=5,
                            rng=np.random.default_rng(0))
    assert stats.status == BUDGET_EXHAUSTED and stats.steps == 0
    assert after == state and _state_dict_diff(model, frozen) == 0.0
    one_more = PrivacyState(state.noise_multiplier, 1.0, 1e-5, history=[(state.noise_multiplier, 0.2, 11)])
    _, stats = train_dp(model, data, state, mode="full", batch_size=6, lr=0.01, steps=1, rng=np.random.default_rng(0))
    assert stats.status == (TRAINED if epsilon(one_more) <= 3.0 else BUDGET_EXHAUSTED)  # a smaller round may fit


def test_without_budget_noise_free_training_spends_infinite_epsilon() -> None:
    state, stats = train_dp(_model(), _data(), PrivacyState(0.0, 1.0, 1e-5), mode="feature-extraction",
                            batch_size=8, lr=0.01, steps=1, rng=np.random.default_rng(0))
    assert stats.status == TRAINED and math.isinf(epsilon(state)) and remaining_budget(state) == math.inf


def test_steps_from_epochs() -> None:
    assert planned_steps(100, 10, epochs=1) == 10
    assert planned_steps(100, 10, epochs=2.5) == 25
    assert planned_steps(5, 10, epochs=1) == 1  # q = 1
    assert planned_steps(100, 10, steps=3) == 3


# --- bad input -------------------------------------------------------------------------


def test_state_serialisation_round_trip_and_errors() -> None:
    state = PrivacyState(1.0, 0.5, 1e-6, target_epsilon=4.0, history=[(1.0, 0.1, 7), (1.3, 0.1, 2)])
    assert PrivacyState.from_json(state.to_json()) == state
    assert PrivacyState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    d = state.to_dict()
    with pytest.raises(ValueError, match="missing keys \\['delta'\\]"):
        PrivacyState.from_dict({k: v for k, v in d.items() if k != "delta"})
    with pytest.raises(ValueError, match="differ in length"):
        PrivacyState.from_dict(d | {"history-rate": [0.1]})
    with pytest.raises(ValueError, match="must be integers"):
        PrivacyState.from_dict(d | {"history-steps": [7, 2.5]})
    with pytest.raises(ValueError, match="history\\[0\\]"):
        PrivacyState.from_dict(d | {"history-rate": [1.5, 0.1]})
    with pytest.raises(ValueError, match="unknown keys \\['epsilon'\\]"):
        PrivacyState.from_dict(d | {"epsilon": 1.0})
    with pytest.raises(ValueError, match="not valid JSON"):
        PrivacyState.from_json("{")
    with pytest.raises(ValueError, match="delta"):
        PrivacyState(1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        PrivacyState(-1.0, 1.0, 1e-5)


def test_bad_training_arguments_are_named() -> None:
    model, data, state = _model(), _data(), PrivacyState(1.0, 1.0, 1e-5)
    kw = {"mode": "full", "batch_size": 8, "lr": 0.1, "steps": 1, "rng": np.random.default_rng(0)}
    with pytest.raises(ValueError, match="engine"):
        train_dp(model, data, state, **kw, engine="jax")
    with pytest.raises(ValueError, match="grad_sample_mode"):
        train_dp(model, data, state, **kw, engine="opacus", grad_sample_mode="magic")
    with pytest.raises(ValueError, match="transfer mode"):
        train_dp(model, data, state, **kw | {"mode": "partial"})
    with pytest.raises(ValueError, match="exactly one of steps and epochs"):
        train_dp(model, data, state, **kw, epochs=1)
    with pytest.raises(ValueError, match="at least one example"):
        train_dp(model, data.subset(np.array([], dtype=np.int64)), state, **kw)
    with pytest.raises(ValueError, match="expected_rounds"):
        new_privacy_state(num_examples=10, batch_size=2, max_grad_norm=1.0, delta=1e-5, target_epsilon=1.0)
