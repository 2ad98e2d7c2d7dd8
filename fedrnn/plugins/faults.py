"""Fault injection for tests and studies: make chosen clients raise, hang or crash mid-training.

Off unless the config's ``[faults]`` section names clients. ``FaultInjection.configure``
marks the chosen clients' messages (``fault`` = raise | hang | crash, ``hang-s``), and the
ClientApp calls ``inject_fault`` after it has loaded its data and model, i.e. in the middle
of its training job. What the run must survive:

* ``raise``: the ClientApp raises; Flower turns it into an error reply (the slot fails);
* ``hang``: the ClientApp sleeps ``hang-s`` seconds; the server stops waiting after
  ``server.timeout_s`` and the client's own deadline (``fedrnn.federation.deadline``) frees its worker;
* ``crash``: the ClientApp's process dies (``os._exit``), as on an out-of-memory kill; on
  the Simulation Engine that is a dead Ray actor, which Ray restarts (see ``fedrnn.simulate``).

Simulated clients only. A ClientApp on a real SuperNode (node config ``data-path``) refuses a
message carrying a fault (``clients/client_app.refusal_of``): it replies untrained with the
reason, and the server counts it (``refused_instructions``, ``fedrnn.plugins.refusals``). A
server must not be able to crash or hang the devices it trains on.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
from flwr.app import ConfigRecord

from fedrnn.config import FaultsSection
from fedrnn.federation.messages import Fault, Task
from fedrnn.federation.plugin import RoundInfo, RoundPlugin


class InjectedFault(RuntimeError):
    """The failure a ``raise`` fault produces: recognisable in logs and error replies."""


class FaultInjection(RoundPlugin):
    name = "faults"

    def __init__(self, cfg: FaultsSection) -> None:
        self.cfg = cfg
        self.kinds = {c: kind for kind, ids in (("raise", cfg.raise_clients), ("hang", cfg.hang_clients),
                                                ("crash", cfg.crash_clients)) for c in ids}

    def configure(self, info: RoundInfo, clients: list[int],
                  rng: np.random.Generator) -> dict[int, dict[str, Any] | None]:
        if self.cfg.rounds and info.number not in self.cfg.rounds:
            return {}
        return {c: Fault(fault=self.kinds[c], hang_s=self.cfg.hang_s).to_record() for c in clients if c in self.kinds}


def inject_fault(cfg: ConfigRecord) -> None:
    """Fail as the message config says (no-op for a message without ``fault``)."""
    if not Fault.present(cfg):
        return
    fault = Fault.parse(cfg)
    if fault.fault == "raise":
        raise InjectedFault(f"injected fault: client {cfg.get(Task.key('client_id'))} raised mid-training")
    if fault.fault == "hang":
        time.sleep(fault.hang_s)
    elif fault.fault == "crash":
        os._exit(1)  # no cleanup, no reply: the process is simply gone
    else:
        raise ValueError(f"unknown fault {fault.fault!r} in the message config; expected raise, hang or crash")
