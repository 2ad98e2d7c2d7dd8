"""Structured pruning of a ``SentimentRNN``: recurrent hidden units and vocabulary rows.

Both prunings *shrink* the model (a new, smaller ``SentimentRNN`` and tokenizer come out), so
the bytes, the latency and the ONNX export all get smaller; a distillation fine-tune
(``fedrnn.edge.distill.distill``) then recovers the accuracy the cut cost, and the pruned
model exports and quantizes to int8 like any other (``fedrnn.edge.export``).

**Hidden units.** One unit ``j`` of a recurrent layer owns rows ``g*H + j`` of ``weight_ih``,
``weight_hh`` and both biases for each of its gates (4 for an LSTM: input, forget, cell,
output; 3 for a GRU: reset, update, new), its column ``j`` of ``weight_hh`` (the recurrent
input of every unit), its column in the next layer's ``weight_ih`` and, for the top layer, its
columns in the head - twice with mean+max pooling, whose features are ``[mean | max]``. All
of those go together or the model is no longer the same function of its remaining units.
Units are ranked by the L2 norm of everything they touch (incoming and outgoing weights).

Why not ``torch.nn.utils.prune`` or torch-pruning: ``torch.nn.utils.prune.ln_structured`` masks
one slice of one tensor (the zeros stay in the dense tensor, so neither bytes nor latency go
down) and knows nothing of the gate blocks inside ``weight_ih``/``weight_hh`` or of the
consumers of a unit in other tensors; the coupling above is the whole job. torch-pruning (its
dependency graph does couple such tensors) is not in this environment's package index, and
``SentimentRNN`` keeps one ``hidden_size`` for all layers, so the model is rebuilt here
anyway. The slicing is a few index operations per tensor.

**Vocabulary.** Rows of the embedding for tokens rare in the distillation/target text are
dropped and the BPE tokenizer is rebuilt to match: kept tokens get new consecutive ids (PAD 0
and UNK 1 stay), and a merge is kept only if its result is kept. The kept set is closed under
"parts of": a kept token's two merge parents are kept too, so every word still splits into
known pieces (a dropped token falls back to the kept pieces it was merged from) instead of
becoming UNK.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

from fedrnn.data.tokenizer import PAD, PAD_ID, UNK, Encoded
from fedrnn.model.rnn import ModelConfig, SentimentRNN

GATES = {"lstm": 4, "gru": 3}
UNK_ID = 1


class PruneError(ValueError):
    """A pruning request that cannot be met (bad size, wrong model kind)."""


def _check_plain(model: SentimentRNN) -> None:
    layer = model.rnn[0]["fwd"]
    if not isinstance(layer, (torch.nn.LSTM, torch.nn.GRU)):
        raise PruneError(f"pruning needs nn.LSTM/nn.GRU layers, got {type(layer).__name__} (a DP model?)")


def _directions(model: SentimentRNN) -> tuple[str, ...]:
    return ("fwd", "bwd") if model.cfg.bidirectional else ("fwd",)


def _gate_rows(units: torch.Tensor, hidden: int, gates: int) -> torch.Tensor:
    """Row indices of ``units`` in every gate block of a ``[gates*H, ...]`` weight."""
    return torch.cat([g * hidden + units for g in range(gates)])


def _head_cols(out_cols: torch.Tensor, width: int, pooling: str) -> torch.Tensor:
    """Head input columns fed by the top layer's output columns (twice for ``[mean | max]``)."""
    return torch.cat([out_cols, width + out_cols]) if pooling == "meanmax" else out_cols


@torch.no_grad()
def unit_importance(model: SentimentRNN) -> list[dict[str, torch.Tensor]]:
    """Per layer and direction, the L2 norm of each hidden unit's incoming and outgoing weights."""
    _check_plain(model)
    cfg, dirs = model.cfg, _directions(model)
    h, gates = cfg.hidden_size, GATES[cfg.cell]
    width = h * len(dirs)
    head_in = model.head.weight.pow(2).sum(0)  # [head inputs]
    out: list[dict[str, torch.Tensor]] = []
    for i, layer in enumerate(model.rnn):
        # squared norm of each output column of this layer as consumed downstream
        if i + 1 < cfg.num_layers:
            consumed = sum(model.rnn[i + 1][d].weight_ih_l0.pow(2).sum(0) for d in dirs)
        else:
            consumed = head_in[:width] + (head_in[width:] if cfg.pooling == "meanmax" else 0)
        scores = {}
        for k, d in enumerate(dirs):
            rnn = layer[d]
            rows = torch.zeros(h)
            for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
                w = getattr(rnn, name).pow(2)
                rows += (w.sum(1) if w.dim() == 2 else w).view(gates, h).sum(0)
            recurrent_out = rnn.weight_hh_l0.pow(2).sum(0)
            scores[d] = (rows + recurrent_out + consumed[k * h : (k + 1) * h]).sqrt()
        out.append(scores)
    return out


@torch.no_grad()
def prune_hidden(
    model: SentimentRNN, hidden_size: int, keep: Sequence[dict[str, Sequence[int]]] | None = None
) -> SentimentRNN:
    """A copy of ``model`` with ``hidden_size`` units per layer and direction.

    ``keep`` (one ``{direction: unit indices}`` per layer) chooses the units; by default the
    ``hidden_size`` units of highest :func:`unit_importance` in each layer and direction.
    """
    _check_plain(model)
    cfg, dirs = model.cfg, _directions(model)
    h, gates = cfg.hidden_size, GATES[cfg.cell]
    if not isinstance(hidden_size, int) or not 1 <= hidden_size <= h:
        raise PruneError(f"hidden_size must be an integer in 1..{h} (the model's), got {hidden_size!r}")
    if keep is None:
        keep = [{d: s[d].topk(hidden_size).indices.tolist() for d in dirs} for s in unit_importance(model)]
    if len(keep) != cfg.num_layers:
        raise PruneError(f"keep lists {len(keep)} layers, the model has {cfg.num_layers}")
    small = SentimentRNN(ModelConfig(**{**cfg.to_dict(), "hidden_size": hidden_size})).eval()
    in_cols = torch.arange(cfg.embed_dim)
    for i, (layer, new_layer) in enumerate(zip(model.rnn, small.rnn, strict=True)):
        out_cols = []
        for k, d in enumerate(dirs):
            units = torch.tensor(sorted(keep[i][d]), dtype=torch.long)
            if len(units) != hidden_size or len(set(units.tolist())) != hidden_size or units.min() < 0 \
                    or units.max() >= h:
                raise PruneError(f"layer {i} {d}: keep needs {hidden_size} distinct unit indices in 0..{h - 1}")
            rows = _gate_rows(units, h, gates)
            old, new = layer[d], new_layer[d]
            new.weight_ih_l0.copy_(old.weight_ih_l0[rows][:, in_cols])
            new.weight_hh_l0.copy_(old.weight_hh_l0[rows][:, units])
            new.bias_ih_l0.copy_(old.bias_ih_l0[rows])
            new.bias_hh_l0.copy_(old.bias_hh_l0[rows])
            out_cols.append(k * h + units)
        in_cols = torch.cat(out_cols)
    small.embedding.weight.copy_(model.embedding.weight)
    small.head.weight.copy_(model.head.weight[:, _head_cols(in_cols, h * len(dirs), cfg.pooling)])
    small.head.bias.copy_(model.head.bias)
    return small


def token_counts(data: Iterable[Encoded], vocab_size: int) -> np.ndarray:
    """How often each token id occurs (within each review's true length) across ``data``."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for enc in data:
        real = np.arange(enc.ids.shape[1])[None, :] < enc.lengths[:, None]
        counts += np.bincount(enc.ids[real].astype(np.int64), minlength=vocab_size)[:vocab_size]
    return counts


def text_token_counts(tok: Tokenizer, texts: Sequence[str], chunk: int = 2000) -> np.ndarray:
    """How often each of ``tok``'s token ids occurs in ``texts`` (every token, no length cap).

    Counts chunk by chunk: an ``Encoded`` of whole reviews would need a dense matrix as wide as the
    longest review (50,000 reviews x 100,000 columns is 20 GB).
    """
    counts = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    for start in range(0, len(texts), chunk):
        ids = [e.ids for e in tok.encode_batch(list(texts[start : start + chunk]), add_special_tokens=False)]
        flat = np.fromiter((i for row in ids for i in row), dtype=np.int64)
        counts += np.bincount(flat, minlength=len(counts))[: len(counts)]
    return counts


def shrink_tokenizer(tok: Tokenizer, counts: np.ndarray, size: int) -> tuple[Tokenizer, np.ndarray]:
    """The ``size`` most frequent tokens (closed under merge parents) as a new BPE tokenizer.

    Returns the tokenizer and ``old_ids``: ``old_ids[new_id]`` is the token's id in ``tok``, the
    row to take from the old embedding. Frequency ties keep the lower (earlier-merged) id.
    """
    spec = json.loads(tok.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise PruneError(f"vocabulary pruning needs a BPE tokenizer, got {model.get('type')!r}")
    vocab: dict[str, int] = model["vocab"]
    if len(counts) != len(vocab):
        raise PruneError(f"counts cover {len(counts)} ids, the tokenizer has {len(vocab)}")
    if not isinstance(size, int) or not 2 < size <= len(vocab):
        raise PruneError(f"vocabulary size must be an integer in 3..{len(vocab)}, got {size!r}")
    token = {i: t for t, i in vocab.items()}
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    parents = {a + b: (a, b) for a, b in reversed(merges)}  # the first (lowest-rank) merge that makes a token

    kept: set[str] = {PAD, UNK}
    for old in np.lexsort((np.arange(len(counts)), -counts)):
        closure, stack = [], [token[int(old)]]
        while stack:  # the token and every merge ancestor not kept yet
            t = stack.pop()
            if t not in kept and t not in closure:
                closure.append(t)
                stack.extend(parents.get(t, ()))
        if len(kept) + len(closure) <= size:
            kept.update(closure)
        if len(kept) == size:
            break
    order = sorted(kept, key=lambda t: vocab[t])  # keeps PAD at 0 and UNK at 1
    model["vocab"] = {t: i for i, t in enumerate(order)}
    model["merges"] = [[a, b] for a, b in merges if a + b in kept and a in kept and b in kept]
    spec["added_tokens"] = [t for t in spec.get("added_tokens", []) if t["content"] in kept]
    for t in spec["added_tokens"]:
        t["id"] = model["vocab"][t["content"]]
    return Tokenizer.from_str(json.dumps(spec)), np.array([vocab[t] for t in order], dtype=np.int64)


@torch.no_grad()
def prune_vocab(model: SentimentRNN, old_ids: np.ndarray) -> SentimentRNN:
    """A copy of ``model`` whose embedding keeps rows ``old_ids`` (in that order), for a shrunk tokenizer."""
    ids = torch.as_tensor(np.asarray(old_ids), dtype=torch.long)
    if ids.dim() != 1 or len(ids) < 3 or int(ids[0]) != PAD_ID or int(ids[1]) != UNK_ID \
            or int(ids.max()) >= model.cfg.vocab_size:
        raise PruneError(f"old_ids must start with {PAD_ID}, {UNK_ID} and index the model's "
                         f"{model.cfg.vocab_size} embedding rows")
    small = SentimentRNN(ModelConfig(**{**model.cfg.to_dict(), "vocab_size": len(ids)})).eval()
    state = {k: v for k, v in model.state_dict().items() if k != "embedding.weight"}
    small.load_state_dict({**state, "embedding.weight": model.embedding.weight[ids]})
    return small


def id_map(old_ids: np.ndarray, teacher_vocab: int) -> np.ndarray:
    """Teacher token id -> pruned-vocabulary id; a dropped token reads as [UNK].

    The same cut as :func:`shrink_tokenizer` made on token ids, for holders of the teacher's ids
    rather than text (a simulated device keeps its reviews tokenized): a dropped token becomes
    [UNK] here, where the shrunk tokenizer would split it into kept pieces.
    """
    old = np.asarray(old_ids, dtype=np.int64)
    if old.ndim != 1 or len(old) < 3 or old[0] != PAD_ID or old[1] != UNK_ID or old.max() >= teacher_vocab:
        raise PruneError(f"old_ids must start with {PAD_ID}, {UNK_ID} and index a {teacher_vocab}-token vocabulary")
    mapping = np.full(teacher_vocab, UNK_ID, dtype=np.int64)
    mapping[old] = np.arange(len(old))
    return mapping


class ReadsTeacherIds(torch.nn.Module):
    """A pruned-vocabulary model fed the teacher's token ids, translated through :func:`id_map`."""

    def __init__(self, model: SentimentRNN, old_ids: np.ndarray, teacher_vocab: int) -> None:
        super().__init__()
        self.model, self.cfg = model, model.cfg
        self.register_buffer("mapping", torch.from_numpy(id_map(old_ids, teacher_vocab)), persistent=False)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.model(self.mapping[ids], lengths)
