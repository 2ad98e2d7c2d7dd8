"""Device model: simulated clock, deadline policies, availability, dropout, memory, traces, calibration."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedrnn.devices import (
    PROFILES,
    AlwaysOn,
    Churn,
    DeviceError,
    Diurnal,
    Fleet,
    TraceWindows,
    adapt_to_memory,
    estimate_training_memory,
    load_trace,
    measure_host_throughput,
    memory_breakdown,
    plan_round,
    select_clients,
    summarize_by_class,
)
from fedrnn.model.rnn import ModelConfig, SentimentRNN, set_trainable

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "fleets" / "example_trace.csv"
HEADER = "client_id,samples_per_s,down_bps,up_bps,latency_s,active\n"


def manual_fleet(
    n: int,
    *,
    sps: float = 100.0,
    down: float = 8e6,
    up: float = 4e6,
    latency: float = 0.05,
    dropout: float = 0.0,
    availability=None,
    classes=None,
) -> Fleet:
    return Fleet(
        device_class=classes or ["a"] * n,
        network=["test"] * n,
        relative_speed=np.full(n, np.nan),
        speed_samples_per_s=np.full(n, sps),
        down_bps=np.full(n, down),
        up_bps=np.full(n, up),
        latency_s=np.full(n, latency),
        ram_bytes=np.full(n, np.inf),
        dropout_prob=np.full(n, dropout),
        availability=availability or [AlwaysOn() for _ in range(n)],
    )


def plan(fleet, selected, policy, deadline, seed=0, **kw):
    args = dict(bytes_down=1e6, bytes_up=1e6, work_samples=500, batch_size=32, host_samples_per_s=1.0)
    args.update(kw)
    return plan_round(fleet, selected, deadline_s=deadline, policy=policy, rng=np.random.default_rng(seed), **args)


# ---- clock ----------------------------------------------------------------------------------


def test_client_time_is_download_plus_compute_plus_upload():
    # download 0.05 + 1e6*8/8e6 = 1.05 s; compute 500/100 = 5 s; upload 0.05 + 1e6*8/4e6 = 2.05 s
    p = plan(manual_fleet(1), [0], "wait", None)
    c = p.clients[0]
    assert c.download_s == pytest.approx(1.05)
    assert c.compute_s == pytest.approx(5.0)
    assert c.upload_s == pytest.approx(2.05)
    assert c.time_s == pytest.approx(8.1)
    assert (c.status, c.steps, c.steps_total, c.fraction) == ("ok", 16, 16, 1.0)
    assert p.duration_s == pytest.approx(8.1)
    assert (c.bytes_down, c.bytes_up) == (1_000_000, 1_000_000)


def test_relative_speed_multiplies_host_throughput():
    f = Fleet.from_mix(4, {"rpi4": 1.0}, seed=0, networks="wifi")
    speed = f.samples_per_s([0, 1], 1000.0)
    assert speed == pytest.approx([1000 * PROFILES["rpi4"].relative_speed] * 2)
    p = plan_round(
        f,
        [0],
        bytes_down=0,
        bytes_up=0,
        work_samples=289,
        batch_size=1,
        host_samples_per_s=2845.0,
        deadline_s=None,
        policy="wait",
        rng=np.random.default_rng(0),
    )
    # 2845 * 289/2845 = 289 samples/s -> 1 s of compute, plus two Wi-Fi latencies of 10 ms
    assert p.clients[0].compute_s == pytest.approx(1.0)
    assert p.clients[0].time_s == pytest.approx(1.02)


def test_wifi_speed_is_capped_by_the_device_radio():
    f = Fleet.from_mix(2, {"rpi3b+": 1.0}, seed=0, networks="wifi")
    assert f.down_bps == pytest.approx([24.5e6, 24.5e6])
    g = Fleet.from_mix(2, {"rpi3b+": 1.0}, seed=0, networks="4g")
    assert g.down_bps == pytest.approx([17.4e6, 17.4e6])


# ---- deadline policies ------------------------------------------------------------------------


def test_drop_discards_late_clients_and_ends_at_the_deadline():
    fleet = manual_fleet(2, sps=100.0)
    fleet.speed_samples_per_s[1] = 25.0  # compute 20 s -> total 23.1 s
    p = plan(fleet, [0, 1], "drop", 10.0)
    assert [c.status for c in p.clients] == ["ok", "late"]
    assert [c.client_id for c in p.accepted()] == [0]
    assert p.clients[1].steps == 0 and p.clients[1].bytes_up == 0
    assert p.duration_s == pytest.approx(10.0)
    # everyone on time: the round ends when the last one reports, not at the deadline
    q = plan(fleet, [0, 1], "drop", 100.0)
    assert [c.status for c in q.clients] == ["ok", "ok"]
    assert q.duration_s == pytest.approx(23.1)


def test_partial_trains_only_the_steps_that_fit():
    # deadline 6 s leaves 6 - 1.05 - 2.05 = 2.9 s of compute = 290 samples = 9 batches of 32
    p = plan(manual_fleet(1), [0], "partial", 6.0)
    c = p.clients[0]
    assert (c.status, c.steps, c.steps_total) == ("partial", 9, 16)
    assert c.fraction == pytest.approx(9 / 16)
    assert c.compute_s == pytest.approx(9 * 32 / 100)
    assert c.time_s == pytest.approx(1.05 + 2.88 + 2.05)
    assert c.time_s <= 6.0 and p.duration_s == pytest.approx(c.time_s)


def test_partial_drops_clients_that_cannot_even_transfer_in_time():
    p = plan(manual_fleet(1), [0], "partial", 3.0)  # download + upload alone take 3.1 s
    assert p.clients[0].status == "late" and p.clients[0].steps == 0
    assert p.duration_s == pytest.approx(3.0)
    q = plan(manual_fleet(1), [0], "partial", 3.2)  # 0.1 s of compute = 10 samples < one batch of 32
    assert q.clients[0].status == "late"


def test_wait_waits_for_everyone():
    fleet = manual_fleet(3)
    fleet.speed_samples_per_s[:] = [100.0, 50.0, 10.0]
    p = plan(fleet, [0, 1, 2], "wait", None)
    assert all(c.status == "ok" for c in p.clients)
    assert p.duration_s == pytest.approx(1.05 + 50.0 + 2.05)
    assert p.deadline_s is None


def test_local_steps_override_the_steps_derived_from_samples():
    # 2 epochs of 250 examples at batch 32 are 2 x 8 = 16 steps, not ceil(500 / 32) = 16 ... and of 40
    # examples at batch 32 are 2 x 2 = 4 steps, not ceil(80 / 32) = 3: the plan must say what is trained
    p = plan(manual_fleet(1), [0], "wait", None, work_samples=80, local_steps=4)
    assert (p.clients[0].steps, p.clients[0].steps_total) == (4, 4)
    assert p.clients[0].compute_s == pytest.approx(80 / 100)
    # deadline leaves 0.7 s of compute = 70 samples = 2 batches of 32
    q = plan(manual_fleet(1), [0], "partial", 1.05 + 2.05 + 0.7, work_samples=80, local_steps=4)
    assert (q.clients[0].status, q.clients[0].steps, q.clients[0].fraction) == ("partial", 2, 0.5)


def test_bad_policy_arguments_are_rejected():
    with pytest.raises(DeviceError, match="policy"):
        plan(manual_fleet(1), [0], "hurry", 5.0)
    with pytest.raises(DeviceError, match="deadline_s"):
        plan(manual_fleet(1), [0], "drop", None)
    with pytest.raises(DeviceError, match="work_samples"):
        plan(manual_fleet(2), [0, 1], "wait", None, work_samples=[1, 2, 3])


# ---- dropout and availability ------------------------------------------------------------------


def test_dropout_rate_matches_probability_and_is_seeded():
    n = 4000
    fleet = manual_fleet(n, dropout=0.1)
    p = plan(fleet, np.arange(n), "wait", None, seed=1)
    rate = np.mean([c.status == "dropout" for c in p.clients])
    assert abs(rate - 0.1) < 4 * math.sqrt(0.1 * 0.9 / n)  # 4 sigma
    dropped = [c for c in p.clients if c.status == "dropout"]
    assert all(0 <= c.time_s < 8.1 and c.bytes_up == 0 and c.steps == 0 for c in dropped)
    assert p.to_dict() == plan(fleet, np.arange(n), "wait", None, seed=1).to_dict()
    assert p.to_dict() != plan(fleet, np.arange(n), "wait", None, seed=2).to_dict()


def test_diurnal_window_and_wrap_around_midnight():
    d = Diurnal(22.0, 7.0, phase_h=0.0)
    assert d.window_end(23 * 3600) == pytest.approx(31 * 3600)  # online until 07:00 next day
    assert d.window_end(3 * 3600) == pytest.approx(7 * 3600)
    assert d.window_end(12 * 3600) is None
    shifted = Diurnal(22.0, 7.0, phase_h=2.0)  # local time = UTC + 2 h
    assert shifted.window_end(21 * 3600) is not None and d.window_end(21 * 3600) is None


def test_churn_is_deterministic_by_seed_and_query_order():
    times = np.linspace(0, 200_000, 400)
    a, b = Churn(2 * 3600, 1800, seed=(7, 3)), Churn(2 * 3600, 1800, seed=(7, 3))
    forward = [a.window_end(t) for t in times]
    backward = [b.window_end(t) for t in times[::-1]][::-1]
    assert forward == backward
    other = [Churn(2 * 3600, 1800, seed=(8, 3)).window_end(t) for t in times]
    assert forward != other
    # long-run online fraction approaches mean_on / (mean_on + mean_off) = 0.8
    c = Churn(100.0, 25.0, seed=0)
    online = np.mean([c.window_end(t) is not None for t in np.arange(0, 500_000, 10.0)])
    assert abs(online - 0.8) < 0.04


def test_mix_fleet_availability_is_seeded_and_unavailable_clients_are_never_selected():
    mix = {"phone-low": 0.4, "phone-mid": 0.3, "rpi-zero2w": 0.3}
    f1, f2 = Fleet.from_mix(60, mix, seed=5), Fleet.from_mix(60, mix, seed=5)
    times = np.arange(0, 2 * 86400, 1800.0)
    assert all(np.array_equal(f1.available(t), f2.available(t)) for t in times)
    rng = np.random.default_rng(0)
    counts = []
    for t in times:
        pool = f1.available(t)
        counts.append(len(pool))
        if len(pool):
            chosen = select_clients(pool, 10, rng)
            assert all(f1.availability[c].window_end(t) is not None for c in chosen)
    assert 0 < min(counts) < max(counts)  # diurnal and churn really change who is online
    noon = set(f1.available(12 * 3600).tolist())  # local 09:00-15:00 for every phone: all offline
    assert noon and all(f1.device_class[c] == "rpi-zero2w" for c in noon)
    midnight = set(f1.available(24 * 3600).tolist())  # local 21:00-03:00: phones from 22:00
    assert any(f1.device_class[c].startswith("phone") for c in midnight)


def test_offline_clients_are_unavailable_and_leaving_mid_round_is_a_dropout():
    windows = [TraceWindows((0.0,), (100.0,)), TraceWindows((50.0,), (60.0,)), TraceWindows((0.0,), (5.0,))]
    fleet = manual_fleet(3, availability=windows)
    p = plan(fleet, [0, 1, 2], "wait", None, sim_time=0.0)
    assert [c.status for c in p.clients] == ["ok", "unavailable", "dropout"]
    assert p.clients[2].time_s == pytest.approx(5.0) and "offline" in p.clients[2].reason
    assert p.duration_s == pytest.approx(8.1)


def test_trace_windows_repeat_with_their_period():
    w = TraceWindows((0.0, 100.0), (50.0, 150.0), period_s=200.0)
    assert w.window_end(410.0) == pytest.approx(450.0)
    assert w.window_end(460.0) is None
    assert w.window_end(520.0) == pytest.approx(550.0)


def test_next_online_is_the_opening_of_the_next_window():
    d = Diurnal(22.0, 7.0, phase_h=0.0)
    assert d.next_online(23 * 3600) == 23 * 3600  # already online
    assert d.next_online(12 * 3600) == pytest.approx(22 * 3600)
    assert Diurnal(22.0, 7.0, phase_h=2.0).next_online(12 * 3600) == pytest.approx(20 * 3600)  # local 14:00
    w = TraceWindows((0.0, 100.0), (50.0, 150.0), period_s=200.0)
    assert w.next_online(460.0) == pytest.approx(500.0)
    assert w.next_online(560.0) == pytest.approx(600.0)  # past the last window: the next period's first
    assert TraceWindows((0.0,), (50.0,)).next_online(60.0) == math.inf  # no period: never again
    assert AlwaysOn().next_online(7.0) == 7.0
    odd = TraceWindows((1000.0 / 3, 5000.0 / 7), (400.0, 8000.0), period_s=86400.0 / 7)
    patterns = [Diurnal(22.0, 7.0, phase_h=1.7), Diurnal(3.5, 9.25, phase_h=-2.2), w, odd, Churn(3600, 1800, seed=3)]
    for a in patterns:
        for t in np.linspace(0, 3 * 86400, 1001):
            nxt = a.next_online(t)
            assert nxt >= t and a.window_end(nxt) is not None, (a, t)
            if nxt > t:  # offline all the way from t to the opening (checked on a fine grid)
                assert all(a.window_end(x) is None for x in np.linspace(t, nxt, 50)[:-1]), (a, t)


def test_fleet_next_available_time_skips_to_the_first_device_back_online():
    fleet = manual_fleet(2, availability=[Diurnal(22.0, 7.0), Diurnal(20.0, 23.0)])
    assert len(fleet.available(12 * 3600)) == 0
    assert fleet.next_available_time(12 * 3600) == pytest.approx(20 * 3600)
    assert fleet.available(fleet.next_available_time(12 * 3600)).tolist() == [1]


def test_mix_allocates_exact_proportions_and_rejects_bad_mixes():
    f = Fleet.from_mix(10, {"rpi4": 0.5, "rpi5": 0.3, "phone-low": 0.2}, seed=0)
    assert sorted(f.device_class).count("rpi4") == 5 and f.device_class.count("phone-low") == 2
    assert f.network.count("4g") == 2  # phones default to 4G, boards to Wi-Fi
    with pytest.raises(DeviceError, match="sum to 1"):
        Fleet.from_mix(10, {"rpi4": 0.5}, seed=0)
    with pytest.raises(DeviceError, match="unknown device mix 'pi9'"):
        Fleet.from_mix(10, {"pi9": 1.0}, seed=0)
    with pytest.raises(DeviceError, match="unknown network"):
        Fleet.from_mix(10, {"rpi4": 1.0}, seed=0, networks="5g")


# ---- memory -------------------------------------------------------------------------------------

CFG = ModelConfig(vocab_size=2000, embed_dim=32, hidden_size=32, num_layers=2)


def test_memory_estimate_components():
    full = memory_breakdown(CFG, "full", 16, 100)
    model = SentimentRNN(CFG)
    n_params = sum(p.numel() for p in model.parameters())
    assert full["weights"] == n_params * 4 and full["grads"] == n_params * 4 and full["optimizer"] == 2 * n_params * 4
    # two LSTM layers: inputs 32 then 32, each step saves I + 7H floats
    assert full["activations"] == 16 * 100 * ((32 + 7 * 32) * 2) * 4 + 16 * 100 * 64 + 16 * (64 + 2) * 4
    assert full["workspace"] == 16 * 100 * (32 + (2 * 4 + 3) * 32 + 2 * 32) * 4  # same in every mode
    assert memory_breakdown(CFG, "feature-extraction", 16, 100)["workspace"] == full["workspace"]
    fe = memory_breakdown(CFG, "feature-extraction", 16, 100)
    assert fe["activations"] == 16 * (64 + 2) * 4 and fe["grads"] == (64 * 2 + 2) * 4
    assert estimate_training_memory(CFG, "full", 32, 100) > estimate_training_memory(CFG, "full", 16, 100)
    assert estimate_training_memory(CFG, "full", 16, 200) > estimate_training_memory(CFG, "full", 16, 100)
    dp = memory_breakdown(CFG, "fine-tune", 16, 100, dp=True)
    assert dp["grads"] == memory_breakdown(CFG, "fine-tune", 16, 100)["grads"] * 17
    assert memory_breakdown(CFG, "full", 16, 100, optimizer="sgd")["optimizer"] == 0


def test_memory_adaptation_halves_then_feature_extraction_then_excludes():
    need = lambda mode, b: estimate_training_memory(CFG, mode, b, 200)  # noqa: E731
    ok = adapt_to_memory(CFG, "full", 64, 200, ram_bytes=need("full", 64))
    assert (ok.status, ok.batch_size, ok.mode) == ("ok", 64, "full")
    halved = adapt_to_memory(CFG, "full", 64, 200, ram_bytes=need("full", 16))
    assert (halved.status, halved.batch_size, halved.mode) == ("reduced-batch", 16, "full")
    assert "batch 16 fits" in halved.reason
    budget = need("full", 8) - 1
    fe = adapt_to_memory(CFG, "full", 64, 200, ram_bytes=budget, min_batch_size=8)
    largest = max(b for b in (64, 32, 16, 8) if need("feature-extraction", b) <= budget)
    assert (fe.status, fe.mode, fe.batch_size) == ("feature-extraction", "feature-extraction", largest)
    assert largest > 8 and fe.estimated_bytes <= budget
    gone = adapt_to_memory(CFG, "full", 64, 200, ram_bytes=need("feature-extraction", 8) - 1)
    assert gone.status == "excluded" and gone.estimated_bytes == need("feature-extraction", 8)
    assert json.dumps(gone.__dict__)  # metrics-ready
    unlimited = adapt_to_memory(CFG, "full", 64, 200, ram_bytes=math.inf)
    assert unlimited.status == "ok" and unlimited.ram_bytes is None


def test_excluded_memory_clients_do_not_take_part():
    p = plan(manual_fleet(2), [0, 1], "wait", None, excluded_memory=[False, True])
    assert [c.status for c in p.clients] == ["ok", "excluded-memory"]
    assert p.clients[1].bytes_down == 0


# ---- trace files ---------------------------------------------------------------------------------


def test_example_trace_loads():
    f = load_trace(EXAMPLE)
    assert len(f) == 10
    assert f.device_class[0] == "rpi5" and f.device_class[9] == "phone-mid"
    assert np.isnan(f.relative_speed[6]) and f.speed_samples_per_s[6] == pytest.approx(38.0)
    assert f.samples_per_s([0, 6], 1000.0) == pytest.approx([318.0, 38.0])
    assert 9 not in f.available(0.0) and 9 in f.available(86400 + 7200.0)  # daily period repeats
    assert json.dumps(f.describe())


def test_json_trace_matches_csv(tmp_path):
    p = tmp_path / "t.json"
    p.write_text(
        json.dumps(
            {
                "clients": [
                    {
                        "client_id": 1,
                        "relative_speed": 0.5,
                        "down_bps": 1e6,
                        "up_bps": 1e6,
                        "latency_s": 0.1,
                        "active": "always",
                    },
                    {
                        "client_id": 0,
                        "samples_per_s": 10,
                        "down_bps": 2e6,
                        "up_bps": 1e6,
                        "latency_s": 0,
                        "active": [[0, 10], [20, 30]],
                        "period_s": 40,
                        "ram_bytes": 1e9,
                        "device_class": "x",
                    },
                ]
            }
        )
    )
    f = load_trace(p)
    assert f.device_class == ["x", "trace"] and f.down_bps.tolist() == [2e6, 1e6]
    assert f.ram_bytes[1] == math.inf and list(f.available(45.0)) == [0, 1] and list(f.available(15.0)) == [1]


def _write(tmp_path, body: str, header: str = HEADER) -> Path:
    p = tmp_path / "trace.csv"
    p.write_text(header + body)
    return p


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("0,10,-5,1e6,0.1,always\n", r"line 2: column 'down_bps' must be > 0, got '-5'"),
        ("0,10,1e6,fast,0.1,always\n", r"line 2: column 'up_bps' is not a number: 'fast'"),
        ("0,10,1e6,1e6,0.1,0-100;50-200\n", r"line 2: column 'active' intervals overlap"),
        ("0,10,1e6,1e6,0.1,100-200;0-50\n", r"line 2: column 'active' intervals are unsorted"),
        ("0,10,1e6,1e6,0.1,200-100\n", r"line 2: column 'active' interval 200-100 needs 0 <= start < end"),
        ("0,10,1e6,1e6,0.1,always\n0,10,1e6,1e6,0.1,always\n", r"line 3: duplicate client_id 0 \(first at .*line 2\)"),
        ("0,10,1e6,1e6,0.1,always\n2,10,1e6,1e6,0.1,always\n", r"client ids must be exactly 0..1; missing \[1\]"),
        ("0,10,1e6,1e6,,always\n", r"line 2: column 'latency_s' is empty"),
        ("0,10,1e6,1e6,0.1\n", r"line 2: has 6 columns in the header"),
        ("", r"no clients"),
    ],
)
def test_bad_trace_rows_are_rejected_with_file_row_and_problem(tmp_path, body, message):
    path = _write(tmp_path, body)
    with pytest.raises(DeviceError, match=message) as e:
        load_trace(path)
    assert str(path) in str(e.value)


def test_trace_header_problems(tmp_path):
    with pytest.raises(DeviceError, match=r"header: missing column\(s\) \['up_bps'\]"):
        load_trace(_write(tmp_path, "", header="client_id,samples_per_s,down_bps,latency_s,active\n"))
    with pytest.raises(DeviceError, match=r"unknown column\(s\) \['speed'\]"):
        load_trace(_write(tmp_path, "", header=HEADER.strip() + ",speed\n"))
    both = "client_id,samples_per_s,relative_speed,down_bps,up_bps,latency_s,active\n"
    with pytest.raises(DeviceError, match="line 2: give exactly one of"):
        load_trace(_write(tmp_path, "0,10,0.5,1e6,1e6,0,always\n", header=both))
    with pytest.raises(DeviceError, match="does not exist"):
        load_trace(tmp_path / "nope.csv")


# ---- aggregation and calibration -------------------------------------------------------------------


def test_summary_by_device_class_is_json_ready():
    fleet = manual_fleet(4, classes=["pi", "pi", "phone", "phone"])
    fleet.speed_samples_per_s[3] = 1.0  # hopelessly slow: late
    rounds = [plan(fleet, [0, 1, 2, 3], "drop", 20.0, seed=s) for s in range(3)]
    summary = summarize_by_class(rounds)
    assert summary["pi"]["selected"] == 6 and summary["pi"]["participation"] == 1.0
    assert summary["phone"]["late"] == 3 and summary["phone"]["participation"] == pytest.approx(0.5)
    assert summary["pi"]["bytes_up"] == 6 * 1_000_000 and summary["pi"]["mean_time_s"] == pytest.approx(8.1)
    json.dumps(summary)
    json.dumps(rounds[0].to_dict())


def test_host_throughput_calibration_is_positive_finite_and_cached():
    model = SentimentRNN(ModelConfig(vocab_size=200, embed_dim=16, hidden_size=16))
    set_trainable(model, "fine-tune")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sps = measure_host_throughput(model, batch_size=8, seq_len=32, steps=3, warmup=1)
    assert math.isfinite(sps) and sps > 0
    assert measure_host_throughput(model, batch_size=8, seq_len=32, steps=3, warmup=1) == sps
    assert all(np.array_equal(before[k], v) for k, v in model.state_dict().items())  # caller's model untouched
    set_trainable(model, "feature-extraction")
    assert measure_host_throughput(model, batch_size=8, seq_len=32, steps=3, warmup=1) != sps  # new key
