"""A fedrnn run's client jobs, run back to back in one process: the denominator of the engine's parallel gain.

    python benchmarks/serial_jobs.py RUN_DIR

Replays the run's rounds with no engine at all: the same clients (fedrnn's sampling), the same
local training (``fedrnn.federation.local``), one torch thread, FedAvg weighted by examples in
between. ``T(serial) / T(run)`` says how much the engine's parallelism bought over doing the
same work on one core: 2.0 is the ceiling on two cores; a value near 1 means the engine spent
what the second core gave. Only the client jobs are timed (aggregation is not client work).
Prints one JSON line: ``{"serial_job_seconds", "serial_cpu_seconds", "jobs"}``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fedrnn.config import config_from_dict
from fedrnn.federation.local import LocalTrainConfig, build_model, load_base, local_train, shard_data
from fedrnn.federation.loop import sample
from fedrnn.federation.prepare import prepare_run
from fedrnn.federation.rundir import RunDir
from fedrnn.model.rnn import trainable_names


def serial_jobs(run_dir: Path) -> dict[str, float]:
    torch.set_num_threads(1)
    cfg = config_from_dict(RunDir(run_dir).config())
    files = prepare_run(cfg, run_dir)  # reuses the run's partitions and the cached teacher and target
    base = load_base(files.teacher_dir)
    names = trainable_names(build_model(base, {}, cfg.run.mode), cfg.run.mode)
    arrays = {n: base.state[n].numpy().astype(np.float32) for n in names}
    c, seconds, cpu, jobs = cfg.client, 0.0, 0.0, 0
    for rnd in range(1, cfg.run.rounds + 1):
        clients = sample(np.random.default_rng([cfg.run.seed, rnd]), list(range(cfg.run.clients)),
                         min(cfg.run.clients_per_round, cfg.run.clients))
        results = []
        for client in clients:
            data, _ = shard_data(files.target_path, files.partitions_path, client, c.holdout_fraction, cfg.run.seed)
            t0, cpu0 = time.perf_counter(), time.process_time()
            model = build_model(base, arrays, cfg.run.mode)
            local = LocalTrainConfig(lr=c.lr, epochs=c.local_epochs, batch_size=c.batch_size, max_steps=c.max_steps,
                                     proximal_mu=0.0, clip_norm=c.clip_norm,
                                     seed=cfg.run.seed * 1_000_003 + rnd * 1009 + client,
                                     frozen_cache_mb=c.frozen_cache_mb)
            trained, _ = local_train(model, data, local, names)
            seconds += time.perf_counter() - t0
            cpu += time.process_time() - cpu0
            jobs += 1
            results.append((trained, len(data)))
        total = sum(n for _, n in results)
        arrays = {k: sum(t[k] * (n / total) for t, n in results).astype(np.float32) for k in names}
    return {"serial_job_seconds": seconds, "serial_cpu_seconds": cpu, "jobs": jobs}


if __name__ == "__main__":
    print(json.dumps(serial_jobs(Path(sys.argv[1]))))
