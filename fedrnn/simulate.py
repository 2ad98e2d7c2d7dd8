"""Run a federated transfer-learning study on Flower's Simulation Engine (Ray).

    python -m fedrnn.simulate --clients 100
    python -m fedrnn.simulate --config configs/tiny.toml --out runs/tiny
    python -m fedrnn.simulate --resume runs/tiny        # after a crash or kill -9

Results land in ``runs/NAME/`` (see ``fedrnn.runs.rundir``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rich.console import Console

from fedrnn.config import STRATEGIES, ConfigError, RunConfig, config_from_dict, load_config
from fedrnn.data.loaders import DataError
from fedrnn.data.partitions import PartitionError
from fedrnn.federation.loop import Prepared
from fedrnn.model.checkpoint import CheckpointError, write_json
from fedrnn.runs.plots import plot_run
from fedrnn.runs.prepare import prepare_run
from fedrnn.runs.rundir import RunDir

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.toml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML config (default: configs/default.toml)")
    p.add_argument("--out", help="run directory to create (default: runs/<strategy>-<mode>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last completed round")
    p.add_argument("--clients", type=int)
    p.add_argument("--rounds", type=int)
    p.add_argument("--clients-per-round", type=int)
    p.add_argument("--alpha", type=float, help="Dirichlet label-skew concentration")
    p.add_argument("--mode", help="feature-extraction | fine-tune | full")
    p.add_argument("--strategy", help=" | ".join(STRATEGIES))
    p.add_argument("--target", help="amazon | imdb | a labelled .jsonl(.gz)/.csv/.tsv file")
    p.add_argument("--partition", help="natural | dirichlet | quantity (default: the target's own)")
    p.add_argument("--partition-column", help="column whose values are the natural clients (default: run.group_column)")
    p.add_argument("--seed", type=int)
    p.add_argument("--teacher", help="teacher checkpoint directory (default: cache/teacher)")
    p.add_argument("--data-dir", help="data directory (default: $FEDRNN_DATA_DIR or ./data)")
    p.add_argument("--verbose", action="store_true", help="keep Flower's and Ray's own logs")
    return p.parse_args(argv)


def overrides_from_args(a: argparse.Namespace) -> dict[str, dict[str, Any]]:
    run = {
        k: v
        for k, v in {
            "clients": a.clients,
            "rounds": a.rounds,
            "clients_per_round": a.clients_per_round,
            "alpha": a.alpha,
            "mode": a.mode,
            "strategy": a.strategy,
            "target": a.target,
            "partition": a.partition,
            "partition_column": a.partition_column,
            "seed": a.seed,
            "teacher": a.teacher,
            "data_dir": a.data_dir,
        }.items()
        if v is not None
    }
    return {"run": run} if run else {}


def backend_config(cfg: RunConfig) -> dict[str, Any]:
    """Ray resources: ``actors`` workers of one logical CPU each, or attach to a cluster.

    ``max_restarts``: Ray restarts a worker whose process died (a client crashed or was OOM-killed);
    without it Flower puts the dead actor back in its pool and every later job sent to it fails.
    ``max_task_retries``: a job that reaches a worker while it restarts (or whose worker died under
    it) runs once more instead of failing: Flower hands the restarting actor the next job at once,
    and an honest client must not fail for its neighbour's crash. A job that crashes twice fails.
    """
    init: dict[str, Any] = (
        {"address": cfg.simulation.ray_address} if cfg.simulation.ray_address else {"num_cpus": cfg.simulation.actors}
    )
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0, "max_restarts": -1, "max_task_retries": 1},
            "init_args": init}


def start_ray(cfg: RunConfig, verbose: bool = False) -> None:
    """Start (or attach to) Ray now, as Flower's Ray backend would, so its start-up overlaps ours.

    Flower initialises Ray only once the ServerApp is running and its workers import the
    ClientApp only on their first job; both sat on the critical path of round 1. Started here,
    Ray comes up while the run is prepared, and each worker process imports the ClientApp
    (torch, Flower, fedrnn) as it starts (``preload_client_app``), before any job reaches it.
    Flower then finds Ray initialised and uses it; ``backend_config`` stays the source of the
    resources. The runtime env carries this process's import path, as Flower's does.

    A local Ray (no ``ray_address``) listens on the loopback interface only: on Linux Ray would
    otherwise serve its unauthenticated ports on the machine's network address. Ray reads that
    switch when it is first imported, so call this before anything imports ``ray``.
    """
    if not cfg.simulation.ray_address:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray's switch for loopback-only nodes
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # Ray's future default; silences its warning
    import ray

    if ray.is_initialized():
        return
    init = dict(backend_config(cfg)["init_args"])
    if not verbose:
        init |= {"logging_level": logging.ERROR, "log_to_driver": False}
    path = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    ray.init(
        runtime_env={"env_vars": {"PYTHONPATH": path}, "worker_process_setup_hook": preload_client_app},
        include_dashboard=False,
        **init,
    )


def preload_client_app() -> None:
    """Ray worker start-up hook: import the ClientApp's modules before the first job needs them."""
    import clients.client_app  # noqa: F401


def round_printer(console: Console, rounds: int):
    def show(row: dict[str, Any]) -> None:
        def f(key: str) -> str:
            v = row.get(key)
            return f"{v:.4f}" if isinstance(v, float) else "  -   "

        console.print(
            f"round {row['round']:>3}/{rounds}  target {f('target_accuracy')}  source {f('retention_accuracy')}  "
            f"clients {f('fed_eval_accuracy_mean')} p10 {f('fed_eval_accuracy_p10')}  "
            f"down {row['bytes_down'] / 1e6:.1f} MB  up {row['bytes_up'] / 1e6:.1f} MB  "
            f"failed {row['failures']}  {row['round_seconds']:.1f} s",
            soft_wrap=True,
        )

    return show


def run_simulation_for(cfg: RunConfig, prepared: Prepared, console: Console, verbose: bool = False) -> dict[str, Any]:
    """Run (or continue) the prepared run on the Simulation Engine; returns totals."""
    from flwr.simulation import run_simulation

    from clients.client_app import app as client_app
    from server.server_app import make_server_app

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    summary: dict[str, Any] = {}
    server_app = make_server_app(cfg, prepared, summary, [round_printer(console, cfg.run.rounds)], console)
    start_ray(cfg, verbose)  # a no-op when main() has started it already
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=max(cfg.run.clients_per_round, cfg.simulation.actors),
        backend_config=backend_config(cfg),
    )
    if not summary:
        raise RuntimeError("the simulation ended without completing the run; see the log above")
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    console = Console()
    if a.resume:
        rd = RunDir(a.resume)
        if not (rd.path / "config.json").is_file():
            raise SystemExit(f"--resume {a.resume}: no config.json there; is it a fedrnn run directory?")
        cfg = config_from_dict(rd.config())
    else:
        try:
            cfg = load_config(a.config or DEFAULT_CONFIG, overrides_from_args(a))
        except ConfigError as e:
            raise SystemExit(f"config error: {e}") from None
        rd = RunDir(a.out or f"runs/{cfg.run.strategy}-{cfg.run.mode}-{time.strftime('%Y%m%d-%H%M%S')}")
        if (rd.path / "state.json").is_file():
            raise SystemExit(f"{rd.path} already holds a run; use --resume {rd.path} or another --out")
        rd.create(cfg.to_dict())
    t0 = time.perf_counter()
    with ThreadPoolExecutor(1) as pool:  # prepare the run's files while Ray starts
        preparing = pool.submit(prepare_run, cfg, rd.path, console)
        start_ray(cfg, a.verbose)
        try:
            prepared = preparing.result()
        except (DataError, CheckpointError, PartitionError) as e:  # bad input: say what, not a traceback
            raise SystemExit(f"error: {e}") from None
    totals = run_simulation_for(cfg, prepared, console, a.verbose)
    wall = time.perf_counter() - t0
    rows = rd.read_metrics()
    final = rows[-1] if rows else {}
    summary = {
        "final": final,
        "wall_seconds_this_invocation": wall,
        "simulation_efficiency": totals["client_train_seconds"] / max(totals["wall_seconds"], 1e-9),
        **totals,
    }
    write_json(rd.path / "summary.json", summary)
    plot_run(rows, rd.path)
    if any("sim_time_h" in r for r in rows):  # a device-fleet run: accuracy against simulated wall-clock time
        timed = [r if r["round"] else {**r, "sim_time_h": 0.0} for r in rows]
        plot_run(
            timed, rd.path, "sim_time_h", "simulated wall-clock hours", suffix="_vs_sim_hours", kinds=("accuracy",)
        )
    console.print(
        f"[bold green]done[/]: {rd.path}  target accuracy {final.get('target_accuracy')}  "
        f"wall {wall:.0f} s  efficiency {summary['simulation_efficiency']:.2f}"
    )
    return summary


if __name__ == "__main__":
    main()
