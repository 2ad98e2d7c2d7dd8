"""Personalisation: per-client accuracy before and after each client fine-tunes the head on its own data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrnn.config import ConfigError, PersonalizeSection, load_config
from fedrnn.data.partitions import save_partitions, split_holdout
from fedrnn.data.tokenizer import Encoded
from fedrnn.federation.plugin import RoundInfo, RunContext
from fedrnn.federation.prepare import RunFiles
from fedrnn.model.rnn import ModelConfig, SentimentRNN
from fedrnn.plugins.personalize import Personalization, distribution, features, personalize_clients


def test_distribution_keys_and_values() -> None:
    d = distribution([1.0, 0.5, 0.9, 0.8], "client_accuracy")
    assert d["client_accuracy_mean"] == pytest.approx(0.8) and d["client_accuracy_worst"] == 0.5
    assert 0.5 < d["client_accuracy_p10"] < 0.8


def _one_label_clients() -> tuple[SentimentRNN, Encoded, list[np.ndarray]]:
    """A random model and ten clients whose reviews all carry one label (clients 0-4 negative, 5-9 positive)."""
    torch.manual_seed(0)
    model = SentimentRNN(ModelConfig(vocab_size=50, embed_dim=8, hidden_size=8, num_layers=1, dropout=0.0))
    rng = np.random.default_rng(0)
    n = 200
    pool = Encoded(rng.integers(2, 50, size=(n, 6)).astype(np.int32), np.full(n, 6), np.repeat([0, 1], n // 2))
    return model, pool, [np.arange(k * 20, (k + 1) * 20) for k in range(10)]


def test_a_local_head_learns_each_clients_own_label_mix() -> None:
    """The global model is right on one kind of client only; after head fine-tuning on their own data
    every client predicts its own label on its held-out reviews."""
    model, pool, shards = _one_label_clients()
    before_only = personalize_clients(model, pool, shards, 0.25, 0, PersonalizeSection(head_epochs=0))
    assert before_only["clients_evaluated"] == 10 and "personalized_accuracy_mean" not in before_only
    out = personalize_clients(model, pool, shards, 0.25, 0, PersonalizeSection(head_epochs=30, lr=0.05))
    assert out["client_accuracy_mean"] == before_only["client_accuracy_mean"]
    assert out["client_accuracy_worst"] == 0.0  # one global model cannot fit both kinds of client
    assert out["personalized_accuracy_worst"] == 1.0
    assert out["personalized_gain_mean"] == pytest.approx(1.0 - out["client_accuracy_mean"])


def test_one_pass_over_the_pool_equals_measuring_each_client_alone() -> None:
    """Per-client accuracies from the shared feature pass equal each client's own pass (mixed review lengths)."""
    torch.manual_seed(1)
    model = SentimentRNN(ModelConfig(vocab_size=50, embed_dim=8, hidden_size=8, num_layers=2, dropout=0.0))
    rng = np.random.default_rng(1)
    n = 300
    lengths = rng.integers(1, 12, size=n)
    ids = np.where(np.arange(12)[None, :] < lengths[:, None], rng.integers(2, 50, size=(n, 12)), 0).astype(np.int32)
    pool = Encoded(ids, lengths, rng.integers(0, 2, size=n))
    shards = np.array_split(rng.permutation(n)[:290], 29)  # ten reviews not held by any client
    cfg = PersonalizeSection(head_epochs=0)
    alone = []
    for k, shard in enumerate(shards):
        _, hold = split_holdout(shard, 0.3, 5, k)
        with torch.no_grad():
            pred = model.head(features(model, pool.subset(hold))).argmax(1).numpy()
        alone.append(float((pred == pool.labels[hold]).mean()))
    assert personalize_clients(model, pool, shards, 0.3, 5, cfg) == pytest.approx(  # float32 means
        {"clients_evaluated": 29, **distribution(alone, "client_accuracy")}, rel=1e-6)


def test_personalize_config_is_checked() -> None:
    assert load_config(None, {"personalize": {"head_epochs": 3}}).personalize.head_epochs == 3
    with pytest.raises(ConfigError, match="personalize.head_epochs must be >= 0"):
        load_config(None, {"personalize": {"head_epochs": -1}})


def test_the_plugin_reports_after_the_last_round_of_a_simulation_only(tmp_path) -> None:
    model, pool, shards = _one_label_clients()
    save_partitions(str(tmp_path / "p.npz"), shards)
    cfg = load_config(None, {"run": {"clients": 10, "rounds": 3, "clients_per_round": 2},
                             "personalize": {"head_epochs": 30, "lr": 0.05}})
    target = type("Target", (), {"pool": pool})()

    def ctx(simulated: bool) -> RunContext:
        return RunContext(cfg, RunFiles("", "", str(tmp_path / "p.npz"), str(tmp_path)), None, target, None,
                          simulated, lambda arrays: model, None, None)

    plugin = Personalization(cfg.personalize)
    plugin.setup(ctx(True))
    assert plugin.after_aggregate(RoundInfo(2, {}), None, {}) == {}
    out = plugin.after_aggregate(RoundInfo(3, {}), None, {})
    assert out["clients_evaluated"] == 10 and out["personalized_accuracy_worst"] == 1.0
    plugin.setup(ctx(False))  # real devices: their data never reaches the server
    assert plugin.after_aggregate(RoundInfo(3, {}), None, {}) == {}
