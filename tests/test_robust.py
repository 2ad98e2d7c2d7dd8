"""Unit tests of the robustness pieces: reply validation, Byzantine clients, fault injection, deadlines."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from messages import reply_metadata, round_info

from fedrnn.config import STRATEGIES, AttackSection, ConfigError, FaultsSection, RobustSection, config_from_dict
from fedrnn.data.tokenizer import Encoded
from fedrnn.federation.deadline import ClientDeadlineExceeded, deadline_mod
from fedrnn.federation.loop import reported_accuracy
from fedrnn.federation.strategies import make_strategy
from fedrnn.federation.wire import to_record
from fedrnn.plugins.attack import AttackSimulation, attack_of, malicious_clients, poison_data, poison_update
from fedrnn.plugins.faults import FaultInjection, InjectedFault, inject_fault
from fedrnn.plugins.robust import Expected, ReplyRejected, ReplyValidator, check_reply, low_median

GLOBAL = {"head.weight": np.zeros((2, 3), np.float32), "head.bias": np.zeros(2, np.float32)}


def _metrics(client: int = 3, **extra: object) -> dict:
    return {"num-examples": 10, "client-id": client, "train-loss": 0.5, "train-seconds": 1.0, **extra}


def _reply(arrays: dict | None = None, metrics: dict | None = None, to: str = "m3",
           records: dict | None = None) -> Message:
    arrays = {k: v + 0.1 for k, v in GLOBAL.items()} if arrays is None else arrays
    content = records if records is not None else {"arrays": to_record(arrays),
                                                   "metrics": MetricRecord(metrics or _metrics())}
    return Message(RecordDict(content), metadata=reply_metadata(reply_to=to))


def _expected(**kw: object) -> Expected:
    return Expected(**({"arrays": GLOBAL, "client": 3, "max_examples": 10, "max_update_norm": 0.0} | kw))


def _validator(cfg: RobustSection | None = None) -> ReplyValidator:
    v = ReplyValidator(cfg or RobustSection())
    v.max_examples = {c: 10 for c in range(10)}
    return v


ROUND = round_info(1, GLOBAL, range(10), prefix="m")


def test_a_sound_reply_passes_with_its_update_norm() -> None:
    norm = check_reply(_reply().content, _expected())
    assert norm == pytest.approx(np.sqrt(8 * 0.1**2), rel=1e-6)


@pytest.mark.parametrize(("arrays", "reason"), [
    ({"head.weight": np.zeros((2, 3), np.float32)}, "missing ['head.bias']"),
    ({**GLOBAL, "embedding.weight": np.zeros(3, np.float32)}, "unexpected ['embedding.weight']"),
    ({**GLOBAL, "head.bias": np.zeros(3, np.float32)}, "head.bias has shape (3,), expected (2,)"),
    ({**GLOBAL, "head.bias": np.zeros(2, np.float64)}, "head.bias has dtype float64, expected float32"),
    ({**GLOBAL, "head.bias": np.zeros(2, np.int8)}, "head.bias has dtype int8, expected float32"),
    ({**GLOBAL, "head.bias": np.array([0, np.nan], np.float32)}, "head.bias contains NaN or infinite"),
    ({**GLOBAL, "head.weight": np.full((2, 3), np.inf, np.float32)}, "head.weight contains NaN or infinite"),
])
def test_bad_tensors_are_rejected_with_the_tensor_named(arrays: dict, reason: str) -> None:
    with pytest.raises(ReplyRejected) as e:
        check_reply(_reply(arrays).content, _expected())
    assert reason in str(e.value)


@pytest.mark.parametrize(("metrics", "reason"), [
    (_metrics(**{"num-examples": 0}), "num-examples 0 is not an integer in [1, 10]"),
    (_metrics(**{"num-examples": -5}), "num-examples -5"),
    (_metrics(**{"num-examples": 2.5}), "num-examples 2.5"),
    (_metrics(**{"num-examples": 11}), "num-examples 11 is not an integer in [1, 10]"),
    (_metrics(**{"num-examples": float("nan")}), "'num-examples' is nan"),
    (_metrics(**{"train-loss": float("inf")}), "'train-loss' is inf"),
    (_metrics(**{"train-accuracy": [0.1, 0.2]}), "'train-accuracy' is a list"),
    (_metrics(client=4), "client-id 4 but the message was sent to client 3"),
    ({k: v for k, v in _metrics().items() if k != "train-seconds"}, "missing 'train-seconds'"),
])
def test_bad_metrics_are_rejected_with_the_key_named(metrics: dict, reason: str) -> None:
    with pytest.raises(ReplyRejected) as e:
        check_reply(_reply(metrics=metrics).content, _expected())
    assert reason in str(e.value)


def test_records_undecodable_arrays_and_norm_bound() -> None:
    with pytest.raises(ReplyRejected, match="expected one ArrayRecord 'arrays'"):
        check_reply(_reply(records={"metrics": MetricRecord(_metrics())}).content, _expected())
    with pytest.raises(ReplyRejected, match="expected one ArrayRecord 'arrays'"):
        check_reply(_reply(records={"arrays": to_record(GLOBAL), "other": to_record(GLOBAL),
                                    "metrics": MetricRecord(_metrics())}).content, _expected())
    garbage = ArrayRecord({"head.weight": Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=b"junk"),
                           "head.bias": to_record(GLOBAL)["head.bias"]})
    with pytest.raises(ReplyRejected, match="head.weight cannot be decoded"):
        check_reply(_reply(records={"arrays": garbage, "metrics": MetricRecord(_metrics())}).content, _expected())
    with pytest.raises(ReplyRejected, match=r"update norm 0.2828 exceeds robust.max_update_norm = 0.2"):
        check_reply(_reply().content, _expected(max_update_norm=0.2))
    assert check_reply(_reply().content, _expected(max_update_norm=0.3)) > 0


def test_validator_drops_rejected_replies_and_counts_them() -> None:
    v = _validator(RobustSection(max_norm_ratio=5.0))
    big = {k: v + 10.0 for k, v in GLOBAL.items()}
    replies = [
        _reply(metrics=_metrics(1), to="m1"),
        _reply(metrics=_metrics(2), to="m2"),
        _reply(big, metrics=_metrics(3), to="m3"),  # 100x the others' update: a scaling attack
        _reply(metrics=_metrics(4, extra=1.0), to="m4"),  # metric keys unlike everybody else's
        _reply(metrics=_metrics(5), to="nobody"),  # answers no message of this round
        _reply(metrics=_metrics(1), to="m1"),  # a second reply for client 1
        _reply({**GLOBAL, "head.bias": np.array([np.nan, 0], np.float32)}, metrics=_metrics(6), to="m6"),
    ]
    kept, row = v.on_replies(ROUND, replies)
    assert [int(r.content["metrics"]["client-id"]) for r in kept] == [1, 2]
    assert kept[0] is replies[0]
    assert row["rejected"] == 5
    reasons = row["rejected_reasons"]
    assert set(reasons) == {"1", "3", "4", "6", "unknown"}
    assert "max_norm_ratio" in reasons["3"] and "['extra']" in reasons["4"] and "NaN" in reasons["6"]
    assert "second reply" in reasons["1"] and "no training message" in reasons["unknown"]
    assert row["update_norm_max"] == pytest.approx(np.sqrt(8 * 0.01), rel=1e-6)


def test_norm_ratio_uses_the_lower_median_and_can_be_switched_off() -> None:
    assert low_median([1.0, 100.0]) == 1.0 and low_median([3.0, 1.0, 2.0]) == 2.0
    big = {k: v + 10.0 for k, v in GLOBAL.items()}
    pair = [_reply(metrics=_metrics(1), to="m1"), _reply(big, metrics=_metrics(2), to="m2")]
    kept, row = _validator(RobustSection(max_norm_ratio=10.0)).on_replies(ROUND, pair)
    assert len(kept) == 1 and row["rejected"] == 1  # one huge update of two is still caught
    kept, row = _validator(RobustSection(max_norm_ratio=0.0)).on_replies(ROUND, pair)
    assert len(kept) == 2 and row["rejected"] == 0


def test_reported_accuracy_ignores_nonsense() -> None:
    def ev(metrics: dict) -> Message:
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), metadata=reply_metadata("m1"))

    assert reported_accuracy(ev({"eval-accuracy": 0.75})) == 0.75
    for bad in (1.5, -0.1, float("nan"), [0.5]):
        assert reported_accuracy(ev({"eval-accuracy": bad})) is None
    assert reported_accuracy(ev({})) is None
    assert reported_accuracy(Message(RecordDict({}), metadata=reply_metadata("m1"))) is None


# ---------------------------------------------------------------- Byzantine clients


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_builds(name: str) -> None:
    """Robust rules included (MultiKrum once passed a keyword Flower does not have)."""
    cfg = config_from_dict({"run": {"strategy": name, "clients_per_round": 10}, "server": {"krum_byzantine": 3}})
    strategy = make_strategy(cfg)
    flower_class = next(c for c in type(strategy).__mro__ if c.__module__.startswith("flwr."))
    assert flower_class.__name__.lower() == name  # Flower's own strategy, or fedrnn's thin subclass of it
    if name == "multikrum":
        assert strategy.num_nodes_to_select == 7 and strategy.num_malicious_nodes == 3


def test_malicious_set_is_seeded_and_only_they_are_told() -> None:
    a, b = malicious_clients(30, 9, 0), malicious_clients(30, 9, 0)
    assert a == b and len(set(a)) == 9 and all(0 <= c < 30 for c in a)
    assert malicious_clients(30, 9, 1) != a
    plugin = AttackSimulation(AttackSection(clients=9, kind="scale", scale=5.0))
    plugin.setup(SimpleNamespace(cfg=SimpleNamespace(run=SimpleNamespace(clients=30, seed=0))))
    out = plugin.configure(round_info(1), list(range(10)), np.random.default_rng(0))
    assert set(out) == set(a) & set(range(10))
    assert all(v == {"attack": "scale", "attack-scale": 5.0} for v in out.values())


def test_poisoned_updates_and_labels() -> None:
    start = {"w": np.array([1.0, 2.0], np.float32)}
    local = {"w": np.array([1.5, 1.0], np.float32)}
    np.testing.assert_allclose(poison_update(local, start, "sign-flip", 10.0)["w"], [0.5, 3.0])
    np.testing.assert_allclose(poison_update(local, start, "scale", 10.0)["w"], [6.0, -8.0])
    assert poison_update(local, start, "label-flip", 10.0) is local and poison_update(local, {}, "", 1.0) is local
    data = Encoded(np.ones((3, 4), np.int32), np.array([4, 2, 1]), np.array([0, 1, 1]))
    flipped = poison_data(data, "label-flip")
    assert flipped.labels.tolist() == [1, 0, 0] and data.labels.tolist() == [0, 1, 1]
    assert poison_data(data, "scale") is data
    assert attack_of(ConfigRecord({})) is None and attack_of(ConfigRecord({"attack": "scale"})).attack == "scale"
    with pytest.raises(ValueError, match="unknown attack 'melt'"):
        attack_of(ConfigRecord({"attack": "melt"}))


# ---------------------------------------------------------------- faults and deadlines


def test_fault_plugin_marks_the_named_clients_in_the_named_rounds() -> None:
    plugin = FaultInjection(FaultsSection(raise_clients=[1], hang_clients=[2], crash_clients=[3], hang_s=4.0,
                                          rounds=[2]))
    assert plugin.configure(round_info(1), [1, 2, 3, 4], np.random.default_rng(0)) == {}
    assert plugin.configure(round_info(2), [1, 2, 3, 4], np.random.default_rng(0)) == {
        1: {"fault": "raise", "hang-s": 4.0}, 2: {"fault": "hang", "hang-s": 4.0}, 3: {"fault": "crash", "hang-s": 4.0}}
    with pytest.raises(InjectedFault, match="client 1 raised"):
        inject_fault(ConfigRecord({"fault": "raise", "client-id": 1}))
    t0 = time.perf_counter()
    inject_fault(ConfigRecord({"fault": "hang", "hang-s": 0.05}))
    assert time.perf_counter() - t0 >= 0.05
    inject_fault(ConfigRecord({}))
    with pytest.raises(ValueError, match="unknown fault 'melt'"):
        inject_fault(ConfigRecord({"fault": "melt"}))


def _job(timeout: float) -> Message:
    content = RecordDict({"config": ConfigRecord({"deadline-s": timeout})})
    return Message(content, metadata=reply_metadata(message_id="j"))


def test_deadline_mod_aborts_a_hung_job_and_disarms_after_a_quick_one() -> None:
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    t0 = time.perf_counter()
    with pytest.raises(ClientDeadlineExceeded, match="deadline of 0.2 s"):
        deadline_mod(_job(0.2), ctx, lambda m, c: time.sleep(5) or m)
    assert time.perf_counter() - t0 < 2
    msg = _job(0.2)
    assert deadline_mod(msg, ctx, lambda m, c: m) is msg
    time.sleep(0.3)  # the alarm of the quick job was disarmed: nothing fires here


@pytest.fixture
def importing_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A job that imports a fresh module whose body is ``source``, then sleeps ``after_s``; the module is
    forgotten afterwards."""
    names: list[str] = []
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(name: str, source: str, after_s: float = 0.0):
        (tmp_path / f"{name}.py").write_text(source)
        names.append(name)

        def job(m: Message, c: Context) -> Message:
            __import__(name)
            time.sleep(after_s)
            return m

        return job

    yield make
    for name in names:
        sys.modules.pop(name, None)


def test_deadline_never_aborts_halfway_through_an_import(importing_job) -> None:
    """An import that outlasts the deadline completes (the module is whole in sys.modules), then the job aborts."""
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    job = importing_job("slow_import_for_deadline", "import time\ntime.sleep(0.6)\nDONE = True\n", after_s=5)
    with pytest.raises(ClientDeadlineExceeded):
        deadline_mod(_job(0.2), ctx, job)
    assert sys.modules["slow_import_for_deadline"].DONE


def test_deadline_waits_for_an_import_only_so_long(importing_job, monkeypatch: pytest.MonkeyPatch) -> None:
    """An import hung past IMPORT_WAIT_MAX_S is aborted anyway: the worker must come free."""
    import fedrnn.federation.deadline as deadline

    monkeypatch.setattr(deadline, "IMPORT_WAIT_MAX_S", 0.4)
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    job = importing_job("hung_import_for_deadline", "import time\ntime.sleep(5)\n")
    t0 = time.perf_counter()
    with pytest.raises(ClientDeadlineExceeded):
        deadline_mod(_job(0.2), ctx, job)
    assert time.perf_counter() - t0 < 2


def test_robustness_config_keys_are_checked() -> None:
    cfg = config_from_dict({"faults": {"raise_clients": [1, 2], "rounds": [1]}, "attack": {"clients": 3}})
    assert cfg.faults.enabled and cfg.faults.raise_clients == [1, 2] and cfg.attack.kind == "sign-flip"
    assert not config_from_dict({}).faults.enabled
    for data, key in [
        ({"faults": {"raise_clients": [1, "x"]}}, "faults.raise_clients[1] must be an integer"),
        ({"faults": {"hang_clients": 3}}, "faults.hang_clients must be a list"),
        ({"faults": {"raise_clients": [1], "crash_clients": [1]}}, "faults must name each client at most once"),
        ({"attack": {"kind": "melt"}}, "attack.kind must be one of"),
        ({"attack": {"scale": 0.5}}, "attack.scale must be > 1"),
        ({"robust": {"max_norm_ratio": 0.5}}, "robust.max_norm_ratio must be 0 (off) or >= 1"),
        ({"robust": {"max_update_norm": -1}}, "robust.max_update_norm must be >= 0"),
        ({"run": {"clients": 5, "clients_per_round": 5}, "attack": {"clients": 6}},
         "attack.clients must be <= run.clients = 5, got 6"),
        ({"run": {"clients": 5, "clients_per_round": 5}, "faults": {"hang_clients": [5]}},
         "faults.*_clients must hold client ids < run.clients = 5, got [5]"),
    ]:
        with pytest.raises(ConfigError) as e:
            config_from_dict(data)
        assert key in str(e.value)
