"""Word-level explanations by occlusion, torch-free: why a review got its label.

A *word* is a whitespace-separated piece of the cleaned review (``clean_text``), which is what a
reader sees; each word covers the subword tokens whose start falls inside it. Masking a word
replaces its tokens with the padding id: its embedding row is the one the model never trains
(``padding_idx``), the "absent" input that integrated gradients in ``fedrnn.explain`` also starts
from, so both methods mean the same thing by "without this word". Sequence length is kept, so
the recurrence sees the same number of steps.

The occlusion attribution of word ``w`` toward class ``k`` is ``p_k(review) - p_k(review with w
masked)``: positive when the word supports ``k``. All variants (the review plus one per word)
run as one batch, i.e. one onnxruntime call on the device. Words cut off by ``max_len`` (reviews
keep their last tokens) are never seen by the model and get no attribution (NaN).

Only numpy, tokenizers and rich are imported here, so ``fedrnn.edge.predict --explain`` runs
without torch; the server side (``fedrnn.explain``) reuses the segmentation, masking and rendering.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from rich.text import Text
from tokenizers import Tokenizer

from fedrnn.data.reviews import clean_text
from fedrnn.data.tokenizer import PAD_ID, UNK

MASK_ID = PAD_ID
# (r, g, b) per class index: negative red, positive green; words take the colour of the class they push toward.
CLASS_RGB = ((214, 39, 40), (44, 160, 44))
_WORD = re.compile(r"\S+")

ProbFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``(ids [N, T] int64, lengths [N] int64) -> class probabilities [N, C]``: an onnxruntime or torch model."""


class Explainable(Protocol):
    """What explaining needs from a model: ``fedrnn.edge.predict.Predictor`` or the server's torch wrapper."""

    tokenizer: Tokenizer
    max_len: int
    labels: tuple[str, ...]

    def probs(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Segmented:
    """A cleaned review split into words, with the token ids the model reads and each token's word."""

    text: str  # the cleaned review
    spans: list[tuple[int, int]]  # character span of each word in ``text``
    ids: np.ndarray  # int64 [T]: the last ``max_len`` tokens, exactly as ``fedrnn.data.tokenizer.encode`` keeps them
    token_word: np.ndarray  # int64 [T]: index into ``spans`` of each token's word

    @property
    def words(self) -> list[str]:
        return [self.text[a:b] for a, b in self.spans]

    @property
    def visible(self) -> np.ndarray:
        """Indices of the words the model sees (at least one token within ``max_len``), ascending."""
        return np.unique(self.token_word[self.token_word >= 0])


def segment(tokenizer: Tokenizer, text: str, max_len: int) -> Segmented:
    """Tokenize ``text`` like training does and map every kept token to the word it starts in."""
    cleaned = clean_text(text)
    spans = [m.span() for m in _WORD.finditer(cleaned)]
    enc = tokenizer.encode(cleaned, add_special_tokens=False)
    ids, offsets = enc.ids[-max_len:], enc.offsets[-max_len:]
    if not ids:  # encode() feeds an empty review as one UNK step; it has no words to explain
        return Segmented(cleaned, spans, np.array([tokenizer.token_to_id(UNK)], dtype=np.int64),
                         np.array([-1], dtype=np.int64))
    starts = np.array([a for a, _ in spans], dtype=np.int64)
    token_word = np.searchsorted(starts, [a for a, _ in offsets], side="right") - 1
    return Segmented(cleaned, spans, np.asarray(ids, dtype=np.int64), token_word.astype(np.int64))


def mask_words(seg: Segmented, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One row of ids per row of ``masks`` (bool ``[N, len(seg.visible)]``: True = mask that visible word)."""
    masks = np.asarray(masks, dtype=bool)
    visible = seg.visible
    if masks.ndim != 2 or masks.shape[1] != len(visible):
        raise ValueError(f"masks must have shape [N, {len(visible)}] (one column per visible word), got {masks.shape}")
    owned = seg.token_word >= 0  # only the UNK step of an empty review belongs to no word
    hit = np.zeros((len(masks), len(seg.ids)), dtype=bool)
    hit[:, owned] = masks[:, np.searchsorted(visible, seg.token_word[owned])]
    batch = np.tile(seg.ids, (len(masks), 1))
    batch[hit] = MASK_ID
    return batch, np.full(len(masks), len(seg.ids), dtype=np.int64)


def occlusion(prob_fn: ProbFn, seg: Segmented, target: int | None = None) -> tuple[np.ndarray, int, np.ndarray]:
    """(probabilities of the review, target class, attribution per visible word), in one ``prob_fn`` call.

    ``target`` defaults to the predicted class.
    """
    n = len(seg.visible)
    probs = prob_fn(*mask_words(seg, np.vstack([np.zeros((1, n), dtype=bool), np.eye(n, dtype=bool)])))
    k = int(probs[0].argmax()) if target is None else target
    return probs[0], k, probs[0, k] - probs[1:, k]


@dataclass(frozen=True)
class Explanation:
    """A review's label and the attribution of each of its words toward that label."""

    seg: Segmented
    labels: tuple[str, ...]
    probs: np.ndarray  # [C] class probabilities of the whole review
    target: int  # the class explained (by default the predicted one)
    scores: np.ndarray  # [len(seg.spans)] attribution toward ``target``; NaN for words the model does not see
    method: str = "occlusion"

    def top(self, n: int) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
        """Up to ``n`` words for the target class (largest positive scores) and against it (most negative)."""
        words, order = self.seg.words, np.argsort(-np.nan_to_num(self.scores, nan=0.0), kind="stable")
        pro = [(words[i], float(self.scores[i])) for i in order[:n] if self.scores[i] > 0]
        con = [(words[i], float(self.scores[i])) for i in order[::-1][:n] if self.scores[i] < 0]
        return pro, con

    def rgb(self, i: int) -> tuple[tuple[int, int, int], float] | None:
        """Colour and opacity in [0, 1] of word ``i``: the class it pushes toward, scaled to the largest |score|."""
        s = self.scores[i]
        scale = float(np.nanmax(np.abs(self.scores))) if np.isfinite(self.scores).any() else 0.0
        if not np.isfinite(s) or s == 0 or scale == 0:
            return None
        toward = self.target if s > 0 else (1 - self.target if len(self.labels) == 2 else None)
        colour = CLASS_RGB[toward] if toward is not None and toward < len(CLASS_RGB) else (128, 128, 128)
        return colour, abs(float(s)) / scale


def explain(model: Explainable, text: str, target: int | None = None) -> Explanation:
    """Occlusion explanation of one review (one batched call of ``model.probs``)."""
    seg = segment(model.tokenizer, text, model.max_len)
    probs, k, visible_scores = occlusion(model.probs, seg, target)
    return Explanation(seg, tuple(model.labels), probs, k, scatter(seg, visible_scores))


def scatter(seg: Segmented, visible_scores: np.ndarray) -> np.ndarray:
    """Per-visible-word scores placed into a per-word array (NaN for words the model does not see)."""
    scores = np.full(len(seg.spans), np.nan)
    if len(visible_scores):
        scores[seg.visible] = visible_scores
    return scores


# ------------------------------------------------------------------------------------------- rendering


def _blend(rgb: tuple[int, int, int], alpha: float) -> str:
    """The colour drawn over a white background at ``alpha``, as a hex string (terminals have no alpha)."""
    r, g, b = (round(255 - alpha * (255 - c)) for c in rgb)
    return f"#{r:02x}{g:02x}{b:02x}"


def to_rich(e: Explanation, top: int = 5) -> Text:
    """The review with each word's background in the colour of the class it supports, then the top words."""
    k = e.target
    out = Text()
    out.append(f"{e.labels[k]} {e.probs[k]:.4f}", style=f"bold {_blend(CLASS_RGB[k % 2], 1.0)}")
    out.append(f"  ({e.method}; colour = the class a word pushes toward, stronger = larger effect)\n")
    for i, (a, b) in enumerate(e.seg.spans):
        if i:
            out.append(" ")
        c = e.rgb(i)
        word = e.seg.text[a:b]
        if not np.isfinite(e.scores[i]):
            out.append(word, style="dim")
        elif c is None:
            out.append(word)
        else:
            out.append(word, style=f"black on {_blend(c[0], 0.15 + 0.85 * c[1])}")
    pro, con = e.top(top)
    for name, words in ((f"for {e.labels[k]}:    ", pro), (f"against {e.labels[k]}:", con)):
        out.append(f"\n{name} " + (", ".join(f"{w} ({s:+.3f})" for w, s in words) or "none"))
    return out


def to_html(explanations: Sequence[Explanation], top: int = 5, title: str = "fedrnn explanations") -> str:
    """A self-contained HTML page: one section per explanation, each word's score in its tooltip."""
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.9}"
        ".w{padding:1px 2px;border-radius:3px}.unseen{color:#999}section{margin-bottom:2em}</style>",
        "</head><body>", f"<h1>{html.escape(title)}</h1>",
        "<p>Each word's background is the colour of the class it pushes the model toward "
        f"(<span style=\"color:{_blend(CLASS_RGB[0], 1)}\">red: {html.escape(_label(explanations, 0))}</span>, "
        f"<span style=\"color:{_blend(CLASS_RGB[1], 1)}\">green: {html.escape(_label(explanations, 1))}</span>), "
        "stronger for a larger effect; hover for the score. Grey words lie beyond the model's window.</p>",
    ]
    for e in explanations:
        k = e.target
        parts.append(f"<section><h2>{html.escape(e.labels[k])} {e.probs[k]:.4f} "
                     f"<small>({html.escape(e.method)})</small></h2><p>")
        for i, (a, b) in enumerate(e.seg.spans):
            word, s, c = html.escape(e.seg.text[a:b]), e.scores[i], e.rgb(i)
            if not np.isfinite(s):
                parts.append(f'<span class="unseen">{word}</span> ')
            else:
                bg = f' style="background:rgba({c[0][0]},{c[0][1]},{c[0][2]},{0.1 + 0.9 * c[1]:.3f})"' if c else ""
                parts.append(f'<span class="w"{bg} title="{s:+.4f}">{word}</span> ')
        pro, con = e.top(top)
        parts.append("</p><p>")
        for name, words in ((f"for {e.labels[k]}", pro), (f"against {e.labels[k]}", con)):
            listed = ", ".join(f"{html.escape(w)} ({s:+.3f})" for w, s in words) or "none"
            parts.append(f"<b>{html.escape(name)}:</b> {listed}<br>")
        parts.append("</p></section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _label(explanations: Sequence[Explanation], k: int) -> str:
    labels = explanations[0].labels if explanations else ()
    return labels[k] if k < len(labels) else f"class {k}"
