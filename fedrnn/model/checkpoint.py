"""Model checkpoints as a directory: safetensors weights, JSON config, tokenizer, metrics.

Loading never unpickles anything: safetensors holds only tensors and JSON holds only data,
so a checkpoint from a stranger cannot run code. Every failure names the file and problem.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from fedrnn.data.tokenizer import TokenizerError, load_tokenizer, save_tokenizer
from fedrnn.io import write_json
from fedrnn.model.rnn import ModelConfig, SentimentRNN

FORMAT = "fedrnn-checkpoint"
WEIGHTS, CONFIG, TOKENIZER, METRICS = "model.safetensors", "config.json", "tokenizer.json", "metrics.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, truncated or does not match its config."""


def save_tensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike[str], meta: dict[str, str] | None = None
) -> None:
    """Write tensors atomically (temp file + rename), so a kill never leaves half a file."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, p)


def load_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: weights file does not exist")
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{p}: corrupt or truncated safetensors file ({e})") from e


def read_json(path: str | os.PathLike[str]) -> Any:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: file does not exist")
    try:
        return json.loads(p.read_text())
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a 5,000-digit number, [[[[... nested too deep
        raise CheckpointError(f"{p}: not valid JSON ({type(e).__name__}: {e})") from e


def save_checkpoint(
    directory: str | os.PathLike[str],
    model: SentimentRNN,
    tokenizer: Tokenizer,
    max_len: int,
    metrics: dict[str, Any] | None = None,
) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_tensors(model.state_dict(), d / WEIGHTS)
    save_tokenizer(tokenizer, d / TOKENIZER)
    write_json(d / CONFIG, {"format": FORMAT, "version": 1, "model": model.cfg.to_dict(), "max_len": max_len})
    if metrics is not None:
        write_json(d / METRICS, metrics)
    return d


def check_weights(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], where: str) -> None:
    """Name every missing, unexpected, mis-shaped, mis-typed or non-finite tensor."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    common = [(k, tensors[k], v) for k, v in expected.items() if k in tensors]
    shapes = [f"{k}: {tuple(t.shape)} != {tuple(v.shape)}" for k, t, v in common if t.shape != v.shape]
    dtypes = [f"{k}: {t.dtype} != {v.dtype}" for k, t, v in common if t.dtype != v.dtype]
    if missing or extra or shapes or dtypes:
        raise CheckpointError(
            f"{where}: weights do not match the model config (missing {missing}, unexpected {extra}, "
            f"shape {shapes}, dtype {dtypes})"
        )
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{where}: tensors {bad} contain NaN or infinite values")


def load_checkpoint(directory: str | os.PathLike[str]) -> tuple[SentimentRNN, Tokenizer, dict[str, Any]]:
    """Model (eval mode), tokenizer and the config dict of a checkpoint directory."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory {d} does not exist")
    cfg = read_json(d / CONFIG)
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise CheckpointError(
            f"{d / CONFIG}: not a {FORMAT} config (format={cfg.get('format') if isinstance(cfg, dict) else cfg!r})"
        )
    try:
        model_cfg = ModelConfig.from_dict(cfg["model"])
        max_len = cfg["max_len"]
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{d / CONFIG}: bad model config ({type(e).__name__}: {e})") from e
    tensors = load_tensors(d / WEIGHTS)
    # Shapes come from a model on the meta device (no memory): a config claiming a vocabulary of 10^12
    # is refused here instead of allocating terabytes.
    try:
        with torch.device("meta"):
            skeleton = SentimentRNN(model_cfg).state_dict()
    except (RuntimeError, OverflowError, TypeError) as e:  # e.g. sizes whose byte count overflows
        raise CheckpointError(f"{d / CONFIG}: model config sizes are impossible ({e})") from e
    check_weights(skeleton, tensors, str(d / WEIGHTS))
    model = SentimentRNN(model_cfg)
    model.load_state_dict(tensors)
    try:
        tok = load_tokenizer(d / TOKENIZER)
    except TokenizerError as e:
        raise CheckpointError(str(e)) from e
    if tok.get_vocab_size() > model_cfg.vocab_size:
        raise CheckpointError(
            f"{d / TOKENIZER}: vocabulary {tok.get_vocab_size()} exceeds model vocab_size {model_cfg.vocab_size}"
        )
    cfg["max_len"] = max_len
    return model.eval(), tok, cfg
