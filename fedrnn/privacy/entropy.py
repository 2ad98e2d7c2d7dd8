"""Where DP randomness comes from: secret entropy that no message, reply or run config carries.

DP noise protects only against a party that cannot reproduce it. Seeding it from the run seed,
the round and the client id (all of which travel in every training message) let the server
regenerate a device's noise and subtract it, and let every client regenerate the server's. So:

* A **real device** draws each round's Poisson batches and noise from the OS CSPRNG
  (:func:`fresh_generator`): nothing outside the device can reproduce them, and nothing needs
  to, since a device's round is never replayed.
* A **party that must replay** (a simulation, whose runs are reproducible from their seed and
  resume exactly after a crash; the server adding client-level noise, whose resume replays a
  round) keeps a random **key** in a file of its own (:func:`load_key`, created once from the OS
  CSPRNG, mode 0600) and derives one generator per use with HMAC-SHA256(key, labels)
  (:func:`keyed_generator`). The labels (seed, round, client) are public; without the key they
  say nothing about the stream. The simulated devices' key and the server's key are different
  files, so in simulation neither side's noise follows from the other's key.

In a simulation the "device side" and the server are one process tree of one user on one
machine: the guarantee is about what crosses the wire (messages, replies, the run directory's
config and metrics), not about a process that reads the other side's key file.

Key files live in the state directory: ``$FEDRNN_STATE_DIR`` if set, else ``~/.fedrnn`` (a real
device's node config ``state-dir``, where its privacy budget lives, is the same default).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

import numpy as np

STATE_ENV = "FEDRNN_STATE_DIR"
DEFAULT_STATE_DIR = "~/.fedrnn"
SIMULATED_DEVICES_KEY = "simulated-devices.key"  # the simulated fleet's key: record-level DP in simulation
SERVER_KEY = "server.key"  # the server's key: client-level DP noise
KEY_BYTES = 32


def state_dir() -> Path:
    """This machine's fedrnn state directory (``$FEDRNN_STATE_DIR``, default ``~/.fedrnn``)."""
    return Path(os.environ.get(STATE_ENV) or DEFAULT_STATE_DIR).expanduser()


def load_key(name: str, root: Path | None = None) -> bytes:
    """The key in ``root/name`` (default root: :func:`state_dir`), created from the OS CSPRNG on first use.

    Creation is atomic (write a private temporary file, then ``link`` it into place, which fails
    if another process got there first), so simulation workers starting together agree on one key.
    """
    path = (root or state_dir()) / name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_bytes(KEY_BYTES))
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another worker created it first: use theirs
        finally:
            tmp.unlink()
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise ValueError(f"{path}: a fedrnn key holds {KEY_BYTES} bytes, this file holds {len(key)}; "
                         f"delete it to make a new one")
    return key


def keyed_generator(key: bytes, *labels: int | str) -> np.random.Generator:
    """A NumPy generator determined by ``key`` and ``labels``, unpredictable without ``key``.

    HMAC-SHA256 (a PRF) turns the key and the public labels into 256 bits of seed entropy.
    """
    msg = "/".join(str(x) for x in labels).encode()
    digest = hmac.new(key, msg, hashlib.sha256).digest()
    return np.random.default_rng(np.random.SeedSequence(int.from_bytes(digest, "big")))


def fresh_generator() -> np.random.Generator:
    """A NumPy generator seeded with 256 bits from the OS CSPRNG: reproducible by nobody."""
    return np.random.default_rng(np.random.SeedSequence(secrets.randbits(256)))
