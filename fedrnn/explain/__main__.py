"""Explain a checkpoint's predictions: ``python -m fedrnn.explain CHECKPOINT_OR_RUN "text" ...``.

CHECKPOINT_OR_RUN is a checkpoint directory (the teacher, a run's ``student/``) or a run directory
(its final global model). Each review is explained by Captum occlusion and integrated gradients
(``--method`` picks one) and printed in colour with the top words for and against its label;
``--html FILE`` writes the same as a web page.

Batch mode: ``--data FILE --out OUT.jsonl`` explains every review of a data file (``.txt`` with one
review per line, or any review file ``fedrnn.data.loaders.load_review_file`` reads: ``.jsonl[.gz]``,
``.csv``/``.tsv``, Amazon ``.review``) and writes one JSON line per review: its words, gold label
(if the file has one), predicted probabilities and each method's score per word (null for words
beyond the model's window).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from rich.console import Console

from fedrnn.data.loaders import load_review_file
from fedrnn.data.reviews import DataError
from fedrnn.edge.explain import Explanation, to_html, to_rich
from fedrnn.explain.attribution import IG_STEPS, METHODS, TorchModel, explain, load_model
from fedrnn.model.checkpoint import CheckpointError


def read_texts(path: Path) -> tuple[list[str], list[int | None]]:
    """Texts and gold labels (None where unknown) of a data file; ``.txt`` is one unlabelled review per line."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if path.suffix == ".txt":
        texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return texts, [None] * len(texts)
    reviews = load_review_file(path)
    return reviews.texts, [int(x) for x in reviews.labels]


def record(explanations: list[Explanation], gold: int | None) -> dict:
    """One JSON line: the words, labels, probabilities and every method's per-word scores."""
    e = explanations[0]
    return {
        "words": e.seg.words, "gold": gold, "pred": int(e.probs.argmax()), "target": e.target,
        "probs": [round(float(p), 6) for p in e.probs],
        "scores": {x.method: [None if not np.isfinite(s) else round(float(s), 6) for s in x.scores]
                   for x in explanations},
    }


def explain_all(m: TorchModel, text: str, methods: list[str]) -> list[Explanation]:
    return [explain(m, text, method) for method in methods]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedrnn.explain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="CHECKPOINT_OR_RUN", help="checkpoint directory or run directory")
    parser.add_argument("texts", nargs="*", help="reviews to explain")
    parser.add_argument("--method", choices=[*METHODS, "all"], default="all", help="attribution method (default all)")
    parser.add_argument("--top", type=int, default=5, help="words for and against the label to list (default 5)")
    parser.add_argument("--html", metavar="FILE", help="also write the explanations as an HTML page")
    parser.add_argument("--data", metavar="FILE", help="batch mode: explain every review of this data file")
    parser.add_argument("--out", metavar="FILE", help="batch mode: JSON Lines output (required with --data)")
    parser.add_argument("--limit", type=int, help="batch mode: only the first N reviews")
    a = parser.parse_intermixed_args(argv)
    if a.top < 1:
        parser.error(f"--top must be >= 1, got {a.top}")
    if a.limit is not None and a.limit < 1:
        parser.error(f"--limit must be >= 1, got {a.limit}")
    if bool(a.data) != bool(a.out):
        parser.error("batch mode needs both --data and --out")
    if not a.texts and not a.data:
        parser.error("give review texts as arguments, or --data FILE --out FILE")
    methods = list(METHODS) if a.method == "all" else [a.method]
    try:
        m = load_model(a.model)
        data = read_texts(Path(a.data)) if a.data else None
    except (CheckpointError, DataError) as e:
        sys.exit(f"error: {e}")
    console = Console(highlight=False)
    shown: list[Explanation] = []
    for i, text in enumerate(a.texts):
        for e in explain_all(m, text, methods):
            console.print(f"\n[bold]review {i + 1}[/]")
            console.print(to_rich(e, a.top))
            shown.append(e)
    if data is not None:
        texts, gold = data[0][: a.limit], data[1][: a.limit]
        with open(a.out, "w", encoding="utf-8") as f:
            for text, label in zip(texts, gold, strict=True):
                f.write(json.dumps(record(explain_all(m, text, methods), label)) + "\n")
        console.print(f"wrote {len(texts)} explanations ({', '.join(methods)}; IG with {IG_STEPS} steps) to {a.out}")
    if a.html:
        Path(a.html).write_text(to_html(shown, a.top), encoding="utf-8")
        console.print(f"wrote {a.html}")


if __name__ == "__main__":
    main()
