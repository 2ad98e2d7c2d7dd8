"""Is a client's training step compute-bound? CPU time of one fine-tune step against batch size.

    python benchmarks/bench_batch_scaling.py [--teacher cache/teacher] [--batches 16 32 80] [--repeat 3]

One torch thread (what a simulation actor gets), the teacher in fine-tune mode (only the top
layer and the head train), random 200-token reviews, Adam. If a step's cost grew much less than
the batch, running several clients' batches as one (the issue's "vectorised clients") would save
time; if it grows with the batch, the matrix products already keep the core busy and stacking
clients cannot buy a large factor. Reports the median CPU milliseconds per step over
``--repeat`` passes of ``--steps`` steps, per batch size, and its ratio to the smallest batch's,
with the load average; writes ``benchmarks/results/batch_scaling.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from fedrnn.federation.local import build_model, load_base

RESULTS = Path(__file__).resolve().parent / "results" / "batch_scaling.json"


def step_ms(model: torch.nn.Module, batch: int, length: int, steps: int, seed: int) -> float:
    """CPU milliseconds per training step at ``batch`` reviews of ``length`` tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, model.cfg.vocab_size, (batch, length), generator=gen)
    lengths = torch.full((batch,), length)
    labels = torch.randint(0, model.cfg.num_classes, (batch,), generator=gen)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    t = time.process_time()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(ids, lengths), labels).backward()
        opt.step()
    return (time.process_time() - t) / steps * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="cache/teacher")
    p.add_argument("--batches", type=int, nargs="+", default=[16, 32, 80])
    p.add_argument("--length", type=int, default=200)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(1)
    base = load_base(a.teacher)
    times: dict[int, list[float]] = {b: [] for b in a.batches}
    for r in range(a.repeat):  # batch sizes alternate, so a change in load hits all of them
        for b in a.batches:
            times[b].append(step_ms(build_model(base, {}, "fine-tune"), b, a.length, a.steps, seed=r))
    smallest = min(a.batches)
    median = {b: statistics.median(v) for b, v in times.items()}
    args = (f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(a).items())
    out = {
        "command": "python benchmarks/bench_batch_scaling.py " + " ".join(args),
        "teacher": a.teacher, "length": a.length, "steps": a.steps, "threads": 1, "loadavg": os.getloadavg(),
        "cpu_ms_per_step": {str(b): v for b, v in times.items()},
        "median_cpu_ms_per_step": {str(b): m for b, m in median.items()},
        "cost_ratio_vs_smallest": {str(b): median[b] / median[smallest] for b in a.batches},
        "batch_ratio_vs_smallest": {str(b): b / smallest for b in a.batches},
    }
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    for b in a.batches:
        print(f"batch {b:4d}: {median[b]:8.1f} CPU ms/step  ({median[b] / median[smallest]:.2f}x the cost "
              f"for {b / smallest:.1f}x the reviews)")


if __name__ == "__main__":
    main()
