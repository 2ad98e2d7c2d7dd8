"""Everything a run needs on disk before the ServerApp starts: teacher, target cache, shards.

The files a config names are checked here (``check_files``), not when the config is validated,
so validating a config never reads a file; a bad file still stops the run before round 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from fedrnn.config import ConfigError, RunConfig
from fedrnn.data.loaders import Reviews
from fedrnn.data.partitions import partition_amazon, partition_by_group, save_partitions
from fedrnn.data.target import load_target, prepare_target
from fedrnn.devices import DeviceError, load_trace
from fedrnn.federation.rundir import RunDir
from fedrnn.model.checkpoint import load_checkpoint
from fedrnn.model.pretrain import PretrainConfig, pretrain

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


def check_files(cfg: RunConfig) -> None:
    """The files the config names are readable and fit it: the device trace, with one row per client."""
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
    )
    rd = RunDir(run_dir)
    if not rd.partitions_path.is_file():
        data = load_target(str(target))
        # the partitioners read labels and groups only
        keep = np.arange(len(data.pool))
        if cfg.run.data_fraction < 1:  # a seeded subsample of the pool; the rest is never given out
            rng = np.random.default_rng([cfg.run.seed, 4])
            keep = np.sort(rng.permutation(len(keep))[: int(round(cfg.run.data_fraction * len(keep)))])
        pool = Reviews(
            texts=[""] * len(keep), labels=data.pool.labels[keep], groups=data.pool_groups[keep], source=str(target)
        )
        if cfg.run.target == "amazon":
            shards = partition_amazon(pool, cfg.run.clients, cfg.run.alpha, cfg.run.seed, cfg.run.min_client_examples)
        else:
            shards = partition_by_group(pool, cfg.run.clients, cfg.run.seed, cfg.run.min_client_examples)
        rd.path.mkdir(parents=True, exist_ok=True)
        save_partitions(str(rd.partitions_path), [keep[s] for s in shards])
    return RunFiles(teacher, str(Path(target).resolve()), str(rd.partitions_path.resolve()), str(rd.path.resolve()))
