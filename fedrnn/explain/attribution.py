"""Word attributions for a torch checkpoint with Captum: integrated gradients, occlusion and a random baseline.

* **Integrated gradients** (``LayerIntegratedGradients`` on the embedding layer): token ids are
  discrete, so the path runs in embedding space, from the padding id's embedding at every
  position (the same "absent" input that masking uses) to the review's embeddings; a token's
  attribution is the sum over its embedding dimensions, a word's the sum over its tokens.
* **Occlusion** (Captum ``FeatureAblation`` with one feature per word): each word's tokens are
  replaced by the padding id in turn, which is exactly what ``fedrnn.edge.explain.occlusion``
  does with onnxruntime on the device (a test holds the two to each other). Captum's
  ``Occlusion`` slides fixed windows over tokens, which would cut words apart.
* **Random**: scores drawn at random, the floor a faithful method must clear.

All explain the probability of a target class (by default the predicted one), so occlusion
and integrated-gradient scores are both in probability units (IG's sum over words equals
``p(review) - p(all padding)``, up to its integration error).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from captum.attr import FeatureAblation, LayerIntegratedGradients
from tokenizers import Tokenizer

from fedrnn.edge.explain import MASK_ID, Explanation, Segmented, scatter, segment
from fedrnn.edge.predict import LABELS
from fedrnn.model.checkpoint import (
    CONFIG,
    WEIGHTS,
    CheckpointError,
    check_weights,
    load_checkpoint,
    load_tensors,
    read_json,
)
from fedrnn.model.rnn import SentimentRNN

IG_STEPS = 50


class TorchModel:
    """A ``SentimentRNN`` with its tokenizer and ``max_len``, shaped like ``fedrnn.edge.explain.Explainable``."""

    def __init__(self, model: SentimentRNN, tokenizer: Tokenizer, max_len: int, labels: tuple[str, ...] = LABELS):
        self.model, self.tokenizer, self.max_len, self.labels = model.eval(), tokenizer, max_len, labels

    def forward_probs(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Class probabilities as a differentiable tensor (what Captum attributes)."""
        return torch.softmax(self.model(ids, lengths), dim=1)

    @torch.no_grad()
    def probs(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        return self.forward_probs(torch.from_numpy(np.asarray(ids, dtype=np.int64)),
                                  torch.from_numpy(np.asarray(lengths, dtype=np.int64))).numpy()


def load_model(path: str | os.PathLike[str]) -> TorchModel:
    """A checkpoint directory, or a run directory's final global model (its last ``checkpoints/round_NNN``).

    A run's checkpoints hold weights only: the architecture and tokenizer come from the run's
    teacher (``run.teacher`` in its ``config.json``, else the cached default teacher, as ``simulate`` does).
    """
    p = Path(path)
    if (p / CONFIG).is_file() and (p / WEIGHTS).is_file():
        model, tok, cfg = load_checkpoint(p)
        return TorchModel(model, tok, cfg["max_len"])
    rounds = sorted((p / "checkpoints").glob("round_*.safetensors"))
    if not rounds:
        raise CheckpointError(f"{p}: not a checkpoint (no {CONFIG} with {WEIGHTS}) nor a run directory "
                              f"(no checkpoints/round_NNN.safetensors)")
    from fedrnn.runs.prepare import cache_dir  # only here: it imports the round loop and Flower

    run_cfg = read_json(p / CONFIG)
    teacher = (run_cfg.get("run", {}) if isinstance(run_cfg, dict) else {}).get("teacher") or cache_dir() / "teacher"
    model, tok, cfg = load_checkpoint(teacher)
    tensors = load_tensors(rounds[-1])
    check_weights(model.state_dict(), tensors, f"{rounds[-1]} (over the teacher {teacher})")
    model.load_state_dict(tensors)
    return TorchModel(model, tok, cfg["max_len"])


def _inputs(seg: Segmented) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Captum's inputs for one review: ids [1, T], lengths [1], and each token's word column [1, T]."""
    columns = np.searchsorted(seg.visible, seg.token_word)
    return (torch.from_numpy(seg.ids)[None], torch.tensor([len(seg.ids)]), torch.from_numpy(columns)[None])


def integrated_gradients(m: TorchModel, seg: Segmented, target: int, n_steps: int = IG_STEPS) -> np.ndarray:
    """Integrated gradients of ``p_target`` per visible word, from all-padding embeddings to the review's."""
    if not len(seg.visible):
        return np.zeros(0)
    ids, lengths, columns = _inputs(seg)
    lig = LayerIntegratedGradients(m.forward_probs, m.model.embedding)
    attr = lig.attribute(ids, baselines=torch.full_like(ids, MASK_ID), target=target,
                         additional_forward_args=(lengths,), n_steps=n_steps, internal_batch_size=n_steps)
    per_token = attr.sum(-1)[0].detach().double().numpy()
    return np.bincount(columns[0].numpy(), weights=per_token, minlength=len(seg.visible))


def occlusion(m: TorchModel, seg: Segmented, target: int) -> np.ndarray:
    """``p_target(review) - p_target(review with the word's tokens set to padding)`` per visible word."""
    if not len(seg.visible):
        return np.zeros(0)
    ids, lengths, columns = _inputs(seg)
    with torch.no_grad():
        attr = FeatureAblation(m.forward_probs).attribute(
            ids, baselines=MASK_ID, target=target, additional_forward_args=(lengths,), feature_mask=columns,
            perturbations_per_eval=len(seg.visible),
        )
    first = np.unique(columns[0].numpy(), return_index=True)[1]  # every token of a word carries its score
    return attr[0].double().numpy()[first]


def random_scores(seg: Segmented, rng: np.random.Generator) -> np.ndarray:
    """Random scores: the ranking a method must beat to be worth trusting."""
    return rng.standard_normal(len(seg.visible))


Method = Callable[[TorchModel, Segmented, int], np.ndarray]
METHODS: dict[str, Method] = {"occlusion": occlusion, "integrated-gradients": integrated_gradients}


def explain(m: TorchModel, text: str, method: str, target: int | None = None) -> Explanation:
    """One review explained by ``method`` (a key of ``METHODS``) toward ``target`` (default: predicted class)."""
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; expected one of {sorted(METHODS)}")
    seg = segment(m.tokenizer, text, m.max_len)
    probs = m.probs(seg.ids[None], np.array([len(seg.ids)]))[0]
    k = int(probs.argmax()) if target is None else target
    return Explanation(seg, m.labels, probs, k, scatter(seg, METHODS[method](m, seg, k)), method)
