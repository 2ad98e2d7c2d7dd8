"""Server-optimizer state survives a resume: a strategy rebuilt from saved state aggregates the
next round exactly as the one that never stopped."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from messages import reply_metadata

from fedrnn.config import config_from_dict
from fedrnn.federation.loop import OneNodeGrid
from fedrnn.federation.strategies import load_strategy_state, make_strategy, strategy_state
from fedrnn.federation.wire import from_record, to_record

# record order as the round loop sends it (model order), deliberately not alphabetical
GLOBAL = {"rnn.1.fwd.weight_ih_l0": np.zeros((4, 3), np.float32), "head.weight": np.zeros((2, 3), np.float32),
          "head.bias": np.zeros(2, np.float32)}


pytestmark = pytest.mark.usefixtures("task_identity")


def _replies(rnd: int) -> list[Message]:
    rng = np.random.default_rng(rnd)
    out = []
    for client in range(3):
        arrays = {k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in GLOBAL.items()}
        content = RecordDict({"arrays": to_record(arrays), "metrics": MetricRecord({"num-examples": 10 + client})})
        out.append(Message(content, metadata=reply_metadata(f"m{rnd}c{client}", f"r{rnd}c{client}")))
    return out


def _round(strategy, rnd: int, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    list(strategy.configure_train(rnd, to_record(arrays), ConfigRecord(), OneNodeGrid(1)))
    agg, _ = strategy.aggregate_train(rnd, _replies(rnd))
    return from_record(agg)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi"])
def test_server_optimizer_state_resumes_exactly(name: str) -> None:
    cfg = config_from_dict({"run": {"strategy": name}})
    steady = make_strategy(cfg)
    arrays = dict(GLOBAL)
    for rnd in (1, 2):
        arrays = _round(steady, rnd, arrays)
    saved = strategy_state(steady)
    assert saved and all(v.dtype != object for v in saved.values())
    # a checkpoint file may hand the tensors back in another order (safetensors sorts names)
    resumed = make_strategy(cfg)
    load_strategy_state(resumed, dict(sorted(saved.items())), list(GLOBAL))
    expected, got = _round(steady, 3, arrays), _round(resumed, 3, arrays)
    assert set(got) == set(expected)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])


def test_fedavgm_steps_as_fedavg_then_by_an_average_of_pseudo_gradients() -> None:
    avg = make_strategy(config_from_dict({"run": {"strategy": "fedavg"}}))
    mom = make_strategy(config_from_dict({"run": {"strategy": "fedavgm"}, "server": {"server_momentum": 0.5}}))
    a_avg, a_mom = dict(GLOBAL), dict(GLOBAL)
    steps = []
    for rnd in (1, 2):
        new_avg, new_mom = _round(avg, rnd, a_avg), _round(mom, rnd, a_mom)
        steps.append((new_avg["head.bias"] - a_avg["head.bias"], new_mom["head.bias"] - a_mom["head.bias"]))
        a_avg, a_mom = new_avg, new_mom
    np.testing.assert_allclose(steps[0][1], steps[0][0], rtol=1e-5, atol=1e-7)  # round 1: FedAvg's step
    # round 2: (1 - b) / (1 - b^2) * (b g1 + g2) = (g1 + 2 g2) / 3 for b = 0.5, g the FedAvg steps
    np.testing.assert_allclose(steps[1][1], (steps[0][0] + 2 * steps[1][0]) / 3, rtol=1e-5, atol=1e-6)
