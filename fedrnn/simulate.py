"""Run a federated transfer-learning study on Flower's Simulation Engine (Ray).

    python -m fedrnn.simulate --clients 100
    python -m fedrnn.simulate --config configs/tiny.toml --out runs/tiny
    python -m fedrnn.simulate --config configs/tiny.toml --set client.lr=0.01 --set server.eval_every=2
    python -m fedrnn.simulate --resume runs/tiny        # after a crash or kill -9
    python -m fedrnn.simulate --resume runs/tiny --rounds 40   # continue a finished run for more rounds

Results land in ``runs/NAME/`` (see ``fedrnn.federation.rundir``).
"""

from __future__ import annotations

import argparse
import os
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rich.console import Console

from fedrnn.config import (
    STRATEGIES,
    TARGETS,
    ConfigError,
    Overrides,
    RunConfig,
    config_from_dict,
    extend_rounds,
    load_config,
    parse_set,
)
from fedrnn.data.partitions import PARTITIONS, PartitionError
from fedrnn.data.reviews import DataError
from fedrnn.federation.prepare import check_files
from fedrnn.federation.rundir import RunDir
from fedrnn.io import write_json
from fedrnn.model.checkpoint import CheckpointError
from fedrnn.model.rnn import TRANSFER_MODES
from fedrnn.runs.console import accuracy, round_printer
from fedrnn.runs.failures import RunFailedError
from fedrnn.runs.interrupt import resume_command, stop_on_sigint
from fedrnn.runs.lifecycle import SUMMARY, Run, prepare, simulate
from fedrnn.runs.ray_engine import start_ray
from fedrnn.runs.records import write_metrics_csv

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.toml"


# The named flags: shorthands for the most-used [run] keys (any key: --set), validated like the file's values.
RUN_FLAGS = ("clients", "rounds", "clients_per_round", "alpha", "mode", "strategy", "target", "partition",
             "partition_column", "seed", "teacher", "data_dir")


def _config_keys() -> str:
    """Every config key by section, for --help (the defaults and comments are in fedrnn/config.py)."""
    return "\n".join(textwrap.fill(", ".join(keys), 100, initial_indent=f"  [{name}] ", subsequent_indent="    ")
                     for name, keys in RunConfig().to_dict().items())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m fedrnn.simulate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (for --set section.key=value):\n" + _config_keys(),
    )
    p.add_argument("--config", metavar="TOML", help="TOML config (default: configs/default.toml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="set any config key (listed below), after the file and the flags; repeatable; VALUE is a "
                        "TOML value and bare words are strings, e.g. --set client.lr=0.01 "
                        "--set devices.mix='{rpi4=0.5, rpi5=0.5}'")
    p.add_argument("--out", metavar="DIR", help="run directory to create (default: runs/<strategy>-<mode>-<time>); "
                                                "refused if it holds a run, unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="delete the run already in --out DIR and start anew")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last completed round, with its own "
                                                       "config; only --rounds N (more rounds) may change")
    p.add_argument("--clients", type=int, metavar="N", help="run.clients: number of simulated clients")
    p.add_argument("--rounds", type=int, metavar="N", help="run.rounds: federated rounds (with --resume: a new, "
                                                           "larger total)")
    p.add_argument("--clients-per-round", type=int, metavar="N", help="run.clients_per_round: clients sampled a round")
    p.add_argument("--alpha", type=float, help="run.alpha: Dirichlet label-skew concentration (smaller: more skew)")
    p.add_argument("--mode", choices=TRANSFER_MODES, help="run.mode: which teacher layers the clients train")
    p.add_argument("--strategy", choices=STRATEGIES, help="run.strategy: aggregation rule")
    p.add_argument("--target", metavar="NAME|FILE", help=f"run.target: target data set, one of {', '.join(TARGETS)}, "
                                                          "or a labelled .jsonl(.gz)/.csv/.tsv file")
    p.add_argument("--partition", choices=PARTITIONS, help="run.partition: clients by a column's values (natural), "
                                                           "label skew (dirichlet) or size skew (quantity)")
    p.add_argument("--partition-column", metavar="COLUMN", help="run.partition_column: the natural partition's column "
                                                                "(default: run.group_column)")
    p.add_argument("--seed", type=int, help="run.seed: seed of partitions, sampling and training")
    p.add_argument("--teacher", metavar="DIR", help="run.teacher: teacher checkpoint directory "
                                                    "(default: cache/teacher)")
    p.add_argument("--data-dir", metavar="DIR", help="run.data_dir: data directory (default: $FEDRNN_DATA_DIR or "
                                                     "./data)")
    p.add_argument("--verbose", action="store_true", help="keep Flower's and Ray's own logs")
    return p.parse_args(argv)


def overrides_from_args(a: argparse.Namespace) -> Overrides:
    """The named flags, then the --set items, each remembered with its flag for error messages."""
    out = Overrides()
    for name in RUN_FLAGS:
        value = getattr(a, name)
        if value is not None:
            out.add(f"run.{name}", value, f"--{name.replace('_', '-')} {value}")
    return parse_set(a.set, out)


def new_run(a: argparse.Namespace) -> Run:
    """The validated config of a new run and its freshly created directory (``--out``).

    A directory that already holds a run is refused (two runs would mix in one metrics file),
    unless ``--overwrite`` clears that run's files first.
    """
    cfg = load_config(a.config or DEFAULT_CONFIG, overrides_from_args(a))
    check_files(cfg)  # prepare_run checks them too; here a bad file leaves no half-made run directory
    rd = RunDir(a.out or f"runs/{cfg.run.strategy}-{cfg.run.mode}-{time.strftime('%Y%m%d-%H%M%S')}")
    if found := rd.holds_run():
        if not a.overwrite:
            raise SystemExit(f"--out {rd.path} already holds a run ({', '.join(found)}): continue it with "
                             f"--resume {rd.path}, replace it with --overwrite, or choose another --out")
        rd.clear()
    rd.create(cfg.to_dict())
    return Run(cfg, rd)


def resume_run(a: argparse.Namespace) -> Run:
    """A started run's directory and its own config; refuses every flag that would change it but --rounds N."""
    rd = RunDir(a.resume)
    if not (rd.path / "config.json").is_file():
        raise SystemExit(f"--resume {a.resume}: no config.json there; is it a fedrnn run directory?")
    overrides = overrides_from_args(a)
    refused = [flag for flag, given in (("--config", a.config), ("--out", a.out), ("--overwrite", a.overwrite))
               if given] + [origin for key, origin in overrides.origins.items() if key != "run.rounds"]
    if refused:
        raise SystemExit(f"--resume {a.resume} continues the run with its own config; it cannot take "
                         f"{', '.join(refused)}. Only more rounds (--rounds N) may be added; for anything else "
                         "start a new run (--out DIR)")
    cfg = config_from_dict(rd.config())
    if "run.rounds" in overrides.origins:
        grown = extend_rounds(cfg, overrides.values["run"]["rounds"], overrides.origins["run.rounds"])
        if grown.run.rounds != cfg.run.rounds:
            rd.create(grown.to_dict())
        cfg = grown
    return Run(cfg, rd)


def core_efficiency(totals: dict[str, Any], cfg: RunConfig) -> dict[str, Any]:
    """Client CPU seconds / (round-loop wall x cores the run was given): 1.0 = every core trained all the time.

    Summed client *wall* seconds over wall time would grow with slower (contended) clients and
    with the number of actors; CPU seconds per core cannot pass 1.
    """
    cores = min(cfg.simulation.actors * cfg.simulation.threads_per_actor, os.cpu_count() or 1)
    return {"cores": cores,
            "efficiency_per_core": totals["client_cpu_seconds"] / max(totals["wall_seconds"] * cores, 1e-9)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    console = Console()
    try:
        run = resume_run(a) if a.resume else new_run(a)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    run.on_round.append(round_printer(console, run.cfg.run.rounds))
    stop_on_sigint(console, run.dir.path, before_exit=lambda: write_metrics_csv(run.dir))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(1) as pool:  # prepare the run's files while Ray starts
        preparing = pool.submit(prepare, run, console)
        start_ray(run.cfg, a.verbose)
        try:
            preparing.result()
        except (ConfigError, DataError, CheckpointError, PartitionError) as e:  # bad input: say what, not a traceback
            raise SystemExit(f"error: {e}") from None
    try:
        totals = simulate([run], a.verbose, console)[str(run.dir.path)]
    except RunFailedError as e:
        raise SystemExit(f"error: {e}\n(the run stopped; once the cause is fixed, continue it with "
                         f"`{resume_command(run.dir.path)}`)") from None
    wall = time.perf_counter() - t0
    summary = {**totals, "wall_seconds_this_invocation": wall, **core_efficiency(totals, run.cfg)}
    write_json(run.dir.path / SUMMARY, summary)
    console.print(
        f"[bold green]done[/]: {run.dir.path}  target accuracy {accuracy(summary['final'].get('target_accuracy'))}  "
        f"wall {wall:.0f} s  per-core efficiency {summary['efficiency_per_core']:.2f}", highlight=False, soft_wrap=True
    )
    return summary


if __name__ == "__main__":
    main()
