"""What travels between server and devices: named numpy arrays in a Flower ``ArrayRecord``.

Kept in one place so byte counting, validation and (optional) int8 encoding agree on
both ends of the wire.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array.from_numpy_ndarray(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def record_nbytes(record: ArrayRecord) -> int:
    """Bytes of array data in a record: what the payload costs on the wire, headers aside."""
    return sum(len(v.data) for v in record.values())


def state_to_arrays(state: dict[str, torch.Tensor], names: list[str]) -> dict[str, np.ndarray]:
    return {n: state[n].detach().cpu().numpy().astype(np.float32, copy=True) for n in names}
