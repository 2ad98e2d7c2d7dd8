"""Model, tokenizer, checkpoint and pretraining."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from invariance import assert_padding_invariant

from fedrnn.data.tokenizer import TokenizerError, encode, load_tokenizer, save_tokenizer, train_tokenizer
from fedrnn.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fedrnn.model.rnn import POOLINGS, ModelConfig, SentimentRNN, num_parameters, set_trainable, trainable_names

SMALL = dict(vocab_size=60, embed_dim=8, hidden_size=6, dropout=0.0)


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_output_never_depends_on_padding(pooling: str, bidirectional: bool, cell: str) -> None:
    torch.manual_seed(0)
    model = SentimentRNN(ModelConfig(**SMALL, pooling=pooling, bidirectional=bidirectional, cell=cell)).eval()
    assert_padding_invariant(model)


def test_transfer_modes_pick_the_right_tensors() -> None:
    model = SentimentRNN(ModelConfig(**SMALL, num_layers=3, bidirectional=True))
    fe = trainable_names(model, "feature-extraction")
    ft = trainable_names(model, "fine-tune")
    full = trainable_names(model, "full")
    assert fe == ["head.weight", "head.bias"]
    assert set(fe) < set(ft) < set(full)
    assert {n.split(".")[1] for n in ft if n.startswith("rnn.")} == {"2"}
    assert len(full) == len(list(model.parameters()))
    set_trainable(model, "fine-tune")
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(ft)
    with pytest.raises(ValueError, match="transfer mode"):
        trainable_names(model, "everything")


@pytest.mark.parametrize("bad", [dict(hidden_size=0), dict(dropout=1.0), dict(pooling="sum"), dict(cell="rnn")])
def test_bad_model_config(bad: dict) -> None:
    with pytest.raises(ValueError, match="model\\."):
        ModelConfig(**{**SMALL, **bad})


def test_tokenizer_roundtrip(tmp_path: Path) -> None:
    texts = ["a great movie, truly great", "a terrible film", "great acting and a terrible plot"] * 20
    tok = train_tokenizer(texts, vocab_size=120)
    save_tokenizer(tok, tmp_path / "t.json")
    again = load_tokenizer(tmp_path / "t.json")
    assert again.encode("great terrible film").ids == tok.encode("great terrible film").ids
    enc = encode(tok, ["", "great"], [0, 1], max_len=4)
    assert enc.lengths.tolist()[0] == 1 and enc.ids.dtype.name == "int32"
    (tmp_path / "bad.json").write_text("{not a tokenizer")
    with pytest.raises(TokenizerError, match="bad.json"):
        load_tokenizer(tmp_path / "bad.json")


def test_tiny_pretraining_beats_chance_and_reloads(tiny_teacher: tuple[Path, dict]) -> None:
    path, metrics = tiny_teacher
    assert metrics["imdb_test_accuracy"] > 0.6
    assert set(metrics["amazon_zero_shot_accuracy"]) == {"books", "dvd", "electronics", "kitchen"}
    model, tok, meta = load_checkpoint(path)
    assert num_parameters(model) == metrics["parameters"]
    assert meta["max_len"] == 128 and tok.get_vocab_size() <= model.cfg.vocab_size


def _checkpoint(tmp_path: Path) -> Path:
    tok = train_tokenizer(["good film", "bad film"] * 10, vocab_size=100)
    model = SentimentRNN(ModelConfig(**{**SMALL, "vocab_size": tok.get_vocab_size()}))
    return save_checkpoint(tmp_path / "ckpt", model, tok, max_len=16)


def test_checkpoint_roundtrip(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path)
    model, _, _ = load_checkpoint(d)
    again, _, _ = load_checkpoint(d)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_corrupt_truncated_and_mismatched_checkpoints(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path)
    weights = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated"):
        load_checkpoint(d)
    (d / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(d)
    (d / "model.safetensors").write_bytes(weights)
    cfg = (d / "config.json").read_text()
    (d / "config.json").write_text(cfg.replace('"hidden_size": 6', '"hidden_size": 7'))
    with pytest.raises(CheckpointError, match="do not match the model config"):
        load_checkpoint(d)
    (d / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_checkpoint(d)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")
