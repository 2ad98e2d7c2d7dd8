"""Client training on a GPU: the config key, the Ray resources it asks for, and (with CUDA) training there."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrnn.config import ConfigError, config_from_dict
from fedrnn.data.tokenizer import Encoded
from fedrnn.federation.local import LocalTrainConfig, local_train
from fedrnn.model.rnn import ModelConfig, SentimentRNN
from fedrnn.runs.ray_engine import backend_config


def test_gpus_per_actor_reaches_the_ray_client_resources() -> None:
    assert backend_config(config_from_dict({}))["client_resources"]["num_gpus"] == 0.0
    cfg = config_from_dict({"simulation": {"gpus_per_actor": 0.25}})
    assert backend_config(cfg)["client_resources"]["num_gpus"] == 0.25
    for bad in (-0.5, 2):
        with pytest.raises(ConfigError, match="simulation.gpus_per_actor must be in"):
            config_from_dict({"simulation": {"gpus_per_actor": bad}})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_local_training_runs_on_the_gpu_and_returns_cpu_arrays() -> None:
    model = SentimentRNN(ModelConfig(vocab_size=50, embed_dim=8, hidden_size=8, num_layers=1))
    rng = np.random.default_rng(0)
    data = Encoded(rng.integers(2, 50, (32, 10)).astype(np.int32), np.full(32, 10), rng.integers(0, 2, 32))
    cfg = LocalTrainConfig(lr=1e-2, epochs=1, batch_size=8, max_steps=0, proximal_mu=0.0, clip_norm=1.0, seed=0)
    arrays, metrics = local_train(model, data, cfg, ["head.weight"])
    assert next(model.parameters()).is_cuda and metrics["steps"] == 4.0
    assert isinstance(arrays["head.weight"], np.ndarray) and arrays["head.weight"].shape == (2, 16)
