"""Structured pruning: hidden units with their coupled gates, vocabulary rows with the tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from invariance import assert_padding_invariant

from fedrnn.data.loaders import load_imdb
from fedrnn.data.tokenizer import PAD_ID, encode
from fedrnn.edge.distill import dataset_logits, distill
from fedrnn.edge.export import FLOAT_TOLERANCE, INT8_PROB_TOLERANCE, export_student
from fedrnn.edge.predict import EXPORT_CONFIG, Predictor
from fedrnn.edge.prune import (
    GATES,
    PruneError,
    prune_hidden,
    prune_vocab,
    shrink_tokenizer,
    text_token_counts,
    token_counts,
    unit_importance,
)
from fedrnn.model.checkpoint import load_checkpoint, save_checkpoint
from fedrnn.model.rnn import ModelConfig, SentimentRNN, num_parameters
from fedrnn.model.training import predict_logits

SMALL = dict(vocab_size=60, embed_dim=8, hidden_size=10, num_layers=2, dropout=0.0)
SHAPES = [(cell, bi, pool) for cell in ("lstm", "gru") for bi in (False, True) for pool in ("meanmax", "last")]


def _model(cell: str, bidirectional: bool, pooling: str) -> SentimentRNN:
    torch.manual_seed(0)
    cfg = ModelConfig(**SMALL, cell=cell, bidirectional=bidirectional, pooling=pooling)
    return SentimentRNN(cfg).eval()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(2, 60, (4, 9), generator=torch.Generator().manual_seed(1)), torch.tensor([9, 3, 6, 1])


@torch.no_grad()
def _silence(model: SentimentRNN, dead: dict[int, list[int]]) -> None:
    """Zero every outgoing weight of the ``dead`` units (layer -> units, both directions): they feed nothing."""
    cfg = model.cfg
    h, dirs = cfg.hidden_size, (("fwd", "bwd") if cfg.bidirectional else ("fwd",))
    width = h * len(dirs)
    for i, units in dead.items():
        for k, d in enumerate(dirs):
            cols = [k * h + u for u in units]
            model.rnn[i][d].weight_hh_l0[:, units] = 0
            if i + 1 < cfg.num_layers:
                for d2 in dirs:
                    model.rnn[i + 1][d2].weight_ih_l0[:, cols] = 0
            else:
                model.head.weight[:, cols] = 0
                if cfg.pooling == "meanmax":
                    model.head.weight[:, [width + c for c in cols]] = 0


@pytest.mark.parametrize(("cell", "bidirectional", "pooling"), SHAPES)
def test_removing_units_that_feed_nothing_leaves_the_function_unchanged(
    cell: str, bidirectional: bool, pooling: str
) -> None:
    model = _model(cell, bidirectional, pooling)
    dead = {0: [1, 4, 7], 1: [0, 2, 9]}
    _silence(model, dead)
    dirs = ("fwd", "bwd") if bidirectional else ("fwd",)
    keep = [{d: [u for u in range(10) if u not in dead[i]] for d in dirs} for i in range(2)]
    small = prune_hidden(model, 7, keep)
    ids, lengths = _batch()
    torch.testing.assert_close(small(ids, lengths), model(ids, lengths), atol=1e-6, rtol=0)
    gates = GATES[cell]
    assert small.rnn[1]["fwd"].weight_ih_l0.shape == (gates * 7, 7 * len(dirs))
    assert small.head.in_features == 7 * len(dirs) * (2 if pooling == "meanmax" else 1)
    # the importance ranking finds the silenced units too once their incoming weights are small
    with torch.no_grad():
        for i, units in dead.items():
            for d in dirs:
                for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
                    w = getattr(model.rnn[i][d], name).view(gates, 10, -1)
                    w[:, units] *= 1e-3
    ranked = prune_hidden(model, 7)
    torch.testing.assert_close(ranked(ids, lengths), model(ids, lengths), atol=1e-4, rtol=0)


@pytest.mark.parametrize(("cell", "bidirectional", "pooling"), SHAPES)
def test_pruned_models_stay_padding_invariant(cell: str, bidirectional: bool, pooling: str) -> None:
    small = prune_hidden(_model(cell, bidirectional, pooling), 4)
    assert small.cfg.hidden_size == 4
    assert_padding_invariant(small)
    assert_padding_invariant(prune_vocab(small, np.array([0, 1, *range(20, 40)])))


def test_importance_is_per_layer_and_direction() -> None:
    scores = unit_importance(_model("lstm", True, "meanmax"))
    assert len(scores) == 2 and all(set(s) == {"fwd", "bwd"} and s["fwd"].shape == (10,) for s in scores)


def test_prune_hidden_rejects_bad_requests() -> None:
    model = _model("lstm", False, "meanmax")
    for size in (0, 11, 2.5):
        with pytest.raises(PruneError, match="hidden_size must be an integer in 1..10"):
            prune_hidden(model, size)
    with pytest.raises(PruneError, match="layer 0 fwd: keep needs 2 distinct"):
        prune_hidden(model, 2, [{"fwd": [3, 3]}, {"fwd": [0, 1]}])
    with pytest.raises(PruneError, match="DP model"):
        prune_hidden(SentimentRNN(ModelConfig(**SMALL), dp=True), 5)


@pytest.fixture(scope="module")
def teacher_and_text(tiny_teacher: tuple[Path, dict], data_dir: Path) -> dict:
    teacher, tok, cfg = load_checkpoint(tiny_teacher[0])
    test = load_imdb("test", data_dir)
    idx = np.random.default_rng(3).permutation(len(test))[:1200]
    return {"teacher": teacher, "tok": tok, "max_len": cfg["max_len"], "texts": [test.texts[i] for i in idx]}


def test_text_token_counts_match_the_encoded_counts_without_a_dense_matrix(teacher_and_text: dict) -> None:
    tok, texts = teacher_and_text["tok"], teacher_and_text["texts"][:300]
    dense = token_counts([encode(tok, texts, np.zeros(len(texts)), 10_000)], tok.get_vocab_size())
    assert dense.sum() > 0
    np.testing.assert_array_equal(text_token_counts(tok, texts, chunk=7), dense)


def test_shrunk_tokenizer_keeps_the_frequent_tokens_and_splits_the_rest(teacher_and_text: dict) -> None:
    tok, texts = teacher_and_text["tok"], teacher_and_text["texts"]
    enc = encode(tok, texts, np.zeros(len(texts)), 10_000)
    counts = token_counts([enc], tok.get_vocab_size())
    small, old_ids = shrink_tokenizer(tok, counts, 500)
    assert small.get_vocab_size() == 500 == len(old_ids) and list(old_ids[:2]) == [PAD_ID, 1]
    assert len(set(old_ids.tolist())) == 500
    # the most frequent tokens are all kept, under the same strings
    top = np.argsort(-counts, kind="stable")[:200]
    assert set(top.tolist()) <= set(old_ids.tolist())
    old_vocab = {i: t for t, i in tok.get_vocab().items()}
    assert all(small.token_to_id(old_vocab[int(o)]) == n for n, o in enumerate(old_ids))
    # a text made of kept tokens reads the same; any other splits into kept pieces, hardly ever UNK
    new = encode(small, texts, np.zeros(len(texts)), 10_000)
    unk = (new.ids == 1).sum() / new.lengths.sum()
    assert unk <= (enc.ids == 1).sum() / enc.lengths.sum() + 0.01
    assert new.lengths.sum() > enc.lengths.sum()  # dropped tokens became several kept ones
    word = old_vocab[int(top[5])]
    assert [int(old_ids[i]) for i in small.encode(word, add_special_tokens=False).ids] == \
        tok.encode(word, add_special_tokens=False).ids
    with pytest.raises(PruneError, match="vocabulary size must be an integer"):
        shrink_tokenizer(tok, counts, 2)
    with pytest.raises(PruneError, match="counts cover 3 ids"):
        shrink_tokenizer(tok, counts[:3], 100)


def test_vocab_pruning_maps_rows_exactly(teacher_and_text: dict) -> None:
    teacher = teacher_and_text["teacher"]
    old_ids = np.array([0, 1, *np.random.default_rng(0).choice(np.arange(2, 2000), 300, replace=False)])
    small = prune_vocab(teacher, old_ids)
    new = torch.randint(1, 302, (3, 11), generator=torch.Generator().manual_seed(2))
    lengths = torch.tensor([11, 4, 7])
    with torch.no_grad():
        torch.testing.assert_close(small(new, lengths), teacher(torch.from_numpy(old_ids)[new], lengths))
    with pytest.raises(PruneError, match="must start with 0, 1"):
        prune_vocab(teacher, np.array([1, 0, 5]))


def test_pruned_and_distilled_student_exports_with_parity(teacher_and_text: dict, tmp_path: Path) -> None:
    """Prune hidden units and vocabulary, fine-tune by distillation from cached targets, export, predict."""
    teacher, tok, max_len, texts = (teacher_and_text[k] for k in ("teacher", "tok", "max_len", "texts"))
    torch.set_num_threads(1)
    transfer = encode(tok, texts, np.full(len(texts), -1), max_len)
    targets = dataset_logits([teacher], transfer)
    small_tok, old_ids = shrink_tokenizer(tok, token_counts([transfer], tok.get_vocab_size()), 600)
    student = prune_vocab(prune_hidden(teacher, 12), old_ids)
    assert num_parameters(student) < num_parameters(teacher) / 2
    small_transfer = encode(small_tok, texts, np.full(len(texts), -1), max_len)
    held = small_transfer.subset(np.arange(1000, 1200))
    before = float((predict_logits(student, held).argmax(1) == targets[1000:].argmax(1)).float().mean())
    stats = distill(teacher, student, small_transfer.subset(np.arange(1000)), steps=60, batch_size=32, lr=5e-3,
                    rng=np.random.default_rng(0), teacher_logits=targets[:1000])
    after = float((predict_logits(student, held).argmax(1) == targets[1000:].argmax(1)).float().mean())
    assert stats.loss_end < stats.loss_start and after >= before - 0.02, (before, after)
    save_checkpoint(tmp_path / "ckpt", student, small_tok, max_len)
    export_student(tmp_path / "ckpt", tmp_path / "export")
    cfg = json.loads((tmp_path / "export" / EXPORT_CONFIG).read_text())
    assert cfg["parity"]["float"]["max_abs_logit_diff"] <= FLOAT_TOLERANCE
    assert cfg["parity"]["int8"]["max_abs_prob_diff"] <= INT8_PROB_TOLERANCE
    assert cfg["model"]["vocab_size"] == 600
    ref = torch.softmax(predict_logits(student, encode(small_tok, texts[1000:1020], np.zeros(20), max_len)), 1)
    got = Predictor(tmp_path / "export", quantized=False).predict_proba(texts[1000:1020])
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-4)
