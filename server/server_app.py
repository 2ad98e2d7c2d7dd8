"""The fedrnn Flower ServerApp, as ``flwr run .`` and a real SuperLink load it.

It reads ``config`` (a TOML path) and ``run-dir`` from the run config in pyproject.toml
(``[tool.flwr.app.config]``), opens the run (resuming it if ``run-dir`` holds one), prepares its
files and executes it (``fedrnn.runs.lifecycle``). ``python -m fedrnn.simulate`` runs the same
lifecycle inside its own ServerApp.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from fedrnn.config import ConfigError, load_config
from fedrnn.federation.loop import DeviceNodes, VirtualClients
from fedrnn.runs.console import round_printer
from fedrnn.runs.lifecycle import execute, open_run, prepare

APP_DIR = Path(__file__).resolve().parent.parent
app = ServerApp()


def app_file(value: str) -> Path:
    """A relative ``config`` path names a file shipped with the app (``flwr run`` bundles configs/)."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else APP_DIR / path


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of ``flwr run``.

    ``placement = "devices"`` (default): every SuperNode is one real device with its own data.
    ``placement = "virtual"``: a local simulation SuperLink (``flwr run . local``), whose nodes
    run fedrnn's virtual clients exactly as ``python -m fedrnn.simulate`` does.
    Running it again with the same ``run-dir`` continues that run after its last completed round.
    """
    rc = context.run_config
    cfg = load_config(app_file(str(rc["config"])) if rc.get("config") else None)
    run = open_run(str(rc.get("run-dir", "runs/deployment")), cfg)  # an existing run keeps its own config
    virtual = str(rc.get("placement", "devices")) == "virtual"
    if run.cfg.devices.enabled and not virtual:
        raise ConfigError(f"{rc.get('config')}: [devices] simulates a device fleet; on real SuperNodes the devices "
                          "are real, so set [devices] enabled = false (or leave the section out)")
    prepare(run)
    run.on_round.append(round_printer(Console(), run.cfg.run.rounds))  # one line per round in `flwr log`
    min_nodes = int(rc.get("min-nodes", run.cfg.run.clients_per_round))
    execute(run, grid, VirtualClients() if virtual else DeviceNodes(min_nodes))
