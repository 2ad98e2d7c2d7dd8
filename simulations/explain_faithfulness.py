"""Which explanation to trust: deletion/insertion AOPC of occlusion, integrated gradients and random.

    FEDRNN_DATA_DIR=... FEDRNN_CACHE_DIR=... python simulations/explain_faithfulness.py \
        [--model CHECKPOINT_OR_RUN] [--imdb 40] [--amazon-per-category 20]

For every review of a seeded sample of IMDB test and of the Amazon target test (equal numbers
per category), each method scores the words toward the model's predicted class; then the top
1/5/10/20/50% of words are deleted (masked to padding) or inserted into an all-padding review
(``fedrnn.explain.faithfulness``). Reported per data set and method: mean curves, mean deletion
and insertion AOPC with a 95% bootstrap interval over reviews, and each method's CPU time per
review; and how far occlusion and integrated gradients agree (Spearman, top-5 overlap). The
random baseline draws fresh scores per review. Results:
``simulations/results/explain_faithfulness.{csv,json,png}``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedrnn.runs.prepare import cache_dir  # noqa: E402

from fedrnn.edge.explain import segment  # noqa: E402
from fedrnn.explain.attribution import IG_STEPS, METHODS, TorchModel, load_model, random_scores  # noqa: E402
from fedrnn.explain.compare import TOP, agreement  # noqa: E402
from fedrnn.explain.faithfulness import FRACTIONS, aopc, curves  # noqa: E402
from fedrnn.explain.samples import amazon_test_sample, imdb_test_sample  # noqa: E402
from fedrnn.model.checkpoint import write_csv, write_json  # noqa: E402
from fedrnn.runs.plots import plt  # noqa: E402  (Agg backend already chosen)

RESULTS = Path(__file__).resolve().parent / "results"
ALL_METHODS = (*METHODS, "random")


def bootstrap_ci(x: np.ndarray, rng: np.random.Generator, draws: int = 2000) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean."""
    means = x[rng.integers(0, len(x), size=(draws, len(x)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def measure(m: TorchModel, texts: list[str], seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Per method: deletion and insertion curves [reviews, fractions] and seconds per review."""
    rng = np.random.default_rng(seed)
    out = {k: {"deletion": [], "insertion": [], "seconds": []} for k in ALL_METHODS}
    out["occlusion"] |= {"spearman_vs_ig": [], "top_overlap_vs_ig": []}
    for i, text in enumerate(texts):
        seg = segment(m.tokenizer, text, m.max_len)
        if not len(seg.visible):
            continue
        target = int(m.probs(seg.ids[None], np.array([len(seg.ids)]))[0].argmax())
        scores = {}
        for name in ALL_METHODS:
            t0 = time.process_time()
            scores[name] = random_scores(seg, rng) if name == "random" else METHODS[name](m, seg, target)
            out[name]["seconds"].append(time.process_time() - t0)
            deletion, insertion = curves(m.probs, seg, scores[name], target)
            out[name]["deletion"].append(deletion)
            out[name]["insertion"].append(insertion)
        rho, overlap = agreement(scores["occlusion"], scores["integrated-gradients"])
        out["occlusion"]["spearman_vs_ig"].append(rho)
        out["occlusion"]["top_overlap_vs_ig"].append(overlap)
        if (i + 1) % 25 == 0:
            print(f"  {i + 1}/{len(texts)} reviews", flush=True)
    return {k: {kk: np.array(vv) for kk, vv in v.items()} for k, v in out.items()}


def summarise(dataset: str, res: dict[str, dict[str, np.ndarray]], seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for name, r in res.items():
        per_review = [aopc(d, i) for d, i in zip(r["deletion"], r["insertion"], strict=True)]
        row: dict = {"dataset": dataset, "method": name, "reviews": len(per_review)}
        for key in ("deletion_aopc", "insertion_aopc"):
            x = np.array([p[key] for p in per_review])
            lo, hi = bootstrap_ci(x, rng)
            row |= {key: round(float(x.mean()), 4), f"{key}_ci_low": round(lo, 4), f"{key}_ci_high": round(hi, 4)}
        row["cpu_seconds_per_review"] = round(float(r["seconds"].mean()), 4)
        if "spearman_vs_ig" in r:  # the yardstick: how much two methods disagree on one model
            row["spearman_vs_ig"] = round(float(np.nanmean(r["spearman_vs_ig"])), 4)
            row[f"top{TOP}_overlap_vs_ig"] = round(float(np.nanmean(r["top_overlap_vs_ig"])), 4)
        for curve in ("deletion", "insertion"):
            for f, v in zip(FRACTIONS, r[curve].mean(0), strict=True):
                row[f"{curve}_p@{f:g}"] = round(float(v), 4)
        rows.append(row)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(2, len(datasets), figsize=(5 * len(datasets), 7), squeeze=False)
    for j, ds in enumerate(datasets):
        for i, curve in enumerate(("deletion", "insertion")):
            ax = axes[i, j]
            for r in (r for r in rows if r["dataset"] == ds):
                ys = [r[f"{curve}_p@{f:g}"] for f in FRACTIONS]
                ax.plot([100 * f for f in FRACTIONS], ys, marker="o",
                        label=f"{r['method']} (AOPC {r[f'{curve}_aopc']:.3f})")
            ax.set_title(f"{ds}: {curve} of the top words")
            ax.set_xlabel("% of words " + ("deleted" if curve == "deletion" else "inserted"))
            ax.set_ylabel("p(predicted class)")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint or run dir (default: $FEDRNN_CACHE_DIR/teacher)")
    p.add_argument("--imdb", type=int, default=40, help="IMDB test reviews")
    p.add_argument("--amazon-per-category", type=int, default=20, help="Amazon test reviews per category")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default=str(RESULTS / "explain_faithfulness"), help="output path without extension")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model_path = a.model or str(cache_dir() / "teacher")
    m = load_model(model_path)
    # Amazon first: its reviews are shorter, so on a busy machine its part is written sooner
    samples = {"amazon_test": amazon_test_sample(a.amazon_per_category, a.seed),
               "imdb_test": imdb_test_sample(a.imdb, a.seed)}
    rows, t0, load = [], time.perf_counter(), [os.getloadavg()]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, reviews in samples.items():  # results are written after each data set, so a long run keeps its part
        print(f"{name}: {len(reviews)} reviews", flush=True)
        rows += summarise(name, measure(m, reviews.texts, a.seed), a.seed)
        load.append(os.getloadavg())
        write_csv(out.with_suffix(".csv"), rows)
        write_json(out.with_suffix(".json"), {
            "command": "python simulations/explain_faithfulness.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "model": model_path, "fractions": list(FRACTIONS), "ig_steps": IG_STEPS, "seed": a.seed,
            "torch_threads": a.threads, "wall_seconds": round(time.perf_counter() - t0, 1),
            "loadavg_1_5_15_at_start_and_after_each_dataset": [[round(x, 2) for x in la] for la in load],
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
            "rows": rows,
        })
        plot(rows, out.with_suffix(".png"))
    for r in rows:
        print(f"{r['dataset']:12s} {r['method']:22s} deletion AOPC {r['deletion_aopc']:.3f} "
              f"[{r['deletion_aopc_ci_low']:.3f}, {r['deletion_aopc_ci_high']:.3f}]  insertion AOPC "
              f"{r['insertion_aopc']:.3f} [{r['insertion_aopc_ci_low']:.3f}, {r['insertion_aopc_ci_high']:.3f}]  "
              f"{r['cpu_seconds_per_review']:.3f} CPU-s/review")


if __name__ == "__main__":
    main()
