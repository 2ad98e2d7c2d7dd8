"""A client-side deadline: a ClientApp job that runs too long is aborted.

The server stops waiting for a round after ``server.timeout_s`` and goes on with the replies
it has. A client still busy after that (stuck in I/O, an endless loop, a far too slow
device) would keep its worker — on the Simulation Engine a Ray actor, in deployment the
SuperNode's ClientApp process — forever, starving later rounds and, in simulation, keeping
the run from ever shutting down. This Flower mod arms ``SIGALRM`` for the message's
``deadline-s`` (``client.deadline_s``, by default ``server.timeout_s``) and raises
``ClientDeadlineExceeded`` when it fires, so the job ends as an error reply and the worker
is free again. A deadline shorter than the server's timeout also ends the round early: the
server gets the error reply instead of waiting for one that will never come.

The alarm never lands inside an ``import``: an exception raised halfway through a module's
code can leave it (or its package) half-initialised in ``sys.modules``, and every later job on
that worker then fails on it (seen with a lazily imported ``torch._dynamo`` on a loaded machine).
While the interrupted frame is in the import machinery, the abort waits (re-checked every
``IMPORT_RECHECK_S``) until the import is done, for at most ``IMPORT_WAIT_MAX_S``: an import
hung that long is aborted anyway, since a worker that never frees itself is worse.

Signals only reach the main thread; where the ClientApp runs elsewhere, or on a platform
without ``setitimer`` (Windows), the mod does nothing (Ray actors and Flower's ClientApp
processes on Linux run jobs on their main thread).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedrnn.federation.messages import CONFIG, Task

IMPORT_RECHECK_S = 0.2
IMPORT_WAIT_MAX_S = 120.0


class ClientDeadlineExceeded(TimeoutError):
    """The job ran past the server's round timeout."""


def _importing(frame: FrameType | None) -> bool:
    """Whether ``frame`` or a caller of it runs the import machinery (``importlib._bootstrap``)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def deadline_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run ``call_next`` under an alarm of ``deadline-s`` seconds (from the message config)."""
    config = msg.content.config_records.get(CONFIG)
    seconds = float(config.get(Task.key("deadline_s"), 0)) if config is not None else 0.0
    if seconds <= 0 or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        return call_next(msg, context)

    waited = 0.0

    def expire(signum: int, frame: FrameType | None) -> None:
        nonlocal waited
        if waited < IMPORT_WAIT_MAX_S and _importing(frame):  # abort once the module is whole
            waited += IMPORT_RECHECK_S
            signal.setitimer(signal.ITIMER_REAL, IMPORT_RECHECK_S)
            return
        raise ClientDeadlineExceeded(f"client job exceeded its deadline of {seconds:g} s; aborted")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return call_next(msg, context)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
