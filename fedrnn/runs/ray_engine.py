"""Flower's Simulation Engine on Ray, set up for fedrnn: resources, a loopback-only local Ray, preloaded workers."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from flwr.serverapp import ServerApp

from fedrnn.config import RunConfig
from fedrnn.runs.console import quiet_flower, quiet_ray


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
    gpus = float(cfg.simulation.gpus_per_actor)  # > 0: client training on the GPU Ray assigns the worker
    return {"client_resources": {"num_cpus": 1, "num_gpus": gpus, "max_restarts": -1, "max_task_retries": 1},
            "init_args": init}


START_ATTEMPTS = 3  # Ray's local node start, on a machine so busy that its raylet misses Ray's 30 s window


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
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            ray.init(
                runtime_env={"env_vars": {"PYTHONPATH": path}, "worker_process_setup_hook": preload_client_app},
                include_dashboard=False,
                **init,
            )
            return
        except Exception as e:  # Ray raises a bare Exception when its raylet misses a fixed 30 s start window
            if "timed out during startup" not in str(e) or attempt == START_ATTEMPTS:
                raise
            ray.shutdown()
            logging.getLogger(__name__).warning("Ray's node did not start within 30 s (a busy machine?); retrying")


def preload_client_app() -> None:
    """Ray worker start-up hook: import the ClientApp's modules before the first job needs them."""
    import clients.client_app  # noqa: F401


def run_on_simulation_engine(server_app: ServerApp, cfg: RunConfig, verbose: bool = False) -> None:
    """Run ``server_app`` with fedrnn's ClientApp on ``cfg``'s simulated SuperNodes (Ray workers)."""
    from flwr.simulation import run_simulation

    from clients.client_app import app as client_app

    start_ray(cfg, verbose)
    if not verbose:
        quiet_flower()
        quiet_ray()  # a no-op when the caller has started it already
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=max(cfg.run.clients_per_round, cfg.simulation.actors),
        backend_config=backend_config(cfg),
    )
