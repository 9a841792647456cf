"""Reports: JSON, a Markdown table with one column per model, and the PNG plots."""

import json

import pytest

from polyclip.eval import runner
from polyclip.eval.data import read_captions, read_image_folder
from polyclip.eval.features import EncodeConfig
from polyclip.eval.report import EvalReport, ModelResult, write_report
from test_eval_support import colour_folder, fake_triple

RUN = runner.RunConfig(encode=EncodeConfig(batch_size=8, num_workers=0))


def test_markdown_table_has_one_column_per_model():
    report = EvalReport(
        "demo",
        "data",
        {},
        [ModelResult("a", {"accuracy": 0.5, "median": 3}), ModelResult("b|c", {"accuracy": float("nan")})],
        ["a note"],
    )
    lines = report.markdown().splitlines()
    assert lines[2] == "| metric | a | b\\|c |"
    assert lines[4] == "| accuracy | 0.5000 | nan |"
    assert lines[5] == "| median | 3 | - |"
    assert lines[-1] == "- a note"


def test_zero_shot_report_files(tmp_path):
    pytest.importorskip("matplotlib")
    data = read_image_folder(colour_folder(tmp_path / "data", ["red", "green", "blue"], per_class=2))
    models = [("clip-a", *fake_triple()), ("clip/b", *fake_triple(seed=5))]
    report = runner.run_zero_shot(models, data, runner.ZeroShotConfig(templates="simple"), RUN)
    written = write_report(report, tmp_path / "out")
    payload = json.loads(written["json"].read_text())
    assert [r["model"] for r in payload["results"]] == ["clip-a", "clip/b"]
    assert payload["results"][0]["metrics"]["accuracy"] == 1.0
    assert payload["config"]["templates"] == ["a photo of a {}."]
    assert "| metric | clip-a | clip/b |" in written["markdown"].read_text()
    for name in ("confusion_clip-a.png", "confusion_clip_b.png", "per_class_f1.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_retrieval_report_end_to_end(tmp_path):
    pytest.importorskip("matplotlib")
    colour_folder(tmp_path / "img", ["red", "green", "blue"], per_class=1)
    rows = ["image,caption"]
    for colour in ("red", "green", "blue"):
        rows += [f"img/{colour}/0.png,a {colour} square", f"img/{colour}/0.png,something {colour}"]
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "img" / "broken.png").write_bytes(b"junk")
    (tmp_path / "captions.csv").write_text(
        (tmp_path / "captions.csv").read_text() + "img/broken.png,a red mess\n"
    )
    data = read_captions(tmp_path / "captions.csv")
    config = runner.RetrievalConfig(recall_ks=(1, 2), precision_ks=(2,))
    report = runner.run_retrieval([fake_triple()], data, config, RUN)
    metrics = report.results[0].metrics
    assert metrics["i2t_R@1"] == 1.0 and metrics["t2i_R@1"] == 1.0 and metrics["i2t_P@2"] == 1.0
    assert report.results[0].details == {"num_images": 3, "num_captions": 6}  # the broken image left
    assert any("unreadable" in note for note in report.notes)
    written = write_report(report, tmp_path / "out")
    assert written["recall_at_k"].exists()
    assert "i2t_R@1" in written["markdown"].read_text()


def test_report_without_plots_needs_no_matplotlib(tmp_path):
    report = EvalReport("demo", "data", {}, [ModelResult("a", {"x": 1.0})])
    written = write_report(report, tmp_path / "out", plots=False)
    assert set(written) == {"json", "markdown"}
