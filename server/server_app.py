"""The fedrnn Flower ServerApp.

``make_server_app`` builds it for ``python -m fedrnn.simulate`` (config and prepared files
passed in); the module-level ``app`` is what ``flwr run .`` and a real SuperLink load: it
reads ``config`` (a TOML path) and ``run-dir`` from the run config in pyproject.toml
(``[tool.flwr.app.config]``) and prepares the run itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from fedrnn.config import ConfigError, RunConfig, config_from_dict, load_config
from fedrnn.federation.loop import DeviceNodes, Federation, Prepared, RoundPlugin, VirtualClients
from fedrnn.federation.strategies import make_strategy
from fedrnn.model.checkpoint import write_json
from fedrnn.plugins.attack import AttackSimulation
from fedrnn.plugins.compression import Int8Compression
from fedrnn.plugins.devices import DeviceSimulation
from fedrnn.plugins.distill import StudentDistillation
from fedrnn.plugins.faults import FaultInjection
from fedrnn.plugins.record_dp import privacy_plugins
from fedrnn.plugins.robust import ReplyValidator
from fedrnn.runs.prepare import prepare_run
from fedrnn.runs.rundir import RunDir
from fedrnn.simulate import round_printer


def build_plugins(cfg: RunConfig) -> list[RoundPlugin]:
    """The round plugins a config switches on, in the order they act each round."""
    # The reply validator acts first: nothing unchecked reaches another plugin or the strategy. Only an
    # int8 uplink decoder goes before it, since the validator checks the decoded float32 weights.
    # The privacy plugins go before all: the record-level ledger reads only each reply's privacy state, and
    # every update a client released must be accounted, even one the validator then rejects.
    plugins: list[RoundPlugin] = privacy_plugins(cfg)
    if cfg.compression.active:
        plugins.append(Int8Compression(cfg.compression))
    plugins.append(ReplyValidator(cfg.robust))
    if cfg.attack.clients:
        plugins.append(AttackSimulation(cfg.attack))
    if cfg.faults.enabled:
        plugins.append(FaultInjection(cfg.faults))
    if cfg.devices.enabled:
        plugins.append(DeviceSimulation(cfg.devices))
    if cfg.distill.enabled:  # last: it distils from the aggregate of the replies every other plugin accepted
        plugins.append(StudentDistillation(cfg.distill))
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
    run_dir = RunDir(str(rc.get("run-dir", "runs/deployment")))
    resuming = (run_dir.path / "state.json").is_file()
    if resuming:
        cfg = config_from_dict(run_dir.config())  # the run's own config, as --resume does
    virtual = str(rc.get("placement", "devices")) == "virtual"
    if cfg.devices.enabled and not virtual:
        raise ConfigError(f"{rc.get('config')}: [devices] simulates a device fleet; on real SuperNodes the devices "
                          "are real, so set [devices] enabled = false (or leave the section out)")
    if not resuming:
        run_dir.create(cfg.to_dict())
    prepared = prepare_run(cfg, run_dir.path)
    min_nodes = int(rc.get("min-nodes", cfg.run.clients_per_round))
    placement = VirtualClients() if virtual else DeviceNodes(min_nodes)
    fed = Federation(cfg, prepared, make_strategy(cfg), placement, build_plugins(cfg))
    fed.on_round.append(round_printer(Console(), cfg.run.rounds))  # one line per round in `flwr log`
    totals = fed.run(grid)
    rows = run_dir.read_metrics()
    write_json(run_dir.path / "summary.json", {"final": rows[-1] if rows else {}, **totals})
