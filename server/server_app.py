"""The fedrnn Flower ServerApp, as ``flwr run .`` and a real SuperLink load it.

    flwr run . --stream                                          # Flower's local simulation SuperLink
    flwr run . --stream --run-config "run.rounds=5 client.lr=0.01"
    flwr run . my-superlink --stream --run-config "config='configs/tiny.toml' run-dir='runs/pi-fleet'"

The run config (``[tool.flwr.app.config]`` in pyproject.toml, overridden by ``--run-config``)
names a TOML ``config`` and a ``run-dir``, and carries every scalar key of that TOML as
``section.key`` (empty = the file's value), so any hyperparameter can be changed per run. The
app opens the run (resuming it if ``run-dir`` holds one), prepares its files and executes it
(``fedrnn.runs.lifecycle``), exactly as ``python -m fedrnn.simulate`` does.

Placement is detected: on a simulation SuperLink (Flower's Simulation Engine, whose Grid lives
in the same process as its simulated SuperNodes) fedrnn's virtual clients are placed on the
simulated SuperNodes; on a deployment SuperLink every SuperNode is one real device with its own
data. ``placement = "virtual"`` or ``"devices"`` forces either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from fedrnn.config import ConfigError, RunConfig, load_config
from fedrnn.federation.loop import DeviceNodes, Placement, VirtualClients
from fedrnn.runs.console import quiet_flower, round_printer
from fedrnn.runs.lifecycle import execute, open_run, prepare

APP_DIR = Path(__file__).resolve().parent.parent
APP_KEYS = ("config", "run-dir", "min-nodes", "placement")  # the app's own run-config keys; the rest are TOML keys
PLACEMENTS = ("auto", "virtual", "devices")
app = ServerApp()


def app_file(value: str) -> Path:
    """A relative ``config`` path names a file shipped with the app (``flwr run`` bundles configs/)."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else APP_DIR / path


def config_overrides(run_config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``section.key`` run-config values as TOML overrides; an empty string keeps the config file's value."""
    out: dict[str, dict[str, Any]] = {}
    for name, value in run_config.items():
        if name in APP_KEYS or value == "":
            continue
        section, sep, key = name.partition(".")
        if not sep:
            raise ConfigError(f"run config {name!r}: expected section.key (e.g. run.rounds) or one of {APP_KEYS}")
        out.setdefault(section, {})[key] = value
    return out


def run_config_keys(cfg: RunConfig) -> list[str]:
    """The ``section.key`` names pyproject.toml must declare: every scalar key of the config (lists and tables not)."""
    return [f"{s}.{k}" for s, kv in cfg.to_dict().items() for k, v in kv.items() if not isinstance(v, (list, dict))]


def is_simulation(grid: Grid) -> bool:
    """Flower's Simulation Engine hands the ServerApp an in-process Grid; a deployment SuperLink a remote one."""
    from flwr.superlink.grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)


def simulation_hint(cfg: RunConfig) -> str:
    """How to give Flower's Simulation Engine fedrnn's workers ([simulation] actors, one CPU each).

    Under ``flwr run`` Flower starts Ray and its ClientApp workers from the federation's
    simulation config before the ServerApp runs (default in 1.42: 2 CPUs per ClientApp, as many
    workers as the machine's CPUs allow); an app cannot change it, so the run says how.
    """
    a = cfg.simulation.actors
    return (f"ClientApp workers come from Flower's federation config; for fedrnn's [simulation] actors = {a}, run "
            f"with --federation-config \"num-supernodes={a} client-resources-num-cpus=1 init-args-num-cpus={a}\"")


def placement_for(grid: Grid, choice: str, min_nodes: int) -> Placement:
    if choice not in PLACEMENTS:
        raise ConfigError(f"run config placement = {choice!r}: expected one of {', '.join(PLACEMENTS)}")
    virtual = choice == "virtual" or (choice == "auto" and is_simulation(grid))
    return VirtualClients() if virtual else DeviceNodes(min_nodes)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of ``flwr run``; running it again with the same ``run-dir`` continues that run."""
    rc = dict(context.run_config)
    console = Console()
    cfg = load_config(app_file(str(rc["config"])) if rc.get("config") else None, config_overrides(rc))
    run_dir = Path(str(rc.get("run-dir") or f"runs/flwr-{context.run_id}")).resolve()
    run = open_run(run_dir, cfg)  # an existing run keeps its own config
    placement = placement_for(grid, str(rc.get("placement") or "auto"), int(rc.get("min-nodes") or 0)
                              or run.cfg.run.clients_per_round)
    if run.cfg.devices.enabled and not placement.simulated:
        raise ConfigError(f"{rc.get('config')}: [devices] simulates a device fleet; on real SuperNodes the devices "
                          "are real, so set devices.enabled = false (or leave the section out)")
    console.print(f"fedrnn: run directory {run.dir.path} ({'simulated' if placement.simulated else 'real'} "
                  "SuperNodes)", highlight=False, soft_wrap=True)
    if placement.simulated:
        quiet_flower(level=None)  # Flower's per-failure tracebacks; Ray's lines are Flower's to configure here
        console.print(f"fedrnn: {simulation_hint(run.cfg)}", markup=False, highlight=False, soft_wrap=True)
    prepare(run)
    run.on_round.append(round_printer(console, run.cfg.run.rounds))  # one line per round in `flwr log`
    execute(run, grid, placement, console)
