"""One student per device class (``[distill] per_class``): shapes from the search, cut vocabularies, end to end.

The end-to-end run is a real Flower simulation on Ray (tiny teacher, real data) with a fleet of two
device classes: the Pi Zero 2 W gets an int8 student with a 300-token vocabulary (the search's
choice, read from a ``summary.json`` as ``python -m fedrnn.edge.search`` writes it), the Pi 5 the
section's own student over the teacher's vocabulary; each device is sent its class's student and
reports its accuracy on its own held-out reviews.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from processes import simulate_run

from fedrnn.config import ConfigError, DistillSection, load_config
from fedrnn.data.tokenizer import Encoded
from fedrnn.edge.prune import PruneError, ReadsTeacherIds, id_map, prune_vocab
from fedrnn.federation.messages import VOCAB_IDS
from fedrnn.federation.rundir import RunDir
from fedrnn.federation.wire import record_nbytes, to_record
from fedrnn.model.checkpoint import load_checkpoint
from fedrnn.model.rnn import ModelConfig, SentimentRNN
from fedrnn.model.training import predict_logits
from fedrnn.plugins.distill import StudentSpec, student_specs

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 420
ZERO = {"device_class": "rpi-zero2w", "chosen": {"cell": "gru", "embed_dim": 16, "final_hidden": 12, "num_layers": 1,
                                                 "vocab_size": 300, "int8": True}}


def write_summary(path: Path) -> Path:
    path.write_text(json.dumps({"classes": [ZERO, {"device_class": "rpi4", "chosen": None}]}))
    return path


def test_specs_come_from_the_search_summary(tmp_path: Path) -> None:
    cfg = DistillSection(enabled=True, per_class=True, class_students=str(write_summary(tmp_path / "s.json")))
    specs = student_specs(cfg, ["rpi-zero2w", "rpi4", "rpi5"])
    assert specs["rpi-zero2w"] == StudentSpec("gru", 16, 12, 1, 300, True)
    own = StudentSpec(cfg.cell, cfg.embed_dim, cfg.hidden_size, cfg.num_layers)
    assert specs["rpi4"] == own and specs["rpi5"] == own  # nothing found / not searched: the section's size
    assert student_specs(DistillSection(enabled=True), []) == {"all": own}


def test_bad_summary_and_missing_fleet_are_named(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    cfg = DistillSection(enabled=True, per_class=True, class_students=str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="distill.class_students"):
        student_specs(cfg, ["rpi4"])
    with pytest.raises(ConfigError, match=r"distill\.per_class"):
        load_config(None, {"distill": {"enabled": True, "per_class": True}})


def test_reading_teacher_ids_equals_the_cut_model_on_its_own_ids() -> None:
    """A kept token reads the same row; a dropped one reads [UNK]; padding stays padding."""
    torch.manual_seed(0)
    big = SentimentRNN(ModelConfig(vocab_size=50, embed_dim=8, hidden_size=8, num_layers=1)).eval()
    old_ids = np.array([0, 1, 5, 7, 9, 20])
    small = prune_vocab(big, old_ids)
    mapping = id_map(old_ids, 50)
    assert mapping[7] == 3 and mapping[8] == 1 and mapping[0] == 0
    ids = np.array([[5, 7, 8, 20, 0], [9, 9, 30, 0, 0]])
    data = Encoded(ids, np.array([4, 3]), np.array([0, 1]))
    direct = predict_logits(small, Encoded(mapping[ids], data.lengths, data.labels))
    assert torch.allclose(predict_logits(ReadsTeacherIds(small, old_ids, 50), data), direct)
    with pytest.raises(PruneError, match="old_ids"):
        id_map(np.array([1, 0, 3]), 50)


@pytest.fixture(scope="module")
def class_run(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: tuple[Path, dict]) -> Path:
    tmp = tmp_path_factory.mktemp("classes")
    summary = write_summary(tmp / "summary.json")
    config = tmp / "classes.toml"
    config.write_text((ROOT / "configs" / "tiny.toml").read_text() + f"""
[devices]
enabled = true
mix = {{ "rpi-zero2w" = 0.5, "rpi5" = 0.5 }}
availability = "always"
host_samples_per_s = 200.0

[distill]
enabled = true
steps = 20
batch_size = 32
transfer_pool = 1000
transfer_examples = 600
embed_dim = 16
hidden_size = 16
per_class = true
class_students = "{summary}"
""")
    return simulate_run(config, tiny_teacher[0], tmp / "run", tmp / "cache", TIMEOUT)


def test_each_class_gets_its_own_student(class_run: Path) -> None:
    rows = RunDir(class_run).read_metrics()[1:]
    assert len(rows) == 2
    served = set()
    kept_ids = record_nbytes(to_record({VOCAB_IDS: np.zeros(300, np.uint16)}))  # travel with the cut student
    for r in rows:
        by_class: dict[str, int] = {}
        for c in r["device_clients"].values():
            if c["status"] in ("ok", "partial"):
                by_class[c["class"]] = by_class.get(c["class"], 0) + 1
        shipped = 0
        for cls, vocab_bytes in (("rpi-zero2w", kept_ids), ("rpi5", 0)):
            n = by_class.get(cls, 0)
            if n:  # each device of the class got its class's student and reported on its own data
                served.add(cls)
                assert r[f"student_device_clients/{cls}"] == n
                assert 0 <= r[f"student_device_accuracy/{cls}"] <= 1
                assert r[f"student_bytes_shipped/{cls}"] == n * (r[f"student_int8_bytes/{cls}"] + vocab_bytes)
                shipped += r[f"student_bytes_shipped/{cls}"]
            assert 0 <= r[f"student_int8_target_accuracy/{cls}"] <= 1
        assert r["student_bytes_shipped"] == r["bytes_down_extra"] == shipped
        # the cut-vocabulary GRU is far smaller than the section's default student over the whole vocabulary
        assert r["student_int8_bytes/rpi-zero2w"] * 3 < r["student_int8_bytes/rpi5"]
    assert served == {"rpi-zero2w", "rpi5"}
    zero, tok, _ = load_checkpoint(class_run / "student" / "rpi-zero2w")
    assert zero.cfg.cell == "gru" and zero.cfg.hidden_size == 12 and zero.cfg.vocab_size == 300
    assert tok.get_vocab_size() == 300  # the shrunk tokenizer travels with the export
    pi5, _, _ = load_checkpoint(class_run / "student" / "rpi5")
    assert pi5.cfg.hidden_size == 16
    state = {k: v.numpy() for k, v in zero.state_dict().items()}
    assert record_nbytes(to_record(state)) == rows[-1]["student_fp32_bytes/rpi-zero2w"]
