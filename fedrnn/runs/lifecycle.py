"""One run's lifecycle, shared by ``python -m fedrnn.simulate``, both ServerApp entry points and the studies.

    open_run -> prepare -> execute (the round loop, inside a ServerApp) -> summary.json

``open_run`` creates a run directory (or reopens one to resume: its own ``config.json`` wins),
``prepare`` writes what round 1 needs (``fedrnn.federation.prepare``), ``execute`` builds the
strategy and plugins the config asks for, runs the round loop on a Flower Grid and writes
``summary.json``. ``simulate`` runs one or more prepared runs, in order, inside one Flower
simulation (studies batch their arms so Ray starts once).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from fedrnn.config import RunConfig, config_from_dict
from fedrnn.federation.loop import Federation, Placement, VirtualClients
from fedrnn.federation.prepare import RunFiles, prepare_run
from fedrnn.federation.rundir import RunDir
from fedrnn.federation.strategies import make_strategy
from fedrnn.io import write_json
from fedrnn.model.checkpoint import read_json
from fedrnn.plugins import build_plugins
from fedrnn.runs.console import failure_printer
from fedrnn.runs.failures import FailureGuard
from fedrnn.runs.plots import plot_run_dir
from fedrnn.runs.ray_engine import run_on_simulation_engine
from fedrnn.runs.records import ClientLog, write_metrics_csv
from fedrnn.runs.tracking import MlflowTracker

SUMMARY = "summary.json"
RoundHook = Callable[[dict[str, Any]], None]


@dataclass
class Run:
    """A run directory with its resolved config; ``files`` once prepared."""

    cfg: RunConfig
    dir: RunDir
    files: RunFiles | None = None
    on_round: list[RoundHook] = field(default_factory=list)

    @property
    def resumable(self) -> bool:
        return (self.dir.path / "state.json").is_file()

    @property
    def done(self) -> bool:
        return (self.dir.path / SUMMARY).is_file()


def open_run(path: str | Path, cfg: RunConfig | None = None) -> Run:
    """A new run of ``cfg`` in ``path``, or (``cfg`` None, or ``path`` holding a run) that run to resume.

    A directory that already holds a run is reopened with its own ``config.json``: a resumed run
    continues what it started, whatever config the caller has now.
    """
    rd = RunDir(path)
    if (rd.path / "config.json").is_file():
        return Run(config_from_dict(rd.config()), rd)
    if cfg is None:
        raise FileNotFoundError(f"{rd.path}: no config.json there; is it a fedrnn run directory?")
    rd.create(cfg.to_dict())
    return Run(cfg, rd)


def prepare(run: Run, console: Console | None = None) -> Run:
    """Write what round 1 needs (teacher, target cache, shards); a bad input fails here, before any round."""
    run.files = prepare_run(run.cfg, run.dir.path, console)
    return run


def execute(run: Run, grid: Grid, placement: Placement | None = None, console: Console | None = None) -> dict[str, Any]:
    """Run (or continue) the round loop of a prepared run; writes and returns ``summary.json``.

    Besides ``metrics.jsonl`` the run keeps ``clients.jsonl`` (one row per client per round) and
    ``metrics.csv``, stops with :class:`~fedrnn.runs.failures.RunFailedError` when too many
    clients fail (``server.max_failure_fraction``), and logs to MLflow if ``[tracking]`` asks.
    """
    if run.files is None:
        raise RuntimeError(f"{run.dir.path}: prepare() the run before executing it")
    fed = Federation(run.cfg, run.files, make_strategy(run.cfg), placement or VirtualClients(),
                     build_plugins(run.cfg), console=console)
    tracker = MlflowTracker(run.cfg, run.dir) if run.cfg.tracking.mlflow else None
    fed.on_round.extend([*run.on_round, *([tracker] if tracker else [])])
    fed.on_replies.extend([ClientLog(run.dir), failure_printer(console or Console()),
                           FailureGuard(run.cfg.server.max_failure_fraction)])
    try:
        totals = fed.run(grid)
    except BaseException:
        write_metrics_csv(run.dir)
        if tracker:
            tracker.finish(run.dir.read_metrics(), "FAILED")
        raise
    write_metrics_csv(run.dir)
    rows = run.dir.read_metrics()
    summary = {"final": rows[-1] if rows else {}, **totals}
    write_json(run.dir.path / SUMMARY, summary)
    plot_run_dir(rows, run.dir.path)
    if tracker:
        tracker.finish(rows)
    return summary


@dataclass
class Outcome:
    """What a simulation's ServerApp did: the summaries of the runs it finished, and the exception that ended it."""

    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: Exception | None = None


def simulation_app(runs: list[Run], console: Console | None = None) -> tuple[ServerApp, Outcome]:
    """A ServerApp executing prepared ``runs`` in order on simulated SuperNodes, and what it did."""
    app, outcome = ServerApp(), Outcome()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            for run in runs:
                outcome.summaries[str(run.dir.path)] = execute(run, grid, VirtualClients(), console)
        except Exception as e:
            outcome.error = e
            raise

    return app, outcome


def simulate(runs: list[Run], verbose: bool = False, console: Console | None = None) -> dict[str, dict[str, Any]]:
    """Execute prepared ``runs`` in order in one Flower simulation; their summaries by run directory.

    The Ray resources are those of the first run's config. A finished run executes no round again.
    An exception in the round loop (e.g. :class:`~fedrnn.runs.failures.RunFailedError`) is raised
    here as it was, whatever Flower wraps it in.
    """
    if not runs:
        return {}
    app, outcome = simulation_app(runs, console)
    try:
        run_on_simulation_engine(app, runs[0].cfg, verbose)
    except Exception:
        if outcome.error is None:
            raise
    if outcome.error is not None:
        raise outcome.error
    missing = [str(run.dir.path) for run in runs if str(run.dir.path) not in outcome.summaries]
    if missing:
        raise RuntimeError(f"the simulation ended before these runs finished: {missing}; see the log above")
    return outcome.summaries


def run_batch(configs: dict[str, RunConfig], work: Path, on_round: Callable[[str], RoundHook] | None = None,
              verbose: bool = False) -> dict[str, dict[str, Any]]:
    """A study's arms: each config a run in ``work/NAME``; the unfinished ones executed in one simulation.

    Returns every arm's summary. A study interrupted midway picks up where it stopped: finished
    arms are read back, a half-run arm resumes after its last completed round.
    """
    runs = {name: open_run(work / name, cfg) for name, cfg in configs.items()}
    todo = [prepare(run) for run in runs.values() if not run.done]
    for name, run in runs.items():
        if on_round is not None:
            run.on_round.append(on_round(name))
    simulate(todo, verbose)
    return {name: read_json(run.dir.path / SUMMARY) for name, run in runs.items()}
