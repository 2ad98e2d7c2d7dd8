"""The frozen-bottom cache: replaying the frozen layer's outputs trains exactly what computing them live does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrnn.data.tokenizer import Encoded
from fedrnn.federation.local import LocalTrainConfig, local_train
from fedrnn.model.rnn import ModelConfig, SentimentRNN, set_trainable
from fedrnn.model.training import FrozenBottom


def _data(n: int = 40, width: int = 30, seed: int = 0) -> Encoded:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, width, n).astype(np.int32)
    ids = np.zeros((n, width), np.int32)
    for i, length in enumerate(lengths):
        ids[i, :length] = rng.integers(2, 300, length)
    return Encoded(ids=ids, lengths=lengths, labels=rng.integers(0, 2, n).astype(np.int64))


def _train(cfg: ModelConfig, mode: str, cache_mb: int, epochs: int = 3) -> tuple[dict[str, np.ndarray], dict]:
    torch.manual_seed(0)
    model = SentimentRNN(cfg)
    names = set_trainable(model, mode)
    local = LocalTrainConfig(lr=1e-2, epochs=epochs, batch_size=8, max_steps=0, proximal_mu=0.0, clip_norm=1.0,
                             seed=3, frozen_cache_mb=cache_mb)
    return local_train(model, _data(), local, names)


def test_replayed_bottom_trains_what_the_live_one_does() -> None:
    cfg = ModelConfig(vocab_size=300, embed_dim=16, hidden_size=12, dropout=0.0)  # no dropout: eval = train mode
    live, live_metrics = _train(cfg, "fine-tune", 0)
    cached, cached_metrics = _train(cfg, "fine-tune", 64)
    assert live_metrics["steps"] == cached_metrics["steps"] == 15
    for name in live:
        np.testing.assert_allclose(cached[name], live[name], rtol=0, atol=1e-5)
    assert live_metrics["train-loss"] == pytest.approx(cached_metrics["train-loss"], abs=1e-6)


def test_cache_is_refused_where_it_cannot_replay() -> None:
    data = _data()
    model = SentimentRNN(ModelConfig(vocab_size=300, embed_dim=16, hidden_size=12))
    set_trainable(model, "full")  # the bottom layer trains: nothing to replay
    assert FrozenBottom.build(model, data, 2**30) is None
    set_trainable(model, "fine-tune")
    assert FrozenBottom.build(model, data, 2**30) is not None
    need = int(data.lengths.sum()) * 12 * 4
    assert FrozenBottom.build(model, data, need - 1) is None  # over the memory cap: live computation
    bidirectional = SentimentRNN(ModelConfig(vocab_size=300, embed_dim=16, hidden_size=12, bidirectional=True))
    set_trainable(bidirectional, "fine-tune")
    assert FrozenBottom.build(bidirectional, data, 2**30) is None


def test_the_model_is_whole_again_after_training() -> None:
    cfg = ModelConfig(vocab_size=300, embed_dim=16, hidden_size=12)
    torch.manual_seed(0)
    model = SentimentRNN(cfg)
    names = set_trainable(model, "fine-tune")
    local_train(model, _data(), LocalTrainConfig(1e-2, 2, 8, 0, 0.0, 1.0, 3, frozen_cache_mb=64), names)
    assert isinstance(model.rnn[0]["fwd"], torch.nn.LSTM)  # the replay stand-in is gone
    model.eval()
    ids = torch.from_numpy(_data().ids[:4].astype(np.int64))
    assert model(ids, torch.tensor([5, 9, 3, 29])).shape == (4, 2)
