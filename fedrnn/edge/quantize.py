"""Int8 wire format for model tensors: per-row symmetric quantization with float32 scales.

Clients send ~4x fewer bytes per round by shipping each tensor as int8 plus one float32
scale per output row (``name`` -> int8, ``name.__scale`` -> float32), a plain dict of numpy
arrays that maps one-to-one onto a Flower ``ArrayRecord``.

Choices and why:

* **Per row** (the first axis) for every tensor with 2+ dimensions, embeddings included:
  rows of an embedding or of a gate matrix differ in range by orders of magnitude, and a
  single tensor-wide scale would round the small rows to zero.
* **1-D tensors (biases) are per-tensor int8**, not float32: they are under 1% of the
  bytes, the error-feedback residual absorbs their rounding error anyway, and it keeps the
  rule "every tensor on the wire is int8" true, so the decoder has one format to check.
* **Symmetric range [-127, 127]** (never -128), zero maps to exactly zero, so unchanged
  weights (e.g. padding rows) survive a round trip exactly.
* Deterministic rounding is round-half-to-even; stochastic rounding (``rng`` given) rounds
  up with probability equal to the fractional part, so it is unbiased in expectation —
  what keeps averaged client updates unbiased. Error bounds per element:
  ``|x - deq(q(x))| <= scale/2`` (deterministic) and ``< scale`` (stochastic).
* Scales are rounded *up* to float32 so ``127 * scale >= max|row|`` always holds: nothing
  ever clips, which is what makes the bounds above hold for every finite input.

**Int4** (``bits=4``), for when int8's ~3.9x is not enough: values in [-7, 7], two per byte
(``name`` -> uint8, the flattened tensor zero-padded to whole blocks), one float16 scale per
block of ``BLOCK4`` consecutive values (``name.__scale4``) and the shape (``name.__shape``,
int64). 4 + 16/32 = 4.5 bits a value, ~7x fewer bytes than float32. Blocks instead of rows
because a 4-bit grid needs a tight range: 32 values share a scale, not a row of hundreds.
Scales are rounded up (to float16) like int8's, so the same error bounds hold. Used on
updates with error feedback, whose residual carries the coarser rounding into the next round.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

SCALE_SUFFIX = ".__scale"
SCALE4_SUFFIX, SHAPE_SUFFIX = ".__scale4", ".__shape"  # int4: per-block float16 scales, the tensor's shape
SUFFIXES = (SCALE_SUFFIX, SCALE4_SUFFIX, SHAPE_SUFFIX)
QMAX = 127
QMAX4, BLOCK4 = 7, 32
MAX_ABS4 = float(np.finfo(np.float16).max) * QMAX4 / 2
# Above this magnitude 127 * scale may overflow float32 on dequantization.
MAX_ABS = float(np.finfo(np.float32).max) / 2
# The largest scale ``quantize`` can produce; a larger one can only come from a forged payload
# and would dequantize to infinity.
MAX_SCALE = float(np.nextafter(np.float32(MAX_ABS / QMAX), np.float32(np.inf)))


class QuantizationError(ValueError):
    """A tensor cannot be quantized, or a payload is malformed; the message names the tensor."""


def _rows(shape: tuple[int, ...]) -> int:
    """Number of scales of a tensor: one per output row for 2+ dims, one for 0-D/1-D."""
    return int(shape[0]) if len(shape) >= 2 else 1


def _as_rows(a: np.ndarray) -> np.ndarray:
    """View a tensor as ``[rows, cols]``, one row per scale (``reshape(rows, -1)`` fails on size 0)."""
    cols = int(np.prod(a.shape[1:])) if a.ndim >= 2 else a.size
    return a.reshape(_rows(a.shape), cols)


def quantize(
    x: ArrayLike, rng: np.random.Generator | None = None, name: str = "tensor"
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize one tensor: int8 values (same shape) and float32 scales of shape ``[rows]``.

    ``rng`` switches on stochastic rounding; without it rounding is deterministic.
    """
    a = np.asarray(x, dtype=np.float32)
    rows = _as_rows(a)
    if not np.isfinite(rows).all():
        raise QuantizationError(f"{name}: contains NaN or infinite values; refusing to quantize")
    amax = np.abs(rows).max(axis=1).astype(np.float64) if rows.shape[1] else np.zeros(rows.shape[0])
    if amax.size and amax.max() > MAX_ABS:
        raise QuantizationError(f"{name}: values up to {amax.max():.3g} exceed the int8 codec range {MAX_ABS:.3g}")
    scale = (amax / QMAX).astype(np.float32)
    # Round the scale up where float32 rounding made it too small, so |x / scale| <= 127 exactly.
    low = scale.astype(np.float64) * QMAX < amax
    scale[low] = np.nextafter(scale[low], np.float32(np.inf))
    t = rows.astype(np.float64) / np.where(scale > 0, scale, 1.0).astype(np.float64)[:, None]
    r = np.rint(t) if rng is None else np.floor(t + rng.random(t.shape))
    q = np.clip(r, -QMAX, QMAX).astype(np.int8)
    return q.reshape(a.shape), scale


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Float32 values of an int8 tensor and its per-row scales (no validation; see ``decode``)."""
    rows = _as_rows(q).astype(np.float32)
    return (rows * scale.astype(np.float32)[:, None]).reshape(q.shape)


def quantize4(
    x: ArrayLike, rng: np.random.Generator | None = None, name: str = "tensor"
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize one tensor to int4: packed uint8 (two values a byte) and float16 scales per block."""
    a = np.asarray(x, dtype=np.float32).ravel()
    if not np.isfinite(a).all():
        raise QuantizationError(f"{name}: contains NaN or infinite values; refusing to quantize")
    blocks = np.zeros(-(-a.size // BLOCK4) * BLOCK4, np.float32)
    blocks[: a.size] = a
    blocks = blocks.reshape(-1, BLOCK4)
    amax = np.abs(blocks).max(axis=1).astype(np.float64)
    if amax.size and amax.max() > MAX_ABS4:
        raise QuantizationError(f"{name}: values up to {amax.max():.3g} exceed the int4 codec range {MAX_ABS4:.3g}")
    scale = (amax / QMAX4).astype(np.float16)
    low = scale.astype(np.float64) * QMAX4 < amax  # float16 rounded down: round up so nothing clips
    scale[low] = np.nextafter(scale[low], np.float16(np.inf))
    t = blocks.astype(np.float64) / np.where(scale > 0, scale, 1.0).astype(np.float64)[:, None]
    r = np.rint(t) if rng is None else np.floor(t + rng.random(t.shape))
    nibbles = (np.clip(r, -QMAX4, QMAX4) + 8).astype(np.uint8).ravel()  # 1..15; 0 (= -8) never occurs
    return nibbles[0::2] | (nibbles[1::2] << 4), scale


def dequantize4(packed: np.ndarray, scale: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Float32 values of a packed int4 tensor (no validation; see ``decode``)."""
    nibbles = np.empty(packed.size * 2, np.float32)
    nibbles[0::2], nibbles[1::2] = packed & 0x0F, packed >> 4
    values = (nibbles - 8).reshape(-1, BLOCK4) * scale.astype(np.float32)[:, None]
    return values.ravel()[: int(np.prod(shape, dtype=np.int64))].reshape(shape)


def encode(
    tensors: Mapping[str, ArrayLike], rng: np.random.Generator | None = None, bits: int = 8
) -> dict[str, np.ndarray]:
    """Payload ready for an ``ArrayRecord``: int8 tensors plus ``name.__scale`` float32 scales
    (``bits=8``), or packed int4 plus ``name.__scale4`` and ``name.__shape`` (``bits=4``).

    Accepts numpy arrays or CPU torch tensors without grad (anything ``np.asarray`` takes).
    """
    if bits not in (4, 8):
        raise QuantizationError(f"bits must be 4 or 8, got {bits!r}")
    payload: dict[str, np.ndarray] = {}
    for name, x in tensors.items():
        if not isinstance(name, str) or name.endswith(SUFFIXES):
            raise QuantizationError(f"{name!r}: tensor names must be strings not ending in one of {SUFFIXES}")
        if bits == 8:
            payload[name], payload[name + SCALE_SUFFIX] = quantize(x, rng, name)
        else:
            payload[name], payload[name + SCALE4_SUFFIX] = quantize4(x, rng, name)
            payload[name + SHAPE_SUFFIX] = np.asarray(np.shape(x), dtype=np.int64)
    return payload


def is_encoded(payload: Mapping[str, Any]) -> bool:
    """Whether a payload is quantized (int8 or int4), not plain float tensors."""
    return any(isinstance(k, str) and k.endswith((SCALE_SUFFIX, SCALE4_SUFFIX)) for k in payload)


def decode(payload: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """Validate a payload and return the float32 tensors it encodes.

    ``expected`` (name -> shape), when given, must match the payload's tensors exactly; a
    server passes the shapes of the tensors it asked for. Anything malformed raises
    ``QuantizationError`` naming the tensor: wrong dtype, missing or orphan scale, scale of
    the wrong shape, a negative or non-finite scale, an int8 value of -128, a shape mismatch.
    """
    if not isinstance(payload, Mapping):
        raise QuantizationError(f"payload must be a mapping of names to arrays, got {type(payload).__name__}")
    for key, value in payload.items():
        if not isinstance(key, str):
            raise QuantizationError(f"payload key {key!r} is not a string")
        if not isinstance(value, np.ndarray):
            raise QuantizationError(f"{key}: is a {type(value).__name__}, not a numpy array")
    names = [k for k in payload if not k.endswith(SUFFIXES)]
    orphans = sorted(k for k in payload for sfx in SUFFIXES if k.endswith(sfx) and k[: -len(sfx)] not in payload)
    if orphans:
        raise QuantizationError(f"{orphans[0]}: scale without a matching tensor")
    if expected is not None:
        missing, extra = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
        if missing or extra:
            raise QuantizationError(f"payload tensors differ from those expected: missing {missing}, extra {extra}")
    out: dict[str, np.ndarray] = {}
    for name in names:
        q = payload[name]
        if name + SCALE4_SUFFIX in payload or name + SHAPE_SUFFIX in payload:
            out[name] = _decode4(payload, name, expected)
            continue
        if q.dtype != np.int8:
            raise QuantizationError(f"{name}: dtype {q.dtype}, expected int8")
        if expected is not None and tuple(q.shape) != tuple(expected[name]):
            raise QuantizationError(f"{name}: shape {tuple(q.shape)}, expected {tuple(expected[name])}")
        scale = payload.get(name + SCALE_SUFFIX)
        if scale is None:
            raise QuantizationError(f"{name}: missing scale {name + SCALE_SUFFIX!r}")
        if scale.dtype != np.float32:
            raise QuantizationError(f"{name}{SCALE_SUFFIX}: dtype {scale.dtype}, expected float32")
        if scale.shape != (_rows(q.shape),):
            raise QuantizationError(f"{name}{SCALE_SUFFIX}: shape {scale.shape}, expected ({_rows(q.shape)},)")
        if not np.isfinite(scale).all() or (scale < 0).any() or (scale > MAX_SCALE).any():
            raise QuantizationError(f"{name}{SCALE_SUFFIX}: scales must be finite, >= 0 and <= {MAX_SCALE:.4g}")
        if q.size and q.min() < -QMAX:
            raise QuantizationError(f"{name}: value -128 is outside the symmetric int8 range [-127, 127]")
        out[name] = dequantize(q, scale)
    return out


def _decode4(
    payload: Mapping[str, np.ndarray], name: str, expected: Mapping[str, tuple[int, ...]] | None
) -> np.ndarray:
    """One int4 tensor of a payload, validated (see ``decode``)."""
    packed, scale, shape = payload[name], payload.get(name + SCALE4_SUFFIX), payload.get(name + SHAPE_SUFFIX)
    if scale is None or shape is None:
        raise QuantizationError(
            f"{name}: an int4 tensor needs both {name + SCALE4_SUFFIX!r} and {name + SHAPE_SUFFIX!r}")
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise QuantizationError(f"{name}: int4 values must be a 1-D uint8 array, got {packed.dtype} {packed.shape}")
    if shape.dtype != np.int64 or shape.ndim != 1 or (shape < 0).any():
        raise QuantizationError(f"{name}{SHAPE_SUFFIX}: must be a 1-D int64 array of sizes >= 0")
    dims = tuple(int(d) for d in shape)
    if expected is not None and dims != tuple(expected[name]):
        raise QuantizationError(f"{name}: shape {dims}, expected {tuple(expected[name])}")
    blocks = -(-int(np.prod(dims, dtype=np.int64)) // BLOCK4)
    if packed.size != blocks * BLOCK4 // 2:
        raise QuantizationError(f"{name}: {packed.size} packed bytes, expected {blocks * BLOCK4 // 2} for shape {dims}")
    if scale.dtype != np.float16 or scale.shape != (blocks,):
        raise QuantizationError(f"{name}{SCALE4_SUFFIX}: {scale.dtype} {scale.shape}, expected float16 ({blocks},)")
    if not np.isfinite(scale).all() or (scale < 0).any():
        raise QuantizationError(f"{name}{SCALE4_SUFFIX}: scales must be finite and >= 0")
    if packed.size and ((packed & 0x0F) == 0).any() | ((packed >> 4) == 0).any():
        raise QuantizationError(f"{name}: value -8 is outside the symmetric int4 range [-7, 7]")
    return dequantize4(packed, scale, dims)


def payload_nbytes(payload: Mapping[str, np.ndarray]) -> int:
    """Exact bytes of array data in a payload (int8 values + float32 scales).

    Flower's ``Array`` adds a fixed ~128-byte ``.npy`` header per entry on top of this.
    """
    return sum(int(v.nbytes) for v in payload.values())


class ErrorFeedback:
    """Client-side residual memory for compressed updates (error feedback, as in EF-SGD).

    Each round the client adds the rounding error it left out last time before quantizing,
    so errors are carried forward instead of lost: the sum of what the server received over
    rounds equals the sum of the true updates minus one (bounded) residual. ``state()`` gives
    the residuals as plain numpy arrays (for a Flower ``Context.state``); ``ErrorFeedback(state)``
    restores them.
    """

    def __init__(self, residuals: Mapping[str, np.ndarray] | None = None, bits: int = 8) -> None:
        self.bits = bits
        self.residuals: dict[str, np.ndarray] = {}
        for name, r in (residuals or {}).items():
            arr = np.asarray(r)
            if arr.dtype != np.float32 or not np.isfinite(arr).all():
                raise QuantizationError(f"{name}: residual must be a finite float32 array (got {arr.dtype})")
            self.residuals[name] = arr.copy()

    def compress(
        self, tensors: Mapping[str, ArrayLike], rng: np.random.Generator | None = None
    ) -> dict[str, np.ndarray]:
        """Encode ``tensors`` plus the carried residual; remember the new rounding error."""
        corrected = {}
        for name, x in tensors.items():
            a = np.asarray(x, dtype=np.float32)
            r = self.residuals.get(name)
            if r is not None and r.shape != a.shape:
                raise QuantizationError(f"{name}: shape {a.shape} differs from its residual's {r.shape}")
            corrected[name] = a if r is None else a + r
        payload = encode(corrected, rng, self.bits)
        sent = decode(payload)
        self.residuals.update({name: corrected[name] - sent[name] for name in corrected})
        return payload

    def state(self) -> dict[str, np.ndarray]:
        return {name: r.copy() for name, r in self.residuals.items()}
