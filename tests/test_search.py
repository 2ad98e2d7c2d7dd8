"""Device-aware student search: budgets, the choice rule, and a tiny end-to-end search."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrnn.data.loaders import load_imdb
from fedrnn.data.tokenizer import encode
from fedrnn.devices.memory import ORT_RUNTIME_BYTES, estimate_inference_memory
from fedrnn.devices.profiles import PROFILES
from fedrnn.edge.budgets import LATENCY_P95_MS, Budget, BudgetError, budget_for, resolve_class
from fedrnn.edge.distill import dataset_logits, init_embedding_from
from fedrnn.edge.predict import Predictor
from fedrnn.edge.search import choose, feasible, promotions, search
from fedrnn.edge.search import main as search_main
from fedrnn.edge.trials import Fidelity, SearchData, Space
from fedrnn.model.checkpoint import load_checkpoint
from fedrnn.model.rnn import ModelConfig, SentimentRNN


def test_budgets_follow_the_profiles() -> None:
    zero, pi5 = budget_for(PROFILES["rpi-zero2w"]), budget_for(PROFILES["rpi5"])
    assert resolve_class("rpi-zero-2w") == "rpi-zero2w" and resolve_class("RPI5") == "rpi5"
    with pytest.raises(BudgetError, match="unknown device class 'pi6'; known: rpi-zero2w"):
        resolve_class("pi6")
    assert zero.ram_bytes < pi5.ram_bytes and zero.latency_p95_ms == pi5.latency_p95_ms == LATENCY_P95_MS
    # the same host latency is ~11x longer on the Zero than on the Pi 5 (Geekbench ratio)
    assert zero.device_latency_ms(1.0) / pi5.device_latency_ms(1.0) == pytest.approx(904 / (108 * 289 / 271 / 1.4))
    # phones on 4G get a smaller download budget than a Pi 5 on Wi-Fi
    assert budget_for(PROFILES["phone-low"]).download_bytes < pi5.download_bytes


def test_inference_memory_grows_with_model_and_length() -> None:
    cfg = ModelConfig(vocab_size=4000, embed_dim=32, hidden_size=64, num_layers=1)
    base = estimate_inference_memory(cfg, 128, 100_000, 50_000)
    assert base > ORT_RUNTIME_BYTES + 150_000
    assert estimate_inference_memory(cfg, 256, 100_000, 50_000) > base
    assert estimate_inference_memory(ModelConfig(**{**cfg.to_dict(), "num_layers": 2}), 128, 100_000, 50_000) > base


def _row(acc: float, size: int, p95: float = 1.0, ram: int = 10, down: int = 10) -> dict:
    return {"val_accuracy": acc, "model_bytes": size, "host_p95_ms": p95, "ram_bytes": ram, "download_bytes": down}


def test_choice_respects_every_budget_and_the_one_se_rule() -> None:
    b = Budget("x", relative_speed=0.1, latency_p95_ms=10.0, ram_bytes=100, download_bytes=100)
    rows = [
        _row(0.95, 50, p95=1.5),  # 15 ms on the device: over the latency budget
        _row(0.94, 60, ram=101),  # over RAM
        _row(0.93, 70, down=101),  # over download
        _row(0.90, 40), _row(0.895, 20), _row(0.80, 5),
    ]
    assert [feasible(b, r) for r in rows] == [False, False, False, True, True, True]
    assert choose(rows, b, "max", n_val=1000)["model_bytes"] == 40
    # one SE of 0.90 at n=1000 is 0.0095: 0.895 is within it, 0.80 is not
    assert choose(rows, b, "one-se", n_val=1000)["model_bytes"] == 20
    assert choose(rows, b, "one-se", n_val=100_000)["model_bytes"] == 40
    assert choose(rows[:3], b, "max", n_val=1000) is None


def test_a_model_file_cap_is_one_more_budget() -> None:
    capped = Budget("x", 1.0, 1e6, 2**40, 2**40, model_bytes=100)
    assert feasible(capped, _row(0.9, 100)) and not feasible(capped, _row(0.9, 101))
    assert feasible(Budget("x", 1.0, 1e6, 2**40, 2**40), _row(0.9, 10**9))  # no cap by default
    assert budget_for(PROFILES["rpi4"], 5_000).model_bytes == 5_000


def test_search_command_rejects_an_unknown_class() -> None:
    with pytest.raises(SystemExit, match="unknown device class 'toaster'"):
        search_main(["--device-class", "toaster"])


def test_search_command_names_what_is_wrong_with_an_enqueued_student() -> None:
    student = {"cell": "lstm", "embed_dim": 16, "hidden_size": 64, "num_layers": 1, "vocab_size": 4000,
               "max_len": 256, "prune_ratio": 0.0}
    with pytest.raises(SystemExit, match="hidden_size, wings missing or outside the space"):
        search_main(["--device-class", "rpi4", "--enqueue", json.dumps(student | {"hidden_size": 65, "wings": 2})])


@pytest.mark.slow
@pytest.mark.timeout(1800)  # every trial exports in its own process; minutes on a busy 2-core machine
def test_tiny_search_respects_budgets(tiny_teacher: tuple[Path, dict], data_dir: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    teacher, tok, cfg = load_checkpoint(tiny_teacher[0])
    test = load_imdb("test", data_dir)
    idx = np.random.default_rng(5).permutation(len(test))
    texts = [test.texts[i] for i in idx[:400]]
    logits = dataset_logits([teacher], encode(tok, texts, np.full(400, -1), cfg["max_len"]))
    data = SearchData(
        teacher=teacher, tokenizer=tok, teacher_max_len=cfg["max_len"], transfer_texts=texts, teacher_logits=logits,
        count_texts=texts, val_texts=[test.texts[i] for i in idx[400:500]], val_labels=test.labels[idx[400:500]],
        test_texts=[], test_labels=np.zeros(0),
    )
    space = Space(cell=("lstm",), embed_dim=(8,), hidden_size=(8,), num_layers=(1,), vocab_size=(300, 2000),
                  max_len=(32,), prune_ratio=(0.0, 0.5))
    roomy = Budget("roomy", 1.0, 1e6, 2**40, 2**40)
    # the full 2,000-token tokenizer alone is over this download budget; a 300-token one is under it
    small_only = Budget("small-only", 1.0, 1e6, 2**40, 40_000)
    impossible = Budget("impossible", 1.0, 1e6, 2**40, 1_000)
    result = search(data, [roomy, small_only, impossible], trials=3, space=space,
                    fid=Fidelity(low_steps=4, full_steps=6, batch_size=16, latency_reviews=10), workdir=tmp_path,
                    rule="max", seed=0, log=lambda _: None)
    rows, chosen = result["rows"], result["chosen"]
    assert sum(r["fidelity"] == "low" for r in rows) == 2 * 3 and any(r["fidelity"] == "full" for r in rows)
    for trial in {r["trial"] for r in rows}:  # each trial measured as int8 and as float32, from one export
        pair = sorted((r for r in rows if r["trial"] == trial), key=lambda r: r["int8"])
        assert [r["int8"] for r in pair] == [False, True] and pair[0]["export_dir"] == pair[1]["export_dir"]
        assert pair[1]["model_bytes"] < pair[0]["model_bytes"]
    assert chosen["impossible"] is None
    assert chosen["roomy"]["fidelity"] == "full"
    if chosen["small-only"] is not None:
        assert chosen["small-only"]["download_bytes"] <= 40_000 and chosen["small-only"]["vocab_size"] == 300
    assert any(r["vocab_size"] == 2000 and r["download_bytes"] > 40_000 for r in rows) or \
        all(r["vocab_size"] == 300 for r in rows)
    export = Path(chosen["roomy"]["export_dir"])
    assert json.loads((export / "config.json").read_text())["max_len"] == 32
    assert Predictor(export).predict_proba(["a fine film"]).shape == (1, 2)


def test_student_embedding_starts_from_the_teachers() -> None:
    """A rank-4 teacher embedding projected to 4 dimensions keeps every distance between kept tokens."""
    torch.manual_seed(0)
    teacher = SentimentRNN(ModelConfig(vocab_size=50, embed_dim=16, hidden_size=8, num_layers=1))
    with torch.no_grad():
        teacher.embedding.weight.copy_(torch.randn(50, 4) @ torch.randn(4, 16))
    student = SentimentRNN(ModelConfig(vocab_size=20, embed_dim=4, hidden_size=8, num_layers=1))
    old_ids = np.arange(0, 40, 2)
    init_embedding_from(student, teacher.embedding.weight, old_ids)
    t, s = teacher.embedding.weight[torch.as_tensor(old_ids)].detach(), student.embedding.weight.detach()
    assert torch.allclose(torch.cdist(s[1:], s[1:]), torch.cdist(t[1:], t[1:]), atol=1e-3)
    assert torch.count_nonzero(s[0]) == 0  # padding


def test_promotion_takes_each_class_choice_then_its_best_in_turns() -> None:
    roomy, tight = Budget("roomy", 1.0, 1e6, 2**40, 2**40), Budget("tight", 1.0, 1e6, 2**40, 2**40, model_bytes=50)
    rows = [dict(_row(acc, size), **{name: (acc, size) for name in Space.__annotations__})
            for acc, size in ((0.90, 100), (0.89, 40), (0.80, 30), (0.70, 20), (0.60, 200))]
    picked = [p["cell"] for p in promotions(rows, [roomy, tight], "max", n_val=1000, limit=4)]
    # choices (0.90 for roomy, 0.89 for tight), then rank 1 of each (0.89 again, 0.80), then rank 2 ...
    assert picked == [(0.90, 100), (0.89, 40), (0.80, 30), (0.70, 20)]
    assert len(promotions(rows, [roomy], "max", 1000, limit=2)) == 2
    assert promotions(rows, [Budget("none", 1.0, 1e6, 2**40, 2**40, model_bytes=1)], "max", 1000, 3) == []
