"""Ctrl-C in ``python -m fedrnn.simulate``: stop at once, without a traceback, resumable.

Flower runs the ServerApp in a thread and its Simulation Engine in the main thread, so a plain
``KeyboardInterrupt`` lands in the engine (a long traceback) while the round loop's thread
goes on. A run directory is resumable at every instant (each round's checkpoint is written
atomically, ``state.json`` last, and ``--resume`` drops anything past it), so the run can end
right away: the handler says how to continue, stops Ray's workers and exits with status 130.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

RAY_SHUTDOWN_S = 15.0  # bound on waiting for Ray's workers to stop
EXIT_INTERRUPTED = 130  # the shell's status for a process ended by SIGINT


def resume_command(run_dir: Path) -> str:
    return f"python -m fedrnn.simulate --resume {run_dir}"


def stop_on_sigint(console: Console, run_dir: Path, before_exit: Callable[[], None] | None = None) -> None:
    """Install the SIGINT handler (main thread only): print the ``--resume`` command, stop Ray, exit 130."""

    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the shutdown
        console.print(f"\n[bold yellow]interrupted[/]: {run_dir} keeps every completed round; continue it with\n"
                      f"  {resume_command(run_dir)}", highlight=False, soft_wrap=True)
        sys.stdout.flush()
        try:
            if before_exit is not None:
                before_exit()
        finally:
            stopper = threading.Thread(target=_stop_ray, daemon=True)
            stopper.start()
            stopper.join(RAY_SHUTDOWN_S)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)  # the engine and the round loop's thread end with the process

    signal.signal(signal.SIGINT, handler)


def _stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
