"""Classify reviews with an exported student: ``python -m fedrnn.edge.predict EXPORT_DIR "text" ...``.

Runs on onnxruntime + tokenizers + numpy only — torch is never imported, here or in the
modules this one imports — so the deployable model works on a device with a few MB to
spare. Texts go through the same cleaning and tokenization as in training
(``fedrnn.data.loaders.clean_text``, ``fedrnn.data.tokenizer.encode``). This module also owns the
layout of an export directory, which ``fedrnn.edge.export`` writes.

``--explain`` adds word-level attributions by occlusion (``fedrnn.edge.explain``: every word masked
in turn, all variants in one onnxruntime call), coloured in the terminal, with the top words for
and against the label; ``--html FILE`` also writes them as a web page.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rich.console import Console

from fedrnn.data.reviews import clean_text
from fedrnn.data.tokenizer import TokenizerError, encode, load_tokenizer
from fedrnn.edge.explain import explain, to_html, to_rich

EXPORT_FORMAT = "fedrnn-onnx"
EXPORT_CONFIG, FLOAT_MODEL, INT8_MODEL, TOKENIZER = "config.json", "model.onnx", "model.int8.onnx", "tokenizer.json"
INPUTS, OUTPUT = ("ids", "lengths"), "logits"
LABELS = ("negative", "positive")
CPU_PROVIDER = "CPUExecutionProvider"


class PredictError(ValueError):
    """An export directory is missing, incomplete or not a fedrnn export."""


def resolve_provider(name: str | None) -> str:
    """The onnxruntime execution provider to use for ``name``; CPU, with a warning, if it is not installed.

    ``name`` is a provider's full name (``CUDAExecutionProvider``) or its short form (``cuda``,
    ``tensorrt``, ``xnnpack``, ``coreml``, ``nnapi``...), matched case-insensitively against every
    provider onnxruntime knows. A name it does not know at all is an error (a typo should not
    silently run on the CPU); a known one that this build of onnxruntime lacks falls back.
    """
    if name is None:
        return CPU_PROVIDER
    wanted = name.lower().removesuffix("executionprovider")
    known = {p.lower().removesuffix("executionprovider"): p for p in ort.get_all_providers()}
    if wanted not in known:
        raise PredictError(f"unknown execution provider {name!r}; onnxruntime knows {', '.join(known.values())}")
    provider = known[wanted]
    available = ort.get_available_providers()
    if provider not in available:
        warnings.warn(f"execution provider {provider} is not available in this onnxruntime (available: "
                      f"{', '.join(available)}); falling back to {CPU_PROVIDER}", RuntimeWarning, stacklevel=2)
        return CPU_PROVIDER
    return provider


class Predictor:
    """An exported student loaded into onnxruntime, with its tokenizer and ``max_len``.

    ``threads`` sets onnxruntime's intra-op threads (``None``: its default, all cores).
    ``provider`` picks the execution provider (:func:`resolve_provider`; CPU by default); the
    session keeps CPU as the fallback for operators the provider cannot run, and ``provider``
    afterwards names the one the session really uses first.
    """

    def __init__(self, export_dir: str | os.PathLike[str], quantized: bool = True, threads: int | None = None,
                 provider: str | None = None) -> None:
        d = Path(export_dir)
        cfg_path = d / EXPORT_CONFIG
        if not cfg_path.is_file():
            raise PredictError(
                f"{cfg_path} does not exist; run `python -m fedrnn.edge.export CHECKPOINT --out {d}` first"
            )
        try:
            cfg = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PredictError(f"{cfg_path}: not valid JSON ({e})") from e
        if not isinstance(cfg, dict) or cfg.get("format") != EXPORT_FORMAT:
            raise PredictError(f"{cfg_path}: not a {EXPORT_FORMAT} export config")
        max_len, labels = cfg.get("max_len"), cfg.get("labels")
        if not isinstance(max_len, int) or max_len < 1:
            raise PredictError(f"{cfg_path}: max_len must be a positive integer, got {max_len!r}")
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            raise PredictError(f"{cfg_path}: labels must be a list of class names, got {labels!r}")
        self.max_len, self.labels = max_len, tuple(labels)
        model_path = d / (INT8_MODEL if quantized else FLOAT_MODEL)
        if not model_path.is_file():
            raise PredictError(f"{model_path} does not exist")
        try:
            self.tokenizer = load_tokenizer(d / TOKENIZER)
        except TokenizerError as e:
            raise PredictError(str(e)) from e
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        wanted = resolve_provider(provider)
        providers = [wanted] if wanted == CPU_PROVIDER else [wanted, CPU_PROVIDER]
        self.session = ort.InferenceSession(str(model_path), options, providers=providers)
        self.provider: str = self.session.get_providers()[0]

    def logits(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Raw logits for already-encoded reviews (int ids ``[N, L]``, true lengths ``[N]``)."""
        width = int(lengths.max())
        feed = {"ids": np.ascontiguousarray(ids[:, :width], dtype=np.int64), "lengths": lengths.astype(np.int64)}
        return self.session.run([OUTPUT], feed)[0]

    def probs(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Class probabilities for already-encoded reviews (what ``fedrnn.edge.explain`` masks and re-runs)."""
        return softmax(self.logits(ids, lengths))

    def predict_proba(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Class probabilities ``[N, num_classes]`` for raw review texts."""
        out = []
        for start in range(0, len(texts), batch_size):
            chunk = [clean_text(t) for t in texts[start : start + batch_size]]
            enc = encode(self.tokenizer, chunk, np.zeros(len(chunk), dtype=np.int64), self.max_len)
            out.append(self.probs(enc.ids, enc.lengths))
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), dtype=np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", help="directory written by `python -m fedrnn.edge.export`")
    parser.add_argument("texts", nargs="*", help="reviews to classify")
    parser.add_argument("--file", help="text file with one review per line (blank lines skipped)")
    parser.add_argument("--float", dest="quantized", action="store_false", help="use the float model, not int8")
    parser.add_argument("--explain", action="store_true", help="show each word's attribution (occlusion)")
    parser.add_argument("--html", metavar="FILE", help="write the explanations to an HTML file (implies --explain)")
    parser.add_argument("--top", type=int, default=5, help="how many words for and against the label (default 5)")
    parser.add_argument("--provider", default=None,
                        help=f"onnxruntime execution provider, e.g. cuda, tensorrt, xnnpack, coreml, nnapi (default: "
                        f"cpu; installed here: {', '.join(ort.get_available_providers())}); falls back to CPU")
    a = parser.parse_intermixed_args(argv)
    texts = list(a.texts)
    if a.file:
        path = Path(a.file)
        if not path.is_file():
            parser.error(f"--file {path} does not exist")
        texts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        parser.error("give review texts as arguments or --file")
    try:
        predictor = Predictor(a.export_dir, quantized=a.quantized, provider=a.provider)
    except PredictError as e:
        sys.exit(f"error: {e}")
    print(f"provider: {predictor.provider}", file=sys.stderr)
    if a.top < 1:
        parser.error(f"--top must be >= 1, got {a.top}")
    if a.explain or a.html:
        explain_texts(predictor, texts, a.html, a.top)
        return
    for text, p in zip(texts, predictor.predict_proba(texts), strict=True):
        k = int(p.argmax())
        snippet = " ".join(text.split())
        print(f"{predictor.labels[k]}\t{p[k]:.4f}\t{snippet[:70] + '...' if len(snippet) > 73 else snippet}")


def explain_texts(predictor: Predictor, texts: list[str], html_path: str | None, top: int) -> None:
    """Print each review's occlusion explanation in colour; with ``html_path`` also write them as a page."""
    console = Console(highlight=False)
    explanations = []
    for i, text in enumerate(texts):
        e = explain(predictor, text)
        explanations.append(e)
        console.print(("\n" if i else "") + f"[bold]review {i + 1}[/]")
        console.print(to_rich(e, top))
    if html_path:
        Path(html_path).write_text(to_html(explanations, top), encoding="utf-8")
        console.print(f"\nwrote {html_path}")


if __name__ == "__main__":
    main()
