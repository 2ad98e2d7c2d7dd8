"""Emulation only: stretch Flower's ClientApp start window for a SuperNode running under QEMU.

A Flower 1.42 SuperNode gives each ClientApp process it launches ``HEARTBEAT_DEFAULT_INTERVAL``
(30 s, a constant with no setting) from claiming the task to the app's first call; later
heartbeats get twice that. Under QEMU user-mode emulation Python runs some 10-50x slower than on
the board it emulates: ``flwr-clientapp --help`` alone takes 18.5 CPU-s (33 s wall) in the
cortex-a53 userland here, so every launched ClientApp misses the window and the SuperNode
relaunches it forever. ``clients/pi/emulate.sh supernode`` puts this directory on PYTHONPATH so
the task-token store's copy of that constant (``flwr.supercore.corestate``) becomes
``FEDRNN_PI_HEARTBEAT_S`` (default 600) in the emulated processes only; the SuperNode's own
heartbeat to the SuperLink keeps Flower's 30 s. Nothing on a real device or in the Pi guide loads it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from types import ModuleType

TARGETS = {"flwr.supercore.corestate.in_memory_corestate", "flwr.supercore.corestate.sql_corestate"}


class _StretchTaskWindow(importlib.abc.MetaPathFinder):
    """Finds the task-token stores as usual and changes their window constant right after each runs."""

    def __init__(self) -> None:
        self.pending = set(TARGETS)

    def find_spec(self, name: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if name not in self.pending:
            return None
        self.pending.discard(name)
        if not self.pending:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)  # type: ignore[arg-type]
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            module.HEARTBEAT_DEFAULT_INTERVAL = int(os.environ.get("FEDRNN_PI_HEARTBEAT_S", "600"))

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


sys.meta_path.insert(0, _StretchTaskWindow())
