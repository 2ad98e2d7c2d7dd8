"""How explanations move under compression and under federated fine-tuning.

    FEDRNN_DATA_DIR=... FEDRNN_CACHE_DIR=... python simulations/explain_study.py \
        --student-export DIR --run RUN_DIR [--teacher DIR]

Every model is explained by word occlusion (``fedrnn.edge.explain.occlusion``; torch models through
``fedrnn.explain.attribution.TorchModel``, exported ones through onnxruntime exactly as on a
device), always toward the *positive* class, so a score's sign is the word's sentiment direction
in its review and scores of two models are comparable even where their labels differ.

(a) **Teacher -> student -> int8**: the IMDB teacher, the student distilled from it (float ONNX)
    and the same student as the int8 model a device runs (``--student-export``, written by
    ``python -m fedrnn.edge.export``), on seeded IMDB test and Amazon test samples. Per pair of
    models: Spearman rank correlation of the word scores within a review (mean over reviews),
    overlap of the 5 most influential words (largest |score|), and label agreement
    (``fedrnn.explain.compare``). The yardstick of how much two *methods* differ on one model,
    the teacher's occlusion against its integrated gradients, is in the faithfulness results.
(b) **Before -> after federated fine-tuning**, per Amazon category: the teacher against the final
    global model of a federated run (``--run``), on the category's test reviews: the same
    agreement numbers, both models' accuracy, and per word (lower-cased, punctuation stripped,
    at least ``--min-count`` occurrences in the category's sample) its mean score before and
    after: the words that gained or lost positive weight.

Results: ``simulations/results/explain_study.csv`` (agreement rows),
``explain_study_words.csv`` (every counted word), ``explain_study.md`` (tables) and
``explain_example.{svg,html}`` (one review explained by the int8 student, as ``predict --explain``
prints it).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedrnn.runs.prepare import cache_dir  # noqa: E402

from fedrnn.data.loaders import AMAZON_CATEGORIES  # noqa: E402
from fedrnn.data.reviews import Reviews  # noqa: E402
from fedrnn.edge.explain import ProbFn, Segmented, explain, occlusion, segment, to_html, to_rich  # noqa: E402
from fedrnn.edge.predict import Predictor  # noqa: E402
from fedrnn.explain.attribution import load_model  # noqa: E402
from fedrnn.explain.compare import TOP, agreement  # noqa: E402
from fedrnn.explain.samples import amazon_test_sample, imdb_test_sample  # noqa: E402
from fedrnn.model.checkpoint import write_csv, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
POSITIVE = 1
_STRIP = re.compile(r"^\W+|\W+$")


def scores_of(prob_fn: ProbFn, seg: Segmented) -> tuple[np.ndarray, np.ndarray]:
    """(class probabilities, occlusion score toward the positive class per visible word)."""
    probs, _, s = occlusion(prob_fn, seg, POSITIVE)
    return probs, s


def compare(
    models: dict[str, tuple[object, ProbFn]], reviews: Reviews, pairs: list[tuple[str, str]]
) -> dict[str, list]:
    """Explain every review with every model; per pair the per-review agreement, plus raw scores for part (b)."""
    out: dict[str, list] = defaultdict(list)
    for i, text in enumerate(reviews.texts):
        tok, max_len = next(iter(models.values()))[0].tokenizer, next(iter(models.values()))[0].max_len
        seg = segment(tok, text, max_len)
        if len(seg.visible) < 3:
            continue
        res = {name: scores_of(fn, seg) for name, (_, fn) in models.items()}
        for a, b in pairs:
            rho, overlap = agreement(res[a][1], res[b][1])
            out[f"{a}|{b}"].append((rho, overlap, res[a][0].argmax() == res[b][0].argmax()))
        out["reviews"].append((i, seg, {k: v for k, v in res.items()}))
        if (i + 1) % 25 == 0:
            print(f"  {i + 1}/{len(reviews)}", flush=True)
    return out


def pair_rows(part: str, dataset: str, res: dict[str, list], pairs: list[tuple[str, str]]) -> list[dict]:
    rows = []
    for a, b in pairs:
        x = np.array(res[f"{a}|{b}"], dtype=float)
        rows.append({
            "part": part, "dataset": dataset, "from": a, "to": b, "reviews": len(x),
            "spearman_mean": round(float(np.nanmean(x[:, 0])), 4),
            "spearman_median": round(float(np.nanmedian(x[:, 0])), 4),
            f"top{TOP}_overlap": round(float(x[:, 1].mean()), 4), "label_agreement": round(float(x[:, 2].mean()), 4),
        })
    return rows


def word_shift(category: str, res: dict[str, list], labels: np.ndarray, min_count: int) -> tuple[list[dict], dict]:
    """Per word: mean positive-class score before and after fine-tuning; plus both models' accuracy."""
    before, after = defaultdict(list), defaultdict(list)
    correct = {"teacher": [], "federated": []}
    for i, seg, r in res["reviews"]:
        for name in correct:
            correct[name].append(int(r[name][0].argmax()) == int(labels[i]))
        words = seg.words
        for j, w in enumerate(seg.visible):
            key = _STRIP.sub("", words[w].lower())
            if key:
                before[key].append(r["teacher"][1][j])
                after[key].append(r["federated"][1][j])
    rows = [
        {"category": category, "word": w, "count": len(before[w]), "before": round(float(np.mean(before[w])), 4),
         "after": round(float(np.mean(after[w])), 4), "delta": round(float(np.mean(after[w]) - np.mean(before[w])), 4)}
        for w in before if len(before[w]) >= min_count
    ]
    return rows, {k: float(np.mean(v)) for k, v in correct.items()}


def render_example(predictor: Predictor, text: str, out: Path) -> str:
    """The int8 student's explanation of one review as SVG (what the terminal shows), HTML and plain text."""
    e = explain(predictor, text)
    console = Console(record=True, width=100, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(to_rich(e))
    out.with_suffix(".svg").write_text(console.export_svg(title="python -m fedrnn.edge.predict EXPORT --explain"))
    out.with_suffix(".html").write_text(to_html([e], title="fedrnn: int8 student explanation"))
    return str(to_rich(e))


def markdown(rows: list[dict], words: list[dict], acc: dict[str, dict], example: str, meta: dict) -> str:
    lines = ["# Explanation study", "", f"Command: `{meta['command']}`  ", f"Load average before/after: "
             f"{meta['loadavg'][0]} / {meta['loadavg'][1]}; wall {meta['wall_seconds']} s.", "",
             "Occlusion scores toward the positive class; Spearman = rank correlation of a review's word scores "
             f"(mean over reviews), top-{TOP} overlap = share of the {TOP} most influential words in common.", "",
             f"| part | data | from | to | reviews | Spearman mean | top-{TOP} overlap | label agreement |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['part']} | {r['dataset']} | {r['from']} | {r['to']} | {r['reviews']} | "
                     f"{r['spearman_mean']:.3f} | {r[f'top{TOP}_overlap']:.3f} | {r['label_agreement']:.3f} |")
    if acc:
        lines += ["", "## Words that gained or lost positive weight in federated fine-tuning", "",
                  "| category | accuracy before -> after | gained (before -> after) | lost (before -> after) |",
                  "|---|---|---|---|"]
        for c in acc:
            ws = sorted((w for w in words if w["category"] == c), key=lambda w: w["delta"])
            fmt = lambda w: f"{w['word']} ({w['before']:+.3f} -> {w['after']:+.3f}, n={w['count']})"  # noqa: E731
            lines.append(f"| {c} | {acc[c]['teacher']:.3f} -> {acc[c]['federated']:.3f} | "
                         f"{'; '.join(fmt(w) for w in ws[::-1][:TOP])} | {'; '.join(fmt(w) for w in ws[:TOP])} |")
    lines += ["", "## Example (int8 student, `predict --explain`)", "", "```", example, "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=None, help="teacher checkpoint (default: $FEDRNN_CACHE_DIR/teacher)")
    p.add_argument("--student-export", required=True, help="export dir of a student distilled from the teacher")
    p.add_argument("--run", default=None, help="federated run dir for part (b) (its final global model)")
    p.add_argument("--imdb", type=int, default=40, help="IMDB test reviews for part (a)")
    p.add_argument("--amazon-per-category", type=int, default=15, help="Amazon test reviews per category, part (a)")
    p.add_argument("--fed-per-category", type=int, default=40, help="Amazon test reviews per category, part (b)")
    p.add_argument("--min-count", type=int, default=5, help="occurrences for a word to be listed in part (b)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "explain_study"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    t0, load = time.perf_counter(), [os.getloadavg()]
    teacher = load_model(a.teacher or cache_dir() / "teacher")
    student = {"student float": Predictor(a.student_export, quantized=False, threads=1),
               "student int8": Predictor(a.student_export, quantized=True, threads=1)}
    if student["student int8"].max_len != teacher.max_len:
        raise SystemExit(f"{a.student_export}: max_len {student['student int8'].max_len} differs from the teacher's "
                         f"{teacher.max_len}; the study compares word scores on the same tokens")
    models_a = {"teacher": (teacher, teacher.probs)} | {k: (v, v.probs) for k, v in student.items()}
    pairs_a = [("teacher", "student float"), ("student float", "student int8"), ("teacher", "student int8")]
    rows: list[dict] = []
    samples = {"imdb_test": imdb_test_sample(a.imdb, a.seed), "amazon_test": amazon_test_sample(a.amazon_per_category,
                                                                                                a.seed)}
    for name, reviews in samples.items():
        print(f"(a) {name}: {len(reviews)} reviews", flush=True)
        rows += pair_rows("a: compression", name, compare(models_a, reviews, pairs_a), pairs_a)
    words: list[dict] = []
    acc: dict[str, dict] = {}
    if a.run:
        fed = load_model(a.run)
        models_b = {"teacher": (teacher, teacher.probs), "federated": (fed, fed.probs)}
        amazon = amazon_test_sample(a.fed_per_category, a.seed + 1)
        for c in AMAZON_CATEGORIES:
            reviews = amazon.subset(np.flatnonzero(amazon.groups == c))
            print(f"(b) {c}: {len(reviews)} reviews", flush=True)
            res = compare(models_b, reviews, [("teacher", "federated")])
            rows += pair_rows("b: federated", f"amazon {c}", res, [("teacher", "federated")])
            w, acc[c] = word_shift(c, res, reviews.labels, a.min_count)
            words += w
    out = Path(a.out)
    load.append(os.getloadavg())
    example_text = samples["amazon_test"].texts[0]
    example = render_example(student["student int8"], example_text, out.parent / "explain_example")
    meta = {"command": "python simulations/explain_study.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "loadavg": [[round(x, 2) for x in la] for la in load], "wall_seconds": round(time.perf_counter() - t0, 1)}
    write_csv(out.with_suffix(".csv"), rows)
    if words:
        write_csv(out.parent / (out.name + "_words.csv"), words)
    write_json(out.with_suffix(".json"), meta | {"rows": rows, "accuracy": acc, "example_review": example_text})
    out.with_suffix(".md").write_text(markdown(rows, words, acc, example, meta))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
