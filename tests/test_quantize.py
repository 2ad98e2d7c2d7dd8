"""The int8 wire codec: error bounds, unbiased stochastic rounding, exact sizes, strict decoding."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedrnn.edge.quantize import (
    BLOCK4,
    QMAX,
    SCALE4_SUFFIX,
    SCALE_SUFFIX,
    SHAPE_SUFFIX,
    ErrorFeedback,
    QuantizationError,
    decode,
    dequantize,
    encode,
    payload_nbytes,
    quantize,
)
from fedrnn.model.rnn import ModelConfig, SentimentRNN

FLOAT_EPS = float(np.finfo(np.float32).eps)
finite32 = st.floats(min_value=-(2.0**126), max_value=2.0**126, width=32)  # the codec accepts |x| <= ~1.7e38
tensors = hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6), elements=finite32)


def _bound(x: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each element's scale (its row's), and the float32 rounding slack of its dequantized value."""
    step = np.repeat(scale.astype(np.float64), x.size // max(len(scale), 1)).reshape(x.shape)
    return step, np.abs(x.astype(np.float64)) * FLOAT_EPS


@settings(max_examples=200, deadline=None)
@given(tensors)
def test_deterministic_error_at_most_half_a_step(x: np.ndarray) -> None:
    q, scale = quantize(x)
    assert q.dtype == np.int8 and q.shape == x.shape and scale.dtype == np.float32
    assert np.abs(q.astype(np.int32)).max(initial=0) <= QMAX
    step, slack = _bound(x, scale)
    err = np.abs(x.astype(np.float64) - dequantize(q, scale).astype(np.float64))
    assert np.all(err <= step / 2 + slack)


@settings(max_examples=200, deadline=None)
@given(tensors, st.integers(0, 2**32 - 1))
def test_stochastic_error_below_one_step(x: np.ndarray, seed: int) -> None:
    q, scale = quantize(x, np.random.default_rng(seed))
    step, slack = _bound(x, scale)
    err = np.abs(x.astype(np.float64) - dequantize(q, scale).astype(np.float64))
    assert np.all((err < step) | (err <= slack))


def test_stochastic_rounding_is_unbiased_and_deterministic_is_not() -> None:
    # One row whose scale is 1/127 of 1.0; the other entries sit between grid points.
    x = np.array([[1.0, 0.3 / 127, 0.5 / 127, -2.7 / 127, 0.004]], dtype=np.float32)
    n = 20000
    draws = dequantize(*quantize(np.repeat(x, n, axis=0), np.random.default_rng(0)))  # n independent rows
    sem = (1.0 / 127) / 2 / np.sqrt(n)  # the std of one draw is at most half a step
    assert np.all(np.abs(draws.mean(0) - x[0]) < 5 * sem)
    assert abs(dequantize(*quantize(x))[0, 1] - x[0, 1]) > 50 * sem  # rounding to nearest is biased here


def test_stochastic_rounding_is_reproducible_from_the_seed() -> None:
    x = np.random.default_rng(1).normal(size=(4, 9)).astype(np.float32)
    a, b = quantize(x, np.random.default_rng(7))[0], quantize(x, np.random.default_rng(7))[0]
    assert np.array_equal(a, b)
    assert not np.array_equal(a, quantize(x, np.random.default_rng(8))[0])


def test_per_row_scales_keep_small_rows() -> None:
    x = np.array([[100.0, -50.0], [0.01, -0.02]], dtype=np.float32)
    q, scale = quantize(x)
    np.testing.assert_allclose(scale, [100 / 127, 0.02 / 127], rtol=1e-6)
    np.testing.assert_allclose(dequantize(q, scale)[1], x[1], atol=0.02 / 254 * 1.001)


def test_zero_rows_and_empty_tensors_round_trip_exactly() -> None:
    x = {"zeros": np.zeros((3, 4), np.float32), "empty": np.zeros((0, 5), np.float32), "scalar": np.float32(0.5)}
    out = decode(encode(x))
    assert np.array_equal(out["zeros"], x["zeros"]) and out["empty"].shape == (0, 5)
    assert out["scalar"].shape == () and abs(float(out["scalar"]) - 0.5) <= 0.5 / 254


def test_model_payload_is_int8_with_exact_byte_count() -> None:
    # Teacher-like widths: each row of 128 int8 values carries one 4-byte scale.
    model = SentimentRNN(ModelConfig(vocab_size=200, embed_dim=128, hidden_size=128))
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    payload = encode(state)
    names = [k for k in payload if not k.endswith(SCALE_SUFFIX)]
    assert sorted(names) == sorted(state)
    assert all(payload[k].dtype == np.int8 for k in names)
    assert all(payload[k + SCALE_SUFFIX].dtype == np.float32 for k in names)
    values = sum(v.size for v in state.values())
    scales = sum(v.shape[0] if v.ndim >= 2 else 1 for v in state.values())
    assert payload_nbytes(payload) == values + 4 * scales
    fp32 = 4 * values
    assert 3.8 < fp32 / payload_nbytes(payload) < 4.0
    assert payload["embedding.weight" + SCALE_SUFFIX].shape == (200,)  # one scale per embedding row
    assert payload["head.bias" + SCALE_SUFFIX].shape == (1,)  # 1-D: one scale per tensor
    from_torch = encode(model.state_dict())  # CPU tensors are accepted as they are
    assert all(np.array_equal(from_torch[k], payload[k]) for k in payload)


def test_payload_survives_a_flower_array_record() -> None:
    x = {"w": np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32), "b": np.ones(3, np.float32)}
    payload = encode(x)
    record = ArrayRecord({k: Array(v) for k, v in payload.items()})
    back = {k: a.numpy() for k, a in record.items()}
    assert {k: v.dtype for k, v in back.items()} == {k: v.dtype for k, v in payload.items()}
    for k, v in decode(back, expected={"w": (5, 3), "b": (3,)}).items():
        assert np.array_equal(v, decode(payload)[k])


def _good() -> dict[str, np.ndarray]:
    return encode({"layer.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "layer.bias": np.ones(4, np.float32)})


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda p: p.update({"layer.weight": p["layer.weight"].astype(np.int16)}), "layer.weight: dtype int16"),
        (lambda p: p.update({"layer.weight": p["layer.weight"].astype(np.float32)}), "layer.weight: dtype float32"),
        (lambda p: p.pop("layer.bias" + SCALE_SUFFIX), "layer.bias: missing scale"),
        (lambda p: p.pop("layer.bias"), "layer.bias.__scale: scale without a matching tensor"),
        (lambda p: p["layer.weight" + SCALE_SUFFIX].__setitem__(1, np.inf), r"layer.weight.__scale: .*finite"),
        (lambda p: p["layer.weight" + SCALE_SUFFIX].__setitem__(0, np.nan), r"layer.weight.__scale: .*finite"),
        (lambda p: p["layer.weight" + SCALE_SUFFIX].__setitem__(0, -1.0), r"layer.weight.__scale: .*>= 0"),
        (lambda p: p.update({"layer.weight.__scale": np.ones(4, np.float32)}), r"layer.weight.__scale: shape \(4,\)"),
        (lambda p: p.update({"layer.bias.__scale": np.ones(1, np.float64)}), "layer.bias.__scale: dtype float64"),
        (lambda p: p["layer.weight"].__setitem__((0, 0), -128), "layer.weight: value -128"),
        (lambda p: p.update({"layer.bias": [1, 2]}), "layer.bias: is a list"),
        (lambda p: p.update({3: np.ones(1, np.int8)}), "payload key 3"),
    ],
)
def test_decoder_rejects_malformed_payloads(mutate, match: str) -> None:
    payload = _good()
    mutate(payload)
    with pytest.raises(QuantizationError, match=match):
        decode(payload)


def test_decoder_checks_expected_names_and_shapes() -> None:
    with pytest.raises(QuantizationError, match=r"layer.weight: shape \(3, 4\), expected \(4, 3\)"):
        decode(_good(), expected={"layer.weight": (4, 3), "layer.bias": (4,)})
    with pytest.raises(QuantizationError, match=r"missing \['head.weight'\]"):
        decode(_good(), expected={"layer.weight": (3, 4), "layer.bias": (4,), "head.weight": (2, 2)})
    with pytest.raises(QuantizationError, match=r"extra \['layer.bias'\]"):
        decode(_good(), expected={"layer.weight": (3, 4)})
    assert set(decode(_good(), expected={"layer.weight": (3, 4), "layer.bias": (4,)})) == {"layer.weight", "layer.bias"}


def test_encoder_rejects_non_finite_and_reserved_names() -> None:
    with pytest.raises(QuantizationError, match="w: contains NaN"):
        encode({"w": np.array([1.0, np.nan], np.float32)})
    with pytest.raises(QuantizationError, match="ending in"):
        encode({"w" + SCALE_SUFFIX: np.ones(2, np.float32)})


any_arrays = hnp.arrays(
    st.one_of(hnp.scalar_dtypes(), st.just(np.dtype(np.int8)), st.just(np.dtype(np.float32))),
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
)
names = st.one_of(st.sampled_from(["w", "b", "w" + SCALE_SUFFIX, "b" + SCALE_SUFFIX]), st.text(max_size=8))


@st.composite
def mutated_payloads(draw: st.DrawFn) -> dict[str, np.ndarray]:
    """A valid payload with one entry replaced by an arbitrary array or removed."""
    payload = encode(draw(st.dictionaries(st.sampled_from(["w", "b"]), tensors, min_size=1)))
    key = draw(st.sampled_from(sorted(payload)))
    if draw(st.booleans()):
        payload[key] = draw(any_arrays)
    else:
        del payload[key]
    return payload


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.dictionaries(names, any_arrays, max_size=4), mutated_payloads()))
def test_decoder_fuzz_only_raises_its_own_error(payload: dict[str, np.ndarray]) -> None:
    try:
        out = decode(payload)
    except QuantizationError:
        return
    for name, v in out.items():  # whatever passes validation decodes to finite float32 of the right shape
        assert v.dtype == np.float32 and v.shape == payload[name].shape and np.isfinite(v).all()


def test_error_feedback_carries_what_rounding_drops() -> None:
    # 0.001 is far below half a step (1/254) of a row whose max is 1.0: plain rounding never sends it.
    update = {"w": np.array([[1.0, 0.001]], dtype=np.float32)}
    ef = ErrorFeedback()
    plain, fed = np.zeros((1, 2)), np.zeros((1, 2))
    for _ in range(100):
        plain += decode(encode(update))["w"]
        fed += decode(ef.compress(update))["w"]
    assert plain[0, 1] == 0.0  # without feedback the small entry is lost every round
    step = 1.0 / 127
    assert abs(fed[0, 1] - 0.1) <= step  # with feedback the sum tracks the true 0.1
    assert np.all(np.abs(ef.residuals["w"]) <= step / 2 + 1e-7)


def test_error_feedback_state_round_trips_through_numpy() -> None:
    rng = np.random.default_rng(3)
    ef = ErrorFeedback()
    ef.compress({"w": rng.normal(size=(4, 6)).astype(np.float32)})
    state = ef.state()
    assert set(state) == {"w"} and state["w"].dtype == np.float32
    record = ArrayRecord({k: Array(v) for k, v in state.items()})
    restored = ErrorFeedback({k: a.numpy() for k, a in record.items()})
    nxt = {"w": rng.normal(size=(4, 6)).astype(np.float32)}
    a, b = ef.compress(nxt), restored.compress(nxt)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(QuantizationError, match=r"w: shape \(2, 2\) differs"):
        restored.compress({"w": np.ones((2, 2), np.float32)})
    with pytest.raises(QuantizationError, match="w: residual must be a finite float32"):
        ErrorFeedback({"w": np.array([np.inf], np.float32)})


# ---------------------------------------------------------------------------------------------- int4

finite16 = st.floats(min_value=-60000.0, max_value=60000.0, width=32)  # within the int4 codec's float16 scales


@settings(max_examples=150, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=40), elements=finite16))
def test_int4_error_at_most_half_a_block_step(x: np.ndarray) -> None:
    payload = encode({"w": x}, bits=4)
    got = decode(payload, expected={"w": x.shape})["w"]
    assert got.shape == x.shape and got.dtype == np.float32
    scale = np.repeat(payload["w" + SCALE4_SUFFIX].astype(np.float64), BLOCK4)[: x.size].reshape(x.shape)
    err = np.abs(got.astype(np.float64) - x.astype(np.float64))
    assert (err <= scale / 2 * (1 + 1e-3) + np.abs(x) * FLOAT_EPS + 1e-30).all()


def test_int4_is_about_7x_smaller_than_float32_on_the_fine_tune_tensors() -> None:
    model = SentimentRNN(ModelConfig())
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items() if k.startswith(("rnn.1.", "head."))}
    fp32, int8, int4 = (payload_nbytes(p) for p in (sd, encode(sd), encode(sd, bits=4)))
    assert fp32 / int8 < 4 < 6.5 < fp32 / int4 < 8


def test_int4_error_feedback_carries_the_rounding_error() -> None:
    rng = np.random.default_rng(0)
    ef, sent_sum, true_sum = ErrorFeedback(bits=4), np.zeros(300, np.float32), np.zeros(300, np.float32)
    for _ in range(20):
        u = rng.normal(0, 0.01, 300).astype(np.float32)
        true_sum += u
        sent_sum += decode(ef.compress({"u": u}))["u"]
    # what reached the server differs from the true sum by one residual, not 20 rounds of rounding error
    np.testing.assert_allclose(sent_sum + ef.state()["u"], true_sum, atol=1e-5)
    assert np.abs(ef.state()["u"]).max() < 0.01


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda p: p.pop("w" + SHAPE_SUFFIX), "needs both"),
        (lambda p: p.__setitem__("w", p["w"][:-1]), "packed bytes"),
        (lambda p: p.__setitem__("w" + SCALE4_SUFFIX, p["w" + SCALE4_SUFFIX].astype(np.float32)), "expected float16"),
        (lambda p: p["w" + SCALE4_SUFFIX].__setitem__(0, np.inf), "finite"),
        (lambda p: p["w"].__setitem__(0, 0), "value -8"),
        (lambda p: p.__setitem__("w" + SHAPE_SUFFIX, np.array([-1, 5])), "sizes >= 0"),
    ],
)
def test_malformed_int4_payload_is_named(corrupt, match: str) -> None:
    payload = encode({"w": np.arange(70, dtype=np.float32).reshape(7, 10)}, bits=4)
    corrupt(payload)
    with pytest.raises(QuantizationError, match=match):
        decode(payload)
