"""Everything a run needs on disk before the ServerApp starts: teacher, target cache, shards.

The files a config names are checked here (``check_files``), not when the config is validated,
so validating a config never reads a file; a bad file still stops the run before round 1.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from fedrnn.config import ConfigError, RunConfig
from fedrnn.data.files import Columns
from fedrnn.data.partitions import (
    partition_amazon,
    partition_by_group,
    partition_dirichlet,
    partition_natural,
    partition_quantity,
    save_partitions,
)
from fedrnn.data.reviews import Reviews
from fedrnn.data.target import BUILTIN, TargetData, TargetSpec, load_target, prepare_target
from fedrnn.devices import DeviceError, load_trace
from fedrnn.federation.rundir import RunDir
from fedrnn.io import write_json
from fedrnn.model.checkpoint import load_checkpoint, save_checkpoint
from fedrnn.model.pretrain import PretrainConfig, pretrain
from fedrnn.model.rnn import ModelConfig, SentimentRNN

CACHE_ENV = "FEDRNN_CACHE_DIR"


@dataclass(frozen=True)
class RunFiles:
    """Files a run reads, prepared before round 1."""

    teacher_dir: str
    target_path: str
    partitions_path: str
    run_dir: str


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, "cache"))


def ensure_teacher(cfg: RunConfig, console: Console) -> str:
    """The configured teacher, or the cached default one (pretrained now if missing).

    ``prepare_run`` loads it right away, so a bad checkpoint fails there, not inside a client.
    """
    if cfg.run.teacher:
        return str(Path(cfg.run.teacher).resolve())
    path = cache_dir() / "teacher"
    if not (path / "model.safetensors").is_file():
        console.print(f"[bold]no cached teacher in {path}: pretraining one on IMDB (about 10 minutes)[/]")
        pretrain(PretrainConfig(), path, cfg.run.data_dir or None)
    return str(path.resolve())


def target_spec(cfg: RunConfig) -> TargetSpec:
    r = cfg.run
    partition = r.partition_column if r.partition_column not in ("", r.group_column) else ""
    return TargetSpec(Columns(r.text_column, r.label_column, r.group_column, partition), tuple(r.classes),
                      r.test_fraction)


def teacher_for_classes(teacher: str, classes: list[str], out: Path, seed: int) -> str:
    """The teacher itself, or (for a target with other than its two classes) a copy with a new head.

    Everything but the linear head is the teacher's; the head gets ``len(classes)`` outputs,
    freshly initialised (PyTorch's default Linear init, seeded by the run), since the sentiment
    head's two rows mean nothing for other classes. The head is trainable in every transfer mode.
    """
    model, tok, meta = load_checkpoint(teacher)
    if model.cfg.num_classes == len(classes):
        return teacher
    if not (out / "model.safetensors").is_file():
        torch.manual_seed(seed)
        fresh = SentimentRNN(ModelConfig(**{**model.cfg.to_dict(), "num_classes": len(classes)}))
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
        fresh.load_state_dict(state | {k: v for k, v in fresh.state_dict().items() if k.startswith("head.")})
        save_checkpoint(out, fresh, tok, int(meta["max_len"]), {"base_teacher": teacher, "classes": classes})
    return str(out.resolve())


def partition(cfg: RunConfig, data: TargetData, keep: np.ndarray, console: Console) -> tuple[list[np.ndarray], dict]:
    """Client shards (indices into ``keep``) by ``run.partition``, and what was done, for the run directory."""
    r = cfg.run
    method = r.partition or ("natural" if r.target not in BUILTIN else r.target)
    labels, keys = data.pool.labels[keep], data.pool_keys[keep].astype(str)
    notes: list[str] = []
    if method == "natural":
        shards, notes = partition_natural(keys, r.clients, r.seed, r.min_client_examples)
    elif method == "dirichlet":
        shards = partition_dirichlet(labels, r.clients, r.alpha, r.seed, r.min_client_examples)
    elif method == "quantity":
        shards = partition_quantity(len(keep), r.clients, r.quantity_sigma, r.seed, r.min_client_examples)
    else:  # the built-in targets' own partitions
        pool = Reviews(texts=[""] * len(keep), labels=labels, groups=data.pool_groups[keep], source=r.target)
        shards = (partition_amazon(pool, r.clients, r.alpha, r.seed, r.min_client_examples) if method == "amazon"
                  else partition_by_group(pool, r.clients, r.seed, r.min_client_examples))
    for note in notes:
        console.print(f"partition: {note}")
    sizes = [len(s) for s in shards]
    info = {"method": method, "column": r.partition_column or r.group_column, "notes": notes,
            "sizes": {"min": min(sizes), "median": float(np.median(sizes)), "max": max(sizes)}}
    return shards, info


def save_test_split(path: Path, data: TargetData) -> None:
    """The file target's test split as JSON Lines next to the run (what every accuracy is measured on)."""
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for text, label, group in zip(data.test_texts, data.test.labels, data.test_groups, strict=True):
            f.write(json.dumps({"text": str(text), "label": data.classes[int(label)], "group": str(group)}) + "\n")


def check_files(cfg: RunConfig) -> None:
    """The files the config names are readable and fit it: a target file, the device trace (one row per client)."""
    if cfg.run.target not in BUILTIN and not Path(cfg.run.target).is_file():
        raise ConfigError(f"run.target: {cfg.run.target} names no existing file", "run.target")
    if cfg.devices.enabled and cfg.devices.trace:
        try:
            fleet = load_trace(cfg.devices.trace)
        except DeviceError as e:
            raise ConfigError(f"devices.trace: {e}", "devices.trace") from None
        if len(fleet) != cfg.run.clients:
            raise ConfigError(f"devices.trace: {cfg.devices.trace} has {len(fleet)} clients but "
                              f"run.clients = {cfg.run.clients}", "devices.trace")


def prepare_run(cfg: RunConfig, run_dir: str | Path, console: Console | None = None) -> RunFiles:
    console = console or Console()
    check_files(cfg)
    teacher = ensure_teacher(cfg, console)
    _, tok, meta = load_checkpoint(teacher)
    target = prepare_target(
        cfg.run.target,
        tok,
        int(meta["max_len"]),
        cfg.server.retention_examples,
        cache_dir() / "target",
        cfg.run.data_dir or None,
        target_spec(cfg),
    )
    rd = RunDir(run_dir)
    data = load_target(str(target))
    rd.path.mkdir(parents=True, exist_ok=True)
    teacher = teacher_for_classes(teacher, data.classes, rd.path / "teacher", cfg.run.seed)
    if not rd.partitions_path.is_file():
        keep = np.arange(len(data.pool))
        if cfg.run.data_fraction < 1:  # a seeded subsample of the pool; the rest is never given out
            rng = np.random.default_rng([cfg.run.seed, 4])
            keep = np.sort(rng.permutation(len(keep))[: int(round(cfg.run.data_fraction * len(keep)))])
        shards, info = partition(cfg, data, keep, console)
        save_partitions(str(rd.partitions_path), [keep[s] for s in shards])
        write_json(rd.path / "partition.json", info | {"classes": data.classes})
        if len(data.test_texts):
            save_test_split(rd.path / "target_test.jsonl.gz", data)
    return RunFiles(teacher, str(Path(target).resolve()), str(rd.partitions_path.resolve()), str(rd.path.resolve()))
