"""Run a federated transfer-learning study on Flower's Simulation Engine (Ray).

    python -m fedrnn.simulate --clients 100
    python -m fedrnn.simulate --config configs/tiny.toml --out runs/tiny
    python -m fedrnn.simulate --resume runs/tiny        # after a crash or kill -9

Results land in ``runs/NAME/`` (see ``fedrnn.federation.rundir``).
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rich.console import Console

from fedrnn.config import STRATEGIES, ConfigError, load_config
from fedrnn.data.loaders import DataError
from fedrnn.data.partitions import PartitionError
from fedrnn.io import write_json
from fedrnn.model.checkpoint import CheckpointError
from fedrnn.runs.console import accuracy, round_printer
from fedrnn.runs.failures import RunFailedError
from fedrnn.runs.interrupt import resume_command, stop_on_sigint
from fedrnn.runs.lifecycle import SUMMARY, RunExistsError, new_run, open_run, prepare, simulate
from fedrnn.runs.ray_engine import start_ray
from fedrnn.runs.records import write_metrics_csv

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
    p.add_argument("--target", help="amazon | imdb")
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
            "seed": a.seed,
            "teacher": a.teacher,
            "data_dir": a.data_dir,
        }.items()
        if v is not None
    }
    return {"run": run} if run else {}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    console = Console()
    try:
        if a.resume:
            run = open_run(a.resume)
        else:
            cfg = load_config(a.config or DEFAULT_CONFIG, overrides_from_args(a))
            run = new_run(a.out or f"runs/{cfg.run.strategy}-{cfg.run.mode}-{time.strftime('%Y%m%d-%H%M%S')}", cfg)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    except (FileNotFoundError, RunExistsError) as e:
        raise SystemExit(f"error: {e}") from None
    run.on_round.append(round_printer(console, run.cfg.run.rounds))
    stop_on_sigint(console, run.dir.path, before_exit=lambda: write_metrics_csv(run.dir))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(1) as pool:  # prepare the run's files while Ray starts
        preparing = pool.submit(prepare, run, console)
        start_ray(run.cfg, a.verbose)
        try:
            preparing.result()
        except (DataError, CheckpointError, PartitionError) as e:  # bad input: say what, not a traceback
            raise SystemExit(f"error: {e}") from None
    try:
        totals = simulate([run], a.verbose, console)[str(run.dir.path)]
    except RunFailedError as e:
        raise SystemExit(f"error: {e}\n(the run stopped; once the cause is fixed, continue it with "
                         f"`{resume_command(run.dir.path)}`)") from None
    wall = time.perf_counter() - t0
    summary = {
        **totals,
        "wall_seconds_this_invocation": wall,
        "simulation_efficiency": totals["client_train_seconds"] / max(totals["wall_seconds"], 1e-9),
    }
    write_json(run.dir.path / SUMMARY, summary)
    console.print(
        f"[bold green]done[/]: {run.dir.path}  target accuracy {accuracy(summary['final'].get('target_accuracy'))}  "
        f"wall {wall:.0f} s  efficiency {summary['simulation_efficiency']:.2f}", highlight=False, soft_wrap=True
    )
    return summary


if __name__ == "__main__":
    main()
