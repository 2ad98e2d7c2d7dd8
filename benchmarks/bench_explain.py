"""On-device explanation latency: a 100-word review explained by the int8 student, target <= 50 ms.

    FEDRNN_DATA_DIR=... python benchmarks/bench_explain.py --export cache/student-export

Times ``fedrnn.edge.explain.explain`` end to end, as ``python -m fedrnn.edge.predict --explain``
runs it: cleaning and tokenizing the text, building the batch of the review plus one variant per
masked word, the one onnxruntime call, and the softmax (rendering excluded). The reviews are
``--reviews`` seeded IMDB test reviews of at least ``--words`` words, each cut to its first
``--words`` words; each is explained ``--warmup`` times untimed, then ``--repeats`` times. Reported:
the median over all timed calls (the target), the 90th percentile, and the slowest review's
median, for the int8 model with onnxruntime's default threads (what ``predict`` uses) and with one
thread, and for the float model. The machine's load average is recorded: on the shared 2-core
host timings are pessimistic. Results: ``benchmarks/results/explain.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedrnn.data.reviews import clean_text  # noqa: E402
from fedrnn.edge.explain import explain, segment  # noqa: E402
from fedrnn.edge.predict import Predictor  # noqa: E402
from fedrnn.explain.samples import imdb_test_sample  # noqa: E402
from fedrnn.model.checkpoint import write_json  # noqa: E402

TARGET_MS = 50.0


def reviews_of(words: int, n: int, seed: int) -> list[str]:
    """``n`` IMDB test reviews with at least ``words`` words, each cut to exactly its first ``words``."""
    out = []
    for text in imdb_test_sample(2000, seed).texts:
        parts = clean_text(text).split()
        if len(parts) >= words:
            out.append(" ".join(parts[:words]))
        if len(out) == n:
            return out
    raise SystemExit(f"fewer than {n} IMDB test reviews with {words} words in the sample")


def time_explain(predictor: Predictor, texts: list[str], warmup: int, repeats: int) -> dict[str, float]:
    per_review, calls = [], []
    for text in texts:
        for _ in range(warmup):
            explain(predictor, text)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            explain(predictor, text)
            times.append(1000 * (time.perf_counter() - t0))
        per_review.append(float(np.median(times)))
        calls += times
    return {
        "median_ms": round(float(np.median(calls)), 3), "p90_ms": round(float(np.percentile(calls, 90)), 3),
        "slowest_review_median_ms": round(max(per_review), 3), "calls": len(calls),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", default="cache/student-export", help="export directory of the int8 student")
    p.add_argument("--words", type=int, default=100)
    p.add_argument("--reviews", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/explain.json")
    a = p.parse_args(argv)
    texts = reviews_of(a.words, a.reviews, a.seed)
    load = [os.getloadavg()]
    runs = {}
    for name, quantized, threads in (("int8, onnxruntime default threads", True, None),
                                     ("int8, 1 thread", True, 1), ("float, onnxruntime default threads", False, None)):
        predictor = Predictor(a.export, quantized=quantized, threads=threads)
        runs[name] = time_explain(predictor, texts, a.warmup, a.repeats)
        load.append(os.getloadavg())
        print(f"{name}: {runs[name]}", flush=True)
    seg = segment(predictor.tokenizer, texts[0], predictor.max_len)
    head = runs["int8, onnxruntime default threads"]["median_ms"]
    result = {
        "command": "python benchmarks/bench_explain.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "what": f"explain() of a {a.words}-word review: tokenize, one onnxruntime call on {a.words + 1} variants, "
                "softmax (no rendering)",
        "export": a.export, "reviews": a.reviews, "words": a.words, "repeats": a.repeats,
        "example_tokens": len(seg.ids), "runs": runs, "target_ms": TARGET_MS, "met": head <= TARGET_MS,
        "loadavg_1_5_15_before_and_after_each_run": [[round(x, 2) for x in la] for la in load],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "onnxruntime": ort.__version__},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(a.out, result)
    print(f"median {head} ms (target <= {TARGET_MS} ms): {'met' if result['met'] else 'NOT met'}")
    return result


if __name__ == "__main__":
    main()
