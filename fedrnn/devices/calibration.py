"""How fast the real model trains on this host: the unit every simulated device speed multiplies.

Device profiles give a speed *relative* to one core of this host; measuring real training steps
of the run's model (its size, transfer mode, batch) turns that into samples/s, so the simulated
compute time follows the actual model rather than a guessed FLOP count.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

from fedrnn.devices.errors import DeviceError

_THROUGHPUT_CACHE: dict[tuple, float] = {}


def measure_host_throughput(
    model: Any,
    batch_size: int,
    seq_len: int,
    *,
    steps: int = 5,
    warmup: int = 2,
    threads: int = 1,
    dp: bool = False,
    seed: int = 0,
) -> float:
    """Samples/s of real training steps of (a copy of) ``model`` on this host, cached per setting.

    Runs ``warmup`` + ``steps`` Adam steps on random token ids of shape ``(batch_size, seq_len)``
    (every review full length, the worst case for a recurrent model) training exactly the
    parameters that require grad in ``model`` - so set the transfer mode first. The median step
    time is used, which shrugs off other jobs sharing the CPU. ``dp`` wraps the copy in Opacus'
    GradSampleModule so per-sample gradients are part of the cost. The caller's model is untouched.
    """
    import torch
    from torch.nn import functional as F

    if batch_size < 1 or seq_len < 1 or steps < 1 or warmup < 0 or threads < 1:
        raise DeviceError("batch_size, seq_len, steps and threads must be >= 1 and warmup >= 0")
    trainable = tuple(n for n, p in model.named_parameters() if p.requires_grad)
    if not trainable:
        raise DeviceError("the model has no trainable parameters; set the transfer mode first")
    cfg = model.cfg
    key = (
        tuple(sorted(cfg.to_dict().items())),
        type(model._modules["rnn"][0]["fwd"]).__name__,
        trainable,
        batch_size,
        seq_len,
        steps,
        warmup,
        threads,
        dp,
        seed,
    )
    if key in _THROUGHPUT_CACHE:
        return _THROUGHPUT_CACHE[key]

    work = copy.deepcopy(model).train()
    params = [p for p in work.parameters() if p.requires_grad]
    if dp:
        from opacus import GradSampleModule

        work = GradSampleModule(work)
    opt = torch.optim.Adam(params, lr=1e-4)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, max(cfg.vocab_size, 3), (batch_size, seq_len), generator=g)
    lengths = torch.full((batch_size,), seq_len, dtype=torch.long)
    labels = torch.randint(0, cfg.num_classes, (batch_size,), generator=g)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    times = []
    try:
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(work(ids, lengths), labels).backward()
            opt.step()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    rate = batch_size / statistics.median(times)
    _THROUGHPUT_CACHE[key] = rate
    return rate
