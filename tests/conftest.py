"""Shared fixtures: the real data directory and a tiny IMDB teacher pretrained once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from fedrnn.data.loaders import DATA_DIR_ENV
from fedrnn.model.pretrain import PretrainConfig, pretrain
from fedrnn.model.rnn import ModelConfig

# One intra-op thread: the tiny test models gain nothing from two, and on a shared 2-core
# machine two threads per process oversubscribe the CPU and run many times slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    value = os.environ.get(DATA_DIR_ENV)
    if not value or not Path(value).is_dir():
        pytest.exit(f"${DATA_DIR_ENV} must point at the data sets (e.g. ../shared/data); got {value!r}", returncode=2)
    return Path(value)


TINY_MODEL = ModelConfig(vocab_size=2000, embed_dim=24, hidden_size=24, num_layers=2, dropout=0.1)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Path, dict]:
    """A 2-layer LSTM pretrained for seconds on 3,000 IMDB reviews (checkpoint dir, metrics)."""
    out = tmp_path_factory.mktemp("teacher")
    # the previous recipe (whole reviews only): pinned metrics of tiny runs were recorded with this teacher
    cfg = PretrainConfig.previous(
        model=TINY_MODEL, max_len=128, epochs=3, batch_size=32, lr=5e-3, train_limit=3000, eval_limit=1000, seed=0
    )
    metrics = pretrain(cfg, out, str(data_dir), quiet=True)
    return out, metrics


@pytest.fixture(scope="session", autouse=True)
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The secret keys of the simulated devices and of the server (``fedrnn.privacy.entropy``) live here, not in ~."""
    path = tmp_path_factory.mktemp("fedrnn-state")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDRNN_STATE_DIR", str(path))  # inherited by the simulations and servers tests start
        yield path


@pytest.fixture()
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FEDRNN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture()
def task_identity() -> Iterator[None]:
    """Flower's strategies build Messages, which need the identity a running ServerApp would have."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = None
