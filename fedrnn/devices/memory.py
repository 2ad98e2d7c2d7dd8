"""How much memory local training needs, and how a client short of RAM adapts (or is excluded).

A Raspberry Pi Zero 2 W has under 100 MiB left for tensors once the OS and the torch runtime
are loaded, so whether a client can train at all - and in which mode and batch size - is part
of the simulation, not an afterthought. The estimate is analytic (no allocation), exact in
parameter counts, and checked against measured peak RSS (see :func:`memory_breakdown`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from fedrnn.devices.errors import DeviceError

OPTIMIZER_STATE_SLOTS = {"sgd": 0, "sgd-momentum": 1, "adam": 2, "adamw": 2}
FLOAT_BYTES = 4


@functools.lru_cache(maxsize=64)
def _parameter_counts(model_cfg: Any, mode: str) -> tuple[int, int]:
    """(all, trainable) parameter counts, exact, from a model built on the meta device (no memory)."""
    import torch

    from fedrnn.model.rnn import SentimentRNN, trainable_names

    with torch.device("meta"):
        model = SentimentRNN(model_cfg)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    return sum(sizes.values()), sum(sizes[n] for n in trainable_names(model, mode))


def memory_breakdown(
    model_cfg: Any, mode: str, batch_size: int, seq_len: int, optimizer: str = "adam", dp: bool = False
) -> dict[str, int]:
    """Bytes of training memory by component (float32), for the adaptation rule and for reports.

    weights: every parameter (the frozen part still runs forward). grads: trainable parameters;
    with DP, Opacus keeps a per-sample gradient for each example plus the summed one, so
    ``batch_size + 1`` copies. optimizer: state slots per trainable parameter (Adam: 2).
    activations: what autograd saves per time step and example for the layers that are
    trained through - for an LSTM layer its input plus 4 gates, cell, hidden and tanh(cell)
    (``I + 7H``); for a GRU its input plus 3 gates, hidden and the reset-gated candidate term
    (``I + 5H``); one-byte dropout masks on those inputs; the pooled features for the head.
    Fine-tune trains through the top recurrent layer only, feature-extraction through none.
    workspace: transient tensors that exist in every mode, even with nothing saved, for the
    widest layer: its input, the gate input projections and activations (``2GH``), the states
    (LSTM 3H, GRU 2H), and two pooling temporaries (``2W``) per token. Checked against the peak
    RSS of real train steps on this host (LSTM, E=128, H=256, 2 layers, two runs each): batch 64
    x 400 tokens measured 728-751 / estimated 793 MiB (full), 537-580 / 574 (fine-tune), 375-377 /
    362 (feature-extraction); batch 16 x 200: 104-109 / 139 (full), 54-57 / 55 (feature-extraction).
    Not yet checked for GRU or bidirectional models.
    """
    from fedrnn.model.rnn import TRANSFER_MODES

    if mode not in TRANSFER_MODES:
        raise DeviceError(f"transfer mode must be one of {TRANSFER_MODES}, got {mode!r}")
    if optimizer not in OPTIMIZER_STATE_SLOTS:
        raise DeviceError(f"optimizer must be one of {sorted(OPTIMIZER_STATE_SLOTS)}, got {optimizer!r}")
    if batch_size < 1 or seq_len < 1:
        raise DeviceError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    n_all, n_train = _parameter_counts(model_cfg, mode)

    cfg = model_cfg
    directions = 2 if cfg.bidirectional else 1
    width = cfg.hidden_size * directions
    per_step = 7 if cfg.cell == "lstm" else 5
    layers = {"full": range(cfg.num_layers), "fine-tune": [cfg.num_layers - 1], "feature-extraction": []}[mode]
    act_floats, mask_bytes = 0, 0
    for layer in layers:
        inp = cfg.embed_dim if layer == 0 else width
        act_floats += directions * batch_size * seq_len * (inp + per_step * cfg.hidden_size)
        mask_bytes += batch_size * seq_len * inp
    head_in = width * (2 if cfg.pooling == "meanmax" else 1)
    gates, states = (4, 3) if cfg.cell == "lstm" else (3, 2)
    workspace = (
        batch_size
        * seq_len
        * (max(cfg.embed_dim, width) + directions * (2 * gates + states) * cfg.hidden_size + 2 * width)
    )
    return {
        "weights": n_all * FLOAT_BYTES,
        "grads": n_train * FLOAT_BYTES * ((batch_size + 1) if dp else 1),
        "optimizer": n_train * FLOAT_BYTES * OPTIMIZER_STATE_SLOTS[optimizer],
        "activations": act_floats * FLOAT_BYTES + mask_bytes + batch_size * (head_in + cfg.num_classes) * FLOAT_BYTES,
        "workspace": workspace * FLOAT_BYTES,
        "inputs": batch_size * seq_len * 8,
    }


def estimate_training_memory(
    model_cfg: Any, mode: str, batch_size: int, seq_len: int, optimizer: str = "adam", dp: bool = False
) -> int:
    """Total bytes a client needs to train (sum of :func:`memory_breakdown`)."""
    return sum(memory_breakdown(model_cfg, mode, batch_size, seq_len, optimizer, dp).values())


@dataclass
class MemoryDecision:
    """How a client fits its RAM budget: status ok / reduced-batch / feature-extraction / excluded."""

    status: str
    mode: str
    batch_size: int
    estimated_bytes: int
    ram_bytes: float | None
    reason: str


def adapt_to_memory(
    model_cfg: Any,
    mode: str,
    batch_size: int,
    seq_len: int,
    ram_bytes: float,
    optimizer: str = "adam",
    dp: bool = False,
    min_batch_size: int = 8,
) -> MemoryDecision:
    """Fit training into ``ram_bytes``: halve the batch down to ``min_batch_size``, then fall back to
    feature-extraction (largest batch of the same halving ladder that fits), else exclude."""
    if min_batch_size < 1 or batch_size < 1:
        raise DeviceError(f"batch sizes must be >= 1, got batch_size={batch_size}, min_batch_size={min_batch_size}")
    ladder = [batch_size]
    while ladder[-1] // 2 >= min_batch_size:
        ladder.append(ladder[-1] // 2)
    budget = None if math.isinf(ram_bytes) else float(ram_bytes)

    def need(m: str, b: int) -> int:
        return estimate_training_memory(model_cfg, m, b, seq_len, optimizer, dp)

    for b in ladder:
        if need(mode, b) <= ram_bytes:
            if b == batch_size:
                return MemoryDecision("ok", mode, b, need(mode, b), budget, "fits")
            return MemoryDecision(
                "reduced-batch",
                mode,
                b,
                need(mode, b),
                budget,
                f"batch {batch_size} needs {need(mode, batch_size)} B > {ram_bytes:.0f} B; batch {b} fits",
            )
    if mode != "feature-extraction":
        for b in ladder:
            if need("feature-extraction", b) <= ram_bytes:
                return MemoryDecision(
                    "feature-extraction",
                    "feature-extraction",
                    b,
                    need("feature-extraction", b),
                    budget,
                    f"{mode} needs {need(mode, ladder[-1])} B even at batch {ladder[-1]}; "
                    f"feature-extraction at batch {b} fits",
                )
    smallest = need("feature-extraction", ladder[-1])
    return MemoryDecision(
        "excluded",
        mode,
        ladder[-1],
        smallest,
        budget,
        f"needs at least {smallest} B (feature-extraction, batch {ladder[-1]}) > {ram_bytes:.0f} B",
    )



ORT_RUNTIME_BYTES = 74 * 2**20
"""Measured on this host (VmRSS, /proc/self/status): a Python process that imported numpy,
onnxruntime and tokenizers holds 68 MiB, and creating a one-thread CPU session for a tiny
exported student adds about 6 MiB; the predictor's fixed cost before any weight."""


def estimate_inference_memory(model_cfg: Any, seq_len: int, model_file_bytes: int, tokenizer_bytes: int = 0) -> int:
    """Bytes the torch-free predictor (``fedrnn.edge.predict``) needs for one review at a time.

    The runtime's fixed cost (:data:`ORT_RUNTIME_BYTES`), the model file (onnxruntime keeps its
    initializers once: int8 weights for an int8 model), the tokenizer file (held parsed, counted
    at its file size) and the float32 activations of one ``seq_len``-token review: the embedded
    sequence, each layer's gate pre-activations and states (LSTM 4 gates + h, c; GRU 3 gates +
    h), and the pooled features. Unlike training, nothing is kept for a backward pass.
    """
    if seq_len < 1 or model_file_bytes < 0 or tokenizer_bytes < 0:
        raise DeviceError(f"seq_len must be >= 1 and byte counts >= 0, got {seq_len}, {model_file_bytes}, "
                          f"{tokenizer_bytes}")
    directions = 2 if model_cfg.bidirectional else 1
    per_layer = (6 if model_cfg.cell == "lstm" else 4) * model_cfg.hidden_size * directions
    per_token = model_cfg.embed_dim + model_cfg.num_layers * per_layer
    pooled = 2 * model_cfg.hidden_size * directions
    return ORT_RUNTIME_BYTES + model_file_bytes + tokenizer_bytes + FLOAT_BYTES * (seq_len * per_token + pooled)
