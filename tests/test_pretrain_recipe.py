"""The short-text pretraining recipe's data: sentence spans beside whole reviews, [UNK] token dropout."""

from __future__ import annotations

import numpy as np

from fedrnn.data.tokenizer import PAD_ID, encode, train_tokenizer
from fedrnn.model.pretrain import PretrainConfig, epoch_data, sentence_spans

TEXTS = ["A fine film. The cast shines! I would watch it again.", "Dull. Far too long? Skip it.", "One sentence only"]


def test_spans_are_runs_of_consecutive_sentences_of_their_own_review() -> None:
    spans, source = sentence_spans(TEXTS, 4, 2, np.random.default_rng(0))
    assert len(spans) == 12 and source.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for span, i in zip(spans, source, strict=True):
        assert span and span in TEXTS[i]  # consecutive sentences: a substring of the review
        assert span.count(".") + span.count("!") + span.count("?") <= 2
    assert set(spans[8:]) == {"One sentence only"}


def test_epoch_data_adds_spans_and_drops_tokens_inside_lengths_only() -> None:
    texts = TEXTS * 200
    tok = train_tokenizer(texts, vocab_size=120, min_frequency=1)
    labels = np.tile([1, 0, 1], 200)
    whole = encode(tok, texts, labels, 16)
    cfg = PretrainConfig(spans=2, span_max_len=8, token_dropout=0.2)
    data = epoch_data(cfg, tok, texts, whole, np.random.default_rng(0))
    assert len(data) == 3 * len(texts) and data.ids.shape[1] == 16
    assert data.labels[len(texts):].tolist() == np.repeat(labels, 2).tolist()  # a span keeps its review's label
    assert (data.lengths[len(texts):] <= 8).all()
    inside = np.arange(16)[None, :] < data.lengths[:, None]
    unk = data.ids == tok.token_to_id("[UNK]")
    assert 0.15 < unk[inside].mean() < 0.25 and not unk[~inside].any() and (data.ids[~inside] == PAD_ID).all()
    assert (whole.ids != tok.token_to_id("[UNK]")).all()  # the cached encoding is never modified


def test_previous_recipe_is_whole_reviews_only() -> None:
    old = PretrainConfig.previous()
    assert (old.spans, old.token_dropout, old.train_max_len, old.epochs, old.max_len) == (0, 0.0, 0, 6, 400)
    new = PretrainConfig()
    assert new.spans > 0 and new.train_max_len < new.max_len and new.epochs < old.epochs
