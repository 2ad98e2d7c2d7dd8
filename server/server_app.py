"""The fedrnn Flower ServerApp.

``make_server_app`` builds it for ``python -m fedrnn.simulate`` (config and prepared files
passed in); the module-level ``app`` is what ``flwr run .`` and a real SuperLink load: it
reads ``config`` (a TOML path) and ``run-dir`` from the run config in pyproject.toml
(``[tool.flwr.app.config]``) and prepares the run itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from fedrnn.config import RunConfig, load_config
from fedrnn.device_sim import DeviceSimulation
from fedrnn.federation import DeviceNodes, Federation, Prepared, RoundPlugin, VirtualClients
from fedrnn.prepare import prepare_run
from fedrnn.rundir import RunDir
from fedrnn.strategies import make_strategy


def build_plugins(cfg: RunConfig) -> list[RoundPlugin]:
    """The round plugins a config switches on, in the order they act each round."""
    plugins: list[RoundPlugin] = []
    if cfg.devices.enabled:
        plugins.append(DeviceSimulation(cfg.devices))
    return plugins


def make_server_app(cfg: RunConfig, prepared: Prepared, summary: dict[str, Any],
                    on_round: list[Callable[[dict[str, Any]], None]] | None = None,
                    console: Console | None = None) -> ServerApp:
    """A ServerApp bound to an already prepared simulation run; ``summary`` receives its totals."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        fed = Federation(cfg, prepared, make_strategy(cfg), VirtualClients(), build_plugins(cfg), console=console)
        fed.on_round.extend(on_round or [])
        summary.update(fed.run(grid))

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of ``flwr run``: every device is a SuperNode."""
    rc = context.run_config
    cfg = load_config(str(rc["config"]) if rc.get("config") else None)
    run_dir = str(rc.get("run-dir", "runs/deployment"))
    RunDir(run_dir).create(cfg.to_dict())
    prepared = prepare_run(cfg, run_dir)
    min_nodes = int(rc.get("min-nodes", cfg.run.clients_per_round))
    Federation(cfg, prepared, make_strategy(cfg), DeviceNodes(min_nodes), build_plugins(cfg)).run(grid)
