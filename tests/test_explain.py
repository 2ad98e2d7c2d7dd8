"""Explanations: torch-free occlusion on the device (predict --explain), Captum on the server, faithfulness."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from processes import run_predict
from safetensors.torch import save_file

from fedrnn.data.loaders import load_imdb
from fedrnn.data.reviews import clean_text
from fedrnn.data.tokenizer import PAD_ID, encode
from fedrnn.edge.explain import Explanation, explain, mask_words, occlusion, scatter, segment, to_html, to_rich
from fedrnn.edge.predict import Predictor
from fedrnn.explain.__main__ import main as explain_main
from fedrnn.explain.attribution import TorchModel, integrated_gradients, load_model, random_scores
from fedrnn.explain.attribution import occlusion as captum_occlusion
from fedrnn.explain.faithfulness import FRACTIONS, aopc, counts, curves
from fedrnn.model.checkpoint import CheckpointError, load_checkpoint, write_json

REVIEW = "A gripping, beautifully shot film. The acting was wonderful but the plot was dull and boring at times."


@pytest.fixture(scope="module")
def teacher(tiny_teacher: tuple[Path, dict]) -> TorchModel:
    model, tok, cfg = load_checkpoint(tiny_teacher[0])
    return TorchModel(model, tok, cfg["max_len"])


@pytest.fixture(scope="module")
def exported(tiny_teacher: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete export directory of the tiny teacher itself (no distillation: seconds, not a minute).

    The float model must pass the export's parity check (1e-4 on logits) as usual; the int8 bound
    is lifted, because this 2-layer, 24-unit model is not what int8 is meant for and no test here
    reads its int8 numbers (the --explain command only has to run on it).
    """
    out = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("fedrnn.edge.export.INT8_PROB_TOLERANCE", 1.0)
        from fedrnn.edge.export import export_student

        export_student(tiny_teacher[0], out)
    return out


@pytest.fixture(scope="module")
def reviews(data_dir: Path) -> list[str]:
    """50 IMDB test reviews the tiny teacher never trained on (it saw 3,000 train reviews)."""
    test = load_imdb("test", data_dir)
    return [test.texts[i] for i in np.random.default_rng(1).permutation(len(test))[:50]]


def test_segment_maps_every_kept_token_to_its_word_and_matches_encode(teacher: TorchModel) -> None:
    text = "Un-be-lievable!!  <br />Worst   film; ever..."
    seg = segment(teacher.tokenizer, text, teacher.max_len)
    assert seg.text == clean_text(text) and seg.words == seg.text.split()
    enc = encode(teacher.tokenizer, [seg.text], np.zeros(1), teacher.max_len)
    assert seg.ids.tolist() == enc.ids[0, : enc.lengths[0]].tolist()  # exactly what the model reads in training
    offsets = teacher.tokenizer.encode(seg.text, add_special_tokens=False).offsets
    for (start, _), w in zip(offsets, seg.token_word, strict=True):
        a, b = seg.spans[w]
        assert a <= start < b  # each token starts inside its word
    assert seg.visible.tolist() == list(range(len(seg.words)))


def test_words_beyond_the_window_get_no_score(teacher: TorchModel) -> None:
    text = " ".join(f"word{i}" for i in range(300)) + " great"
    seg = segment(teacher.tokenizer, text, 16)
    assert len(seg.ids) == 16 and seg.visible[-1] == len(seg.words) - 1 and seg.visible[0] > 0
    e = explain(_with_max_len(teacher, 16), text)
    assert np.isnan(e.scores[: seg.visible[0]]).all() and np.isfinite(e.scores[seg.visible]).all()
    assert 'class="unseen">word0</span>' in to_html([e])


def test_mask_words_sets_exactly_the_chosen_words_to_padding(teacher: TorchModel) -> None:
    seg = segment(teacher.tokenizer, REVIEW, teacher.max_len)
    masks = np.zeros((2, len(seg.visible)), dtype=bool)
    masks[1, [0, 3]] = True
    ids, lengths = mask_words(seg, masks)
    assert (ids[0] == seg.ids).all() and (lengths == len(seg.ids)).all()
    hit = np.isin(seg.token_word, [0, 3])
    assert (ids[1, hit] == PAD_ID).all() and (ids[1, ~hit] == seg.ids[~hit]).all()
    with pytest.raises(ValueError, match="masks must have shape"):
        mask_words(seg, np.zeros((1, 2), dtype=bool))


def test_empty_review_is_classified_with_nothing_to_explain(teacher: TorchModel) -> None:
    e = explain(teacher, "   ")
    assert e.seg.words == [] and len(e.scores) == 0 and np.isclose(e.probs.sum(), 1)
    assert "for positive:     none" in str(to_rich(e)) or "for negative:     none" in str(to_rich(e))


def test_onnx_occlusion_agrees_with_captum_and_torch_on_the_float_model(
    exported: Path, teacher: TorchModel, reviews: list[str]
) -> None:
    """The device computation (onnxruntime, one batch) against Captum's FeatureAblation on the torch model."""
    onnx = Predictor(exported, quantized=False)
    for text in [REVIEW, *reviews[:5]]:
        seg = segment(onnx.tokenizer, text, onnx.max_len)
        probs, k, on_device = occlusion(onnx.probs, seg)
        np.testing.assert_allclose(probs, teacher.probs(seg.ids[None], np.array([len(seg.ids)]))[0], atol=1e-5)
        np.testing.assert_allclose(on_device, captum_occlusion(teacher, seg, k), atol=1e-5)
        np.testing.assert_allclose(on_device, occlusion(teacher.probs, seg, k)[2], atol=1e-5)
        assert np.abs(on_device).max() > 1e-3  # words do matter to this model: the check compares something


def test_masking_top_words_hurts_more_than_masking_random_words(exported: Path, reviews: list[str]) -> None:
    """Over 50 real reviews, deleting the top 10% of words by occlusion lowers p(label) more than random 10%."""
    onnx = Predictor(exported, quantized=False)
    rng = np.random.default_rng(0)
    top_drop, random_drop = [], []
    for text in reviews:
        e = explain(onnx, text)
        scores = e.scores[e.seg.visible]
        top = curves(onnx.probs, e.seg, scores, e.target, (0.0, 0.1))[0]
        rand = curves(onnx.probs, e.seg, random_scores(e.seg, rng), e.target, (0.0, 0.1))[0]
        assert top[0] == pytest.approx(e.probs[e.target], abs=1e-6)
        top_drop.append(top[0] - top[1])
        random_drop.append(rand[0] - rand[1])
    assert np.mean(top_drop) > np.mean(random_drop), (np.mean(top_drop), np.mean(random_drop))


def test_integrated_gradients_are_complete_and_rank_like_occlusion(teacher: TorchModel) -> None:
    seg = segment(teacher.tokenizer, REVIEW, teacher.max_len)
    probs, k, occ = occlusion(teacher.probs, seg)
    ig = integrated_gradients(teacher, seg, k, n_steps=64)
    empty = teacher.probs(np.full((1, len(seg.ids)), PAD_ID), np.array([len(seg.ids)]))[0, k]
    assert ig.sum() == pytest.approx(probs[k] - empty, abs=0.02)  # completeness, up to the integration error
    assert np.corrcoef(ig, occ)[0, 1] > 0.3


def test_faithfulness_curves_and_aopc(teacher: TorchModel) -> None:
    seg = segment(teacher.tokenizer, REVIEW, teacher.max_len)
    n = len(seg.visible)
    assert counts(n).tolist() == [0, 1, 1, 2, 4, 9] and n == 18
    probs, k, occ = occlusion(teacher.probs, seg)
    deletion, insertion = curves(teacher.probs, seg, occ, k)
    assert deletion[0] == pytest.approx(probs[k], abs=1e-6) and len(insertion) == len(FRACTIONS)
    nothing = teacher.probs(*mask_words(seg, np.ones((1, n), dtype=bool)))[0, k]
    assert insertion[0] == pytest.approx(nothing, abs=1e-6)
    worst = curves(teacher.probs, seg, -occ, k)  # the reversed ranking deletes the least useful words first
    assert aopc(*worst)["deletion_aopc"] < aopc(deletion, insertion)["deletion_aopc"]
    assert aopc(np.array([0.9, 0.5, 0.1]), np.array([0.2, 0.4, 0.8])) == pytest.approx(
        {"deletion_aopc": 0.6, "insertion_aopc": 0.4})
    with pytest.raises(ValueError, match="3 scores for 18 visible words"):
        curves(teacher.probs, seg, occ[:3], k)


def test_rendering_colours_by_class_and_escapes_html(teacher: TorchModel) -> None:
    seg = segment(teacher.tokenizer, "<b>great</b> & awful", teacher.max_len)
    e = Explanation(seg, ("negative", "positive"), np.array([0.2, 0.8]), 1, scatter(seg, np.array([0.5, 0.0, -0.25])))
    assert e.top(5) == ([("<b>great</b>", 0.5)], [("awful", -0.25)])
    assert e.rgb(0) == ((44, 160, 44), 1.0) and e.rgb(2) == ((214, 39, 40), 0.5) and e.rgb(1) is None
    page = to_html([e])
    assert "&lt;b&gt;great&lt;/b&gt;" in page and "<b>great</b>" not in page.split("<body>")[1].replace(
        "<b>for", "").replace("<b>against", "")
    assert 'title="+0.5000"' in page and 'title="-0.2500"' in page
    text = to_rich(e)
    assert "for positive:     <b>great</b> (+0.500)" in str(text) and "against positive: awful (-0.250)" in str(text)


def test_predict_explain_and_html_run_without_torch(exported: Path, tmp_path: Path) -> None:
    page = tmp_path / "out.html"
    proc = run_predict([str(exported), REVIEW, "Dull.", "--explain", "--html", str(page), "--top", "3"])
    assert proc.returncode == 0, proc.stderr
    assert "TORCH_MODULES []" in proc.stderr
    out = proc.stdout
    assert out.count("(occlusion;") == 2 and "review 2" in out and "for " in out and "against " in out
    int8 = Predictor(exported)
    e = explain(int8, REVIEW)
    assert f"{e.labels[e.target]} {e.probs[e.target]:.4f}" in out
    pro, _ = e.top(3)
    assert f"{pro[0][0]} ({pro[0][1]:+.3f})" in out
    html = page.read_text()
    assert html.count("<section>") == 2 and ">gripping,</span>" in html


def test_explain_command_single_html_and_batch(tiny_teacher: tuple[Path, dict], tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    page = tmp_path / "p.html"
    explain_main([str(tiny_teacher[0]), REVIEW, "--html", str(page)])
    out = capsys.readouterr().out
    assert "(occlusion;" in out and "(integrated-gradients;" in out and page.read_text().count("<section>") == 2
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in [("great movie", 1), (REVIEW, 0)]))
    result = tmp_path / "out.jsonl"
    explain_main([str(tiny_teacher[0]), "--data", str(data), "--out", str(result), "--method", "occlusion"])
    rows = [json.loads(line) for line in result.read_text().splitlines()]
    assert [r["gold"] for r in rows] == [1, 0] and rows[0]["words"] == ["great", "movie"]
    assert set(rows[1]["scores"]) == {"occlusion"} and len(rows[1]["scores"]["occlusion"]) == len(REVIEW.split())
    assert abs(sum(rows[0]["probs"]) - 1) < 1e-4


def test_explain_command_reads_a_run_directory_and_names_bad_inputs(
    tiny_teacher: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    write_json(run / "config.json", {"run": {"teacher": str(tiny_teacher[0])}})
    model, _, _ = load_checkpoint(tiny_teacher[0])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["head.bias"] += torch.tensor([3.0, -3.0])  # the "fine-tuned" final round: now leans negative
    save_file(state, str(run / "checkpoints" / "round_002.safetensors"))
    save_file(model.state_dict(), str(run / "checkpoints" / "round_001.safetensors"))
    m = load_model(run)
    assert torch.equal(m.model.head.bias, state["head.bias"])  # the last round, not the first
    with pytest.raises(CheckpointError, match="nor a run directory"):
        load_model(tmp_path)
    with pytest.raises(SystemExit, match="nor a run directory"):
        explain_main([str(tmp_path), "great"])
    with pytest.raises(SystemExit, match=r"data file .*missing.txt does not exist"):
        explain_main([str(tiny_teacher[0]), "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")])


def _with_max_len(m: TorchModel, max_len: int) -> TorchModel:
    return TorchModel(m.model, m.tokenizer, max_len, m.labels)
