"""Cost of record-level DP-SGD against non-private local training, per transfer mode.

    FEDRNN_DATA_DIR=... python benchmarks/bench_dp.py [--examples 512] [--batch-size 32]

One simulated device: ``--examples`` Amazon reviews (the clients' data; median ~110
tokens, capped at 400), a 16k BPE tokenizer trained on them, the default ``ModelConfig()``
(random weights: speed does not depend on them), Adam, one CPU thread (as the ClientApp
runs). For each transfer mode it times

* ``non-dp``: ``fedrnn.model.training.train_steps`` over one epoch of length-bucketed batches,
  exactly what the non-private client does (the baseline of every ratio);
* ``non-dp-poisson``: a plain step on the Poisson batches DP uses (how much of the cost
  is the sampling's padding alone);
* ``microbatch``: ``train_dp``'s per-example engine (sparse embedding gradients), what its
  default ``auto`` picks unless only the head trains;
* ``fused`` / ``fused-unchunked``: ``train_dp``'s batched engine, length-chunked or not
  (``auto`` picks it for feature extraction);
* ``opacus-<mode>``: ``train_dp`` with Opacus's DPLSTM for each grad-sample mode;
* ``torch-func``: ``vmap(grad(...))`` per-sample gradients of the plain fused model;
* ``microbatch-dense``: textbook microbatching, dense embedding gradient per example.

Every variant runs the same ``--steps`` steps; all DP variants and ``non-dp-poisson`` see the
same Poisson batches (the same examples), ``non-dp`` the first ``--steps`` length-bucketed
batches of an epoch. Each variant runs ``--repeat`` times (default 5), the variants interleaved
within each repeat so a change in the shared machine's load hits all of them alike; the
median run counts, and every run records the 1-minute load average before it. Ratios compare
time per real (unpadded) token against ``non-dp``, the length-bucketed training a non-private
client really does (what the user would otherwise pay); ``non-dp-poisson`` (same batches as DP,
no privacy) shows how much of the cost is the Poisson batches' padding alone. The two
bench-only variants also report their largest deviation from the fused engine's clipped
gradient sum on the same batch (dropout off). Results go to ``benchmarks/results/dp.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import opacus
import torch
from torch.nn import functional as F

from fedrnn.data.loaders import load_amazon
from fedrnn.data.tokenizer import Encoded, encode, train_tokenizer
from fedrnn.model.rnn import TRANSFER_MODES, ModelConfig, SentimentRNN, set_trainable
from fedrnn.model.training import length_bucketed_batches, to_tensors, train_steps
from fedrnn.privacy.accounting import PrivacyState, sample_rate
from fedrnn.privacy.batching import poisson_batches
from fedrnn.privacy.dp_sgd import OPACUS_MODES, train_dp
from fedrnn.privacy.per_sample import clipped_grad_sum, per_sample_taps

SEED = 0
CLIP, SIGMA, LR = 1.0, 1.0, 1e-3


def client_data(n: int, max_len: int) -> Encoded:
    reviews = load_amazon()
    reviews = reviews.subset(np.sort(np.random.default_rng(SEED).permutation(len(reviews))[:n]))
    tok = train_tokenizer(reviews.texts, vocab_size=16000)
    return encode(tok, reviews.texts, reviews.labels, max_len)


def fresh_model(mode: str) -> SentimentRNN:
    torch.manual_seed(SEED)
    model = SentimentRNN(ModelConfig())
    set_trainable(model, mode)
    return model.train()


def time_non_dp(data: Encoded, mode: str, batch_size: int, steps: int) -> dict[str, float]:
    model = fresh_model(mode)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    train_steps(model, data, opt, batch_size, np.random.default_rng(SEED + 1), max_steps=1)  # warm-up
    stats = train_steps(model, data, opt, batch_size, np.random.default_rng(SEED), max_steps=steps)
    batches = length_bucketed_batches(data.lengths, batch_size, np.random.default_rng(SEED))[:steps]
    tokens = int(sum(data.lengths[b].sum() for b in batches))
    return {"seconds": stats.seconds, "steps": stats.steps, "examples": stats.examples, "tokens": tokens}


def time_dp(data: Encoded, mode: str, batch_size: int, steps: int, **kwargs: Any) -> dict[str, float]:
    model, state = fresh_model(mode), PrivacyState(SIGMA, CLIP, 1e-5)
    common = {"mode": mode, "batch_size": batch_size, "lr": LR} | kwargs
    train_dp(model, data, state, steps=1, rng=np.random.default_rng(SEED + 1), **common)  # warm-up
    _, stats = train_dp(model, data, state, steps=steps, rng=np.random.default_rng(SEED), **common)
    tokens = poisson_tokens(data, batch_size, steps, stats.examples)
    return {"seconds": stats.seconds, "steps": stats.steps, "examples": stats.examples, "tokens": tokens}


def poisson_tokens(data: Encoded, batch_size: int, steps: int, examples: int) -> int:
    """Real (unpadded) tokens in the timed Poisson batches: ``train_dp`` draws them first from its rng."""
    batches = poisson_batches(len(data), sample_rate(len(data), batch_size), steps, np.random.default_rng(SEED))
    if sum(len(b) for b in batches) != examples:
        raise RuntimeError("train_dp's batches are not the ones reproduced here; token counts would be wrong")
    return int(sum(data.lengths[b].sum() for b in batches))


PerSample = Callable[[SentimentRNN, torch.Tensor, torch.Tensor, torch.Tensor], None]


def dense_microbatch_clipped_sum(
    model: SentimentRNN, ids: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor
) -> None:
    """Textbook microbatching: each example alone, its full (dense) gradient clipped and summed into ``.grad``."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(labels)):
        n = int(lengths[i])
        loss = F.cross_entropy(model(ids[i : i + 1, :n], lengths[i : i + 1]), labels[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        factor = min(1.0, CLIP / (float(torch.sqrt(sum(g.square().sum() for g in grads))) + 1e-6))
        for t, g in zip(total, grads, strict=True):
            t.add_(g, alpha=factor)
    for p, t in zip(params, total, strict=True):
        p.grad = t


def torch_func_clipped_sum(model: SentimentRNN, ids: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor) -> None:
    """``torch.func``: vmap over per-example grad of the plain (fused ``nn.LSTM``) model."""
    from torch.func import functional_call, grad, vmap

    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}

    def loss_one(params: dict[str, torch.Tensor], x: torch.Tensor, n: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, {**params, **frozen}, (x[None], n[None]))
        return F.cross_entropy(logits, y[None])

    per = vmap(grad(loss_one), in_dims=(None, 0, 0, 0), randomness="different")(trainable, ids, lengths, labels)
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in per.values()))
    factors = (CLIP / (norms + 1e-6)).clamp(max=1.0)
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.grad = torch.einsum("b,b...->...", factors, per[name])


def time_per_sample(fn: PerSample, data: Encoded, mode: str, batch_size: int, steps: int) -> dict[str, Any]:
    """A DP-SGD step built on ``fn``'s clipped sum (noise and Adam as in ``train_dp``); checks it against fused."""
    model = fresh_model(mode)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=LR)
    q = sample_rate(len(data), batch_size)
    batches = poisson_batches(len(data), q, steps, np.random.default_rng(SEED))
    gen = torch.Generator().manual_seed(SEED)
    ids, lengths, labels = to_tensors(data, batches[0])
    model.eval()  # no dropout, so both computations see the same function
    fn(model, ids, lengths, labels)
    got = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    with per_sample_taps(model) as taps:
        clipped_grad_sum(model, taps, ids, lengths, labels, CLIP)
    deviation = max(float((g - p.grad).abs().max()) for g, p in zip(got, params, strict=True))
    model.train()
    t0, seen, tokens = time.perf_counter(), 0, 0
    for index in batches:
        opt.zero_grad(set_to_none=True)
        ids, lengths, labels = to_tensors(data, index)
        tokens += int(lengths.sum())
        fn(model, ids, lengths, labels)
        for p in params:
            p.grad = (p.grad + torch.normal(0.0, SIGMA * CLIP, size=p.shape, generator=gen)) / (q * len(data))
        opt.step()
        seen += len(index)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "steps": steps, "examples": seen, "tokens": tokens, "max_abs_diff_vs_fused": deviation}


def time_plain_poisson(data: Encoded, mode: str, batch_size: int, steps: int) -> dict[str, float]:
    model = fresh_model(mode)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    batches = poisson_batches(len(data), sample_rate(len(data), batch_size), steps, np.random.default_rng(SEED))
    t0, seen, tokens = time.perf_counter(), 0, 0
    for index in batches:
        opt.zero_grad(set_to_none=True)
        ids, lengths, labels = to_tensors(data, index)
        F.cross_entropy(model(ids, lengths), labels).backward()
        opt.step()
        seen += len(index)
        tokens += int(lengths.sum())
    return {"seconds": time.perf_counter() - t0, "steps": steps, "examples": seen, "tokens": tokens}


def guarded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        out = fn()
    except Exception as e:  # a variant that cannot run this model is a result, not a crash
        first_line = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        return {"error": first_line, "where": traceback.format_exc(limit=-2)[-600:]}
    out["seconds_per_step"] = out["seconds"] / out["steps"]
    out["seconds_per_example"] = out["seconds"] / max(out["examples"], 1)
    out["microseconds_per_token"] = 1e6 * out["seconds"] / max(out["tokens"], 1)
    return out


def variants(data: Encoded, mode: str, b: int, k: int) -> dict[str, Callable[[], dict[str, Any]]]:
    """Every engine for one mode, each timed over the same ``k`` steps."""
    out: dict[str, Callable[[], dict[str, Any]]] = {
        "non-dp": partial(time_non_dp, data, mode, b, k),
        "non-dp-poisson": partial(time_plain_poisson, data, mode, b, k),
        "microbatch": partial(time_dp, data, mode, b, k, engine="microbatch"),
        "fused": partial(time_dp, data, mode, b, k, engine="fused"),
        "fused-unchunked": partial(time_dp, data, mode, b, k, engine="fused", chunk_size=None),
    }
    out |= {f"opacus-{g}": partial(time_dp, data, mode, b, k, engine="opacus", grad_sample_mode=g)
            for g in OPACUS_MODES}
    out["torch-func"] = partial(time_per_sample, torch_func_clipped_sum, data, mode, b, k)
    out["microbatch-dense"] = partial(time_per_sample, dense_microbatch_clipped_sum, data, mode, b, k)
    return out


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median time (the lower middle one for an even count), plus every run's time and load."""
    ok = [r for r in runs if "seconds" in r]
    if not ok:
        return runs[0]
    mid = sorted(ok, key=lambda r: r["seconds"])[(len(ok) - 1) // 2]
    return mid | {"runs_seconds": [r["seconds"] for r in ok], "runs_load_average_1min": [r["load"] for r in ok],
                  "failed_runs": len(runs) - len(ok)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=512, help="reviews on the simulated device")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=400)
    ap.add_argument("--steps", type=int, default=4, help="timed steps of every variant")
    ap.add_argument("--repeat", type=int, default=5, help="interleaved runs of every variant; the median counts")
    ap.add_argument("--modes", nargs="+", default=list(TRANSFER_MODES), choices=TRANSFER_MODES)
    ap.add_argument("--variants", nargs="+", help="only these engines (default: all); non-dp always runs")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "dp.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = client_data(args.examples, args.max_len)
    b, k = args.batch_size, args.steps
    results: dict[str, dict[str, Any]] = {}
    t_start, load_start = time.time(), os.getloadavg()
    for mode in args.modes:
        fns = {name: fn for name, fn in variants(data, mode, b, k).items()
               if not args.variants or name in args.variants or name == "non-dp"}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in fns}
        for repeat in range(args.repeat):
            for name, fn in fns.items():
                load = os.getloadavg()[0]
                runs[name].append(guarded(fn) | {"load": load})
            res = {name: median_run(r) for name, r in runs.items()}
            base = res["non-dp"].get("microseconds_per_token", math.nan)
            for r in res.values():
                if "microseconds_per_token" in r:
                    r["ratio_vs_non_dp"] = r["microseconds_per_token"] / base
            results[mode] = res | {"repeats_done": repeat + 1}
            write_report(args, data, results, t_start, load_start)  # after every repeat: a killed run keeps its data
            print(mode, repeat + 1, {n: round(r.get("ratio_vs_non_dp", math.nan), 2) for n, r in res.items()},
                  flush=True)


def write_report(args: argparse.Namespace, data: Encoded, results: dict[str, Any], t_start: float,
                 load_start: tuple[float, float, float]) -> None:
    b, k = args.batch_size, args.steps
    report = {
        "command": "python " + " ".join(sys.argv),
        "setup": {
            "model": ModelConfig().to_dict(), "examples": args.examples, "batch_size": b, "max_len": args.max_len,
            "steps": k, "repeat": args.repeat,
            "ratio_baseline": "non-dp (length-bucketed, what a non-private client runs)",
            "mean_length": float(data.lengths.mean()), "median_length": float(np.median(data.lengths)),
            "noise_multiplier": SIGMA, "max_grad_norm": CLIP, "optimizer": "adam", "threads": 1,
            "torch": torch.__version__, "opacus": opacus.__version__, "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
            "wall_seconds": time.time() - t_start,
        },
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
