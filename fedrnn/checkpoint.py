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

from fedrnn.models import ModelConfig, SentimentRNN
from fedrnn.tokenizer import TokenizerError, load_tokenizer, save_tokenizer

FORMAT = "fedrnn-checkpoint"
WEIGHTS, CONFIG, TOKENIZER, METRICS = "model.safetensors", "config.json", "tokenizer.json", "metrics.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, truncated or does not match its config."""


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike[str], meta: dict[str, str] | None = None) -> None:
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


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")
    os.replace(tmp, p)


def read_json(path: str | os.PathLike[str]) -> Any:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: file does not exist")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}: not valid JSON ({e})") from e


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


def load_model_weights(model: SentimentRNN, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Load a full state dict, naming every missing, unexpected or mis-shaped tensor."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    shapes = [f"{k}: {tuple(tensors[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if missing or extra or shapes:
        raise CheckpointError(f"{where}: weights do not match the model config (missing {missing}, unexpected {extra}, shape {shapes})")
    model.load_state_dict(tensors)


def load_checkpoint(directory: str | os.PathLike[str]) -> tuple[SentimentRNN, Tokenizer, dict[str, Any]]:
    """Model (eval mode), tokenizer and the config dict of a checkpoint directory."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory {d} does not exist")
    cfg = read_json(d / CONFIG)
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise CheckpointError(f"{d / CONFIG}: not a {FORMAT} config (format={cfg.get('format') if isinstance(cfg, dict) else cfg!r})")
    try:
        model_cfg = ModelConfig.from_dict(cfg["model"])
        max_len = int(cfg["max_len"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{d / CONFIG}: bad model config ({e})") from e
    model = SentimentRNN(model_cfg)
    load_model_weights(model, load_tensors(d / WEIGHTS), str(d / WEIGHTS))
    try:
        tok = load_tokenizer(d / TOKENIZER)
    except TokenizerError as e:
        raise CheckpointError(str(e)) from e
    if tok.get_vocab_size() > model_cfg.vocab_size:
        raise CheckpointError(f"{d / TOKENIZER}: vocabulary {tok.get_vocab_size()} exceeds model vocab_size {model_cfg.vocab_size}")
    cfg["max_len"] = max_len
    return model.eval(), tok, cfg
