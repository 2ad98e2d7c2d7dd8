"""Distillation into a compact student, ONNX export (float + int8) and the torch-free predictor."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from processes import run_predict

from fedrnn.data.loaders import load_imdb
from fedrnn.data.tokenizer import encode
from fedrnn.edge.distill import agreement, dataset_logits, distill, ensemble_logits, make_student
from fedrnn.edge.export import FLOAT_TOLERANCE, INT8_PROB_TOLERANCE, ExportError, export_student, resolve_checkpoint
from fedrnn.edge.export import main as export_main
from fedrnn.edge.predict import EXPORT_CONFIG, FLOAT_MODEL, INT8_MODEL, TOKENIZER, PredictError, Predictor
from fedrnn.model.checkpoint import load_checkpoint, save_checkpoint
from fedrnn.model.rnn import ModelConfig, SentimentRNN, num_parameters
from fedrnn.model.training import predict_logits

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; on a busy 2-core machine two threads were 60x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tiny_teacher: tuple[Path, dict], data_dir: Path) -> dict:
    """The session's tiny teacher plus IMDB test reviews it never saw: 2,000 transfer, 400 held out."""
    teacher, tok, cfg = load_checkpoint(tiny_teacher[0])
    test = load_imdb("test", data_dir)
    idx = np.random.default_rng(0).permutation(len(test))
    transfer_texts = [test.texts[i] for i in idx[:2000]]
    held = test.subset(idx[2000:2400])
    return {
        "teacher": teacher, "tok": tok, "max_len": cfg["max_len"],
        "transfer": encode(tok, transfer_texts, np.full(2000, -1), cfg["max_len"]),  # unlabelled
        "held_texts": held.texts, "held": encode(tok, held.texts, held.labels, cfg["max_len"]),
    }


@pytest.fixture(scope="module")
def distilled(setup: dict) -> tuple[SentimentRNN, SentimentRNN, dict]:
    """(untrained student, the same student after distillation, stats)."""
    torch.manual_seed(0)
    untrained = make_student(setup["teacher"].cfg, embed_dim=16, hidden_size=16, num_layers=1, cell="lstm")
    student = copy.deepcopy(untrained)
    stats = distill(setup["teacher"], student, setup["transfer"], steps=150, batch_size=32, temperature=2.0,
                    lr=1e-2, rng=np.random.default_rng(0))
    return untrained, student, stats.to_dict()


@pytest.fixture(scope="module")
def exported(distilled: tuple, setup: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Export from a *run* directory whose ``student/`` holds the checkpoint, as the lead's runs do."""
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run / "student", distilled[1], setup["tok"], setup["max_len"])
    out = tmp_path_factory.mktemp("export")
    export_student(run, out)
    return out


def test_make_student_reuses_vocab_and_is_smaller(setup: dict) -> None:
    teacher = setup["teacher"]
    for cell in ("lstm", "gru"):
        student = make_student(teacher.cfg, embed_dim=8, hidden_size=8, num_layers=1, cell=cell)
        assert student.cfg.vocab_size == teacher.cfg.vocab_size and student.cfg.cell == cell
        assert student.cfg.pooling == teacher.cfg.pooling and student.cfg.num_classes == teacher.cfg.num_classes
        assert num_parameters(student) < num_parameters(teacher) / 2


def test_distillation_beats_the_untrained_student_on_held_out_agreement(setup: dict, distilled: tuple) -> None:
    untrained, student, stats = distilled
    teacher_pred = predict_logits(setup["teacher"], setup["held"]).argmax(1)
    majority = max(float(teacher_pred.float().mean()), 1 - float(teacher_pred.float().mean()))
    before = agreement(untrained, setup["teacher"], setup["held"])
    after = agreement(student, setup["teacher"], setup["held"])
    assert after > max(before, majority) + 0.05, (before, after, majority)
    assert stats["loss_end"] < stats["loss_start"]
    assert stats["steps"] == 150 and 140 * 32 < stats["examples"] <= 150 * 32  # a bucket's last batch may be short


def test_ensemble_target_is_the_mean_of_teacher_logits(setup: dict) -> None:
    a = setup["teacher"]
    b = make_student(a.cfg, embed_dim=8, hidden_size=8).eval()
    ids, lengths = torch.from_numpy(setup["held"].ids[:5].astype(np.int64)), torch.from_numpy(setup["held"].lengths[:5])
    with torch.no_grad():
        mean = (a.eval()(ids, lengths) + b(ids, lengths)) / 2
    torch.testing.assert_close(ensemble_logits([a, b], ids, lengths), mean)
    data = setup["held"].subset(np.arange(20))
    torch.testing.assert_close(dataset_logits([a, b], data), (predict_logits(a, data) + predict_logits(b, data)) / 2)


def test_distill_is_reproducible_restores_teacher_mode_and_uses_cached_targets(setup: dict) -> None:
    teacher, transfer = setup["teacher"], setup["transfer"].subset(np.arange(300))
    teacher.train()
    base = make_student(teacher.cfg, embed_dim=8, hidden_size=8, cell="gru")

    def run(**kw: object) -> SentimentRNN:
        s = copy.deepcopy(base)
        distill(teacher, s, transfer, steps=5, batch_size=16, lr=1e-2, rng=np.random.default_rng(1), **kw)
        return s

    same = [run(), run()]
    assert teacher.training  # the caller's train/eval mode survives
    assert all(torch.equal(x, y) for x, y in zip(same[0].state_dict().values(), same[1].state_dict().values(),
                                                 strict=True))
    cached = dataset_logits([teacher], transfer)
    flipped = run(teacher_logits=-cached)  # targets the opposite class everywhere
    assert not torch.equal(flipped.head.weight, same[0].head.weight)
    teacher.eval()


def test_cosine_decay_starts_at_the_full_rate_and_then_changes_the_result(setup: dict) -> None:
    teacher, transfer = setup["teacher"], setup["transfer"].subset(np.arange(300))
    base = make_student(teacher.cfg, embed_dim=8, hidden_size=8)

    def run(steps: int, cosine: bool) -> SentimentRNN:
        s = copy.deepcopy(base)
        distill(teacher, s, transfer, steps=steps, batch_size=16, lr=1e-2, rng=np.random.default_rng(1),
                cosine=cosine)
        return s

    assert torch.equal(run(1, True).head.weight, run(1, False).head.weight)  # step 1 at the full rate
    assert not torch.equal(run(4, True).head.weight, run(4, False).head.weight)  # later steps at a lower one


def test_hard_label_weight_one_ignores_the_teacher(setup: dict) -> None:
    teacher = setup["teacher"]
    labelled = setup["held"].subset(np.arange(200))
    base = make_student(teacher.cfg, embed_dim=8, hidden_size=8)
    cached = dataset_logits([teacher], labelled)
    students = []
    for targets, w in ((cached, 1.0), (-cached, 1.0), (cached, 0.5), (-cached, 0.5)):
        s = copy.deepcopy(base)
        distill(teacher, s, labelled, steps=3, batch_size=16, rng=np.random.default_rng(2), hard_label_weight=w,
                teacher_logits=targets)
        students.append(s.head.weight.detach())
    assert torch.equal(students[0], students[1])  # pure cross-entropy: teacher targets play no part
    assert not torch.equal(students[2], students[3])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps and batch_size"),
        ({"temperature": 0.0}, "temperature and lr"),
        ({"hard_label_weight": 1.5}, "hard_label_weight"),
        ({"teacher_logits": torch.zeros(3, 2)}, r"teacher_logits has shape \(3, 2\)"),
    ],
)
def test_distill_rejects_bad_arguments(setup: dict, kwargs: dict, match: str) -> None:
    student = make_student(setup["teacher"].cfg, embed_dim=8, hidden_size=8)
    args = {"steps": 1, "batch_size": 4, "temperature": 2.0, "lr": 1e-3, "rng": np.random.default_rng(0)} | kwargs
    with pytest.raises(ValueError, match=match):
        distill(setup["teacher"], student, setup["transfer"].subset(np.arange(10)), **args)
    small_vocab = ModelConfig(**{**setup["teacher"].cfg.to_dict(), "vocab_size": 50})
    other = make_student(small_vocab, embed_dim=8, hidden_size=8)
    with pytest.raises(ValueError, match="must share tokenizer"):
        distill(setup["teacher"], other, setup["transfer"].subset(np.arange(10)), steps=1)


def test_export_writes_a_complete_directory_with_float_parity(exported: Path, setup: dict) -> None:
    assert {p.name for p in exported.iterdir()} >= {FLOAT_MODEL, INT8_MODEL, TOKENIZER, EXPORT_CONFIG}
    cfg = json.loads((exported / EXPORT_CONFIG).read_text())
    assert cfg["max_len"] == setup["max_len"] and cfg["labels"] == ["negative", "positive"]
    assert cfg["parity"]["float"]["max_abs_logit_diff"] <= FLOAT_TOLERANCE
    assert cfg["parity"]["int8"]["max_abs_prob_diff"] <= INT8_PROB_TOLERANCE
    assert cfg["bytes"][INT8_MODEL] < cfg["bytes"][FLOAT_MODEL] / 2


def test_int8_weights_fit_the_int16_pair_sums_of_non_vnni_cpus(exported: Path) -> None:
    """uint8 x int8 products are summed in pairs into int16 on AVX2-only CPUs: weights beyond 64 saturate there.

    The parity checks above pass on a VNNI machine whatever the weight range; this one does not depend on the CPU.
    """
    model = onnx.load(str(exported / INT8_MODEL))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    checked = 0
    for node in model.graph.node:
        if node.op_type in ("DynamicQuantizeLSTM", "MatMulInteger"):
            for name in node.input:
                if name in weights and weights[name].dtype == np.int8 and weights[name].size > 1:
                    assert np.abs(weights[name].astype(np.int32)).max() <= 64, (node.op_type, name)
                    checked += 1
    assert checked >= 3  # the LSTM's input and recurrent weights, the head's weight


def test_onnx_float_matches_torch_on_real_reviews(exported: Path, distilled: tuple, setup: dict) -> None:
    student, held = distilled[1], setup["held"]
    ref = predict_logits(student, held).numpy()
    predictor = Predictor(exported, quantized=False)
    for start in (0, 1, 37):  # batch sizes 1, 36 and the rest, each trimmed to its own longest review
        stop = {0: 1, 1: 37, 37: len(held)}[start]
        got = predictor.logits(held.ids[start:stop], held.lengths[start:stop])
        np.testing.assert_allclose(got, ref[start:stop], atol=FLOAT_TOLERANCE, rtol=0)


def test_onnx_int8_agrees_with_torch_on_real_reviews(exported: Path, distilled: tuple, setup: dict) -> None:
    student, held = distilled[1], setup["held"]
    ref = torch.softmax(predict_logits(student, held), 1).numpy()
    got = Predictor(exported, quantized=True).predict_proba(setup["held_texts"])
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= INT8_PROB_TOLERANCE
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.97


def test_export_command_handles_a_bidirectional_gru(setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = ModelConfig(vocab_size=setup["teacher"].cfg.vocab_size, embed_dim=8, hidden_size=8, num_layers=1,
                      bidirectional=True, cell="gru")
    save_checkpoint(tmp_path / "ckpt", SentimentRNN(cfg), setup["tok"], 64)
    export_main([str(tmp_path / "ckpt"), "--out", str(tmp_path / "export")])
    assert "float max |logit diff|" in capsys.readouterr().out
    parity = json.loads((tmp_path / "export" / EXPORT_CONFIG).read_text())["parity"]
    assert parity["float"]["max_abs_logit_diff"] <= FLOAT_TOLERANCE
    probs = Predictor(tmp_path / "export").predict_proba(setup["held_texts"][:5])
    assert probs.shape == (5, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_export_failing_parity_raises_and_leaves_no_loadable_export(
    setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = ModelConfig(vocab_size=setup["teacher"].cfg.vocab_size, embed_dim=8, hidden_size=8, num_layers=1)
    save_checkpoint(tmp_path / "ckpt", SentimentRNN(cfg), setup["tok"], 32)
    monkeypatch.setattr("fedrnn.edge.export.INT8_PROB_TOLERANCE", -1.0)  # no int8 model can pass
    with pytest.raises(ExportError, match="model.int8.onnx: probabilities differ from torch beyond -1.0"):
        export_student(tmp_path / "ckpt", tmp_path / "export")
    with pytest.raises(PredictError, match="config.json does not exist"):
        Predictor(tmp_path / "export")


def test_resolve_checkpoint_names_both_places_it_looked(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"not a checkpoint or run dir .*student/config.json"):
        resolve_checkpoint(tmp_path)


def test_predictor_rejects_a_directory_without_an_export(tmp_path: Path) -> None:
    with pytest.raises(PredictError, match="config.json does not exist"):
        Predictor(tmp_path)
    (tmp_path / EXPORT_CONFIG).write_text(json.dumps({"format": "fedrnn-onnx", "max_len": 0, "labels": ["a"]}))
    with pytest.raises(PredictError, match="max_len must be a positive integer"):
        Predictor(tmp_path)


def test_predict_command_runs_without_torch(exported: Path, setup: dict, tmp_path: Path) -> None:
    texts = setup["held_texts"][:3]
    reviews = tmp_path / "reviews.txt"
    reviews.write_text("\n".join(texts[1:]) + "\n\n")
    proc = run_predict([str(exported), texts[0], "--file", str(reviews)])
    assert proc.returncode == 0, proc.stderr
    assert "TORCH_MODULES []" in proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3
    expected = Predictor(exported).predict_proba(texts)
    for line, text, p in zip(lines, texts, expected, strict=True):
        label, prob, snippet = line.split("\t")
        assert label == ("positive" if p[1] > p[0] else "negative")
        assert abs(float(prob) - p.max()) < 1e-4 and 0.5 <= float(prob) <= 1.0
        assert " ".join(text.split()).startswith(snippet.removesuffix("..."))


def test_predict_command_reports_a_missing_export(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "fedrnn.edge.predict", str(tmp_path), "great film"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0 and "config.json does not exist" in proc.stderr



def _missing_provider() -> str:
    """A provider onnxruntime knows but this build lacks (a CPU build lacks CUDA, TensorRT, CoreML...)."""
    import onnxruntime as ort

    missing = [p for p in ort.get_all_providers() if p not in ort.get_available_providers()]
    if not missing:
        pytest.skip("every provider onnxruntime knows is installed")
    return missing[0]


def test_predictor_falls_back_to_cpu_when_a_provider_is_missing(exported: Path, setup: dict) -> None:
    missing = _missing_provider()
    short = missing.removesuffix("ExecutionProvider").lower()
    with pytest.warns(RuntimeWarning, match=f"{missing} is not available .*falling back to CPUExecutionProvider"):
        fallback = Predictor(exported, provider=short)
    assert fallback.provider == "CPUExecutionProvider" == Predictor(exported, provider="cpu").provider
    texts = setup["held_texts"][:4]
    np.testing.assert_allclose(fallback.predict_proba(texts), Predictor(exported).predict_proba(texts), atol=1e-6)
    with pytest.raises(PredictError, match="unknown execution provider 'warp'; onnxruntime knows .*CUDA"):
        Predictor(exported, provider="warp")


def test_predict_command_reports_the_provider_it_used(exported: Path, capsys: pytest.CaptureFixture) -> None:
    from fedrnn.edge.predict import main as predict_main

    with pytest.warns(RuntimeWarning, match="falling back"):
        predict_main([str(exported), "a wonderful film", "--provider", _missing_provider()])
    captured = capsys.readouterr()
    assert "provider: CPUExecutionProvider" in captured.err and len(captured.out.strip().splitlines()) == 1
