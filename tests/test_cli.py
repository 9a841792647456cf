"""The core commands as a user runs them: models, info, classify, embed (with bad files and resume)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image
from typer.testing import CliRunner

from polyclip.cli import app

runner = CliRunner()


def _images(folder, count=5):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (40 + i, 30), (40 * i, 100, 200 - 30 * i)).save(folder / f"img{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return folder


def test_models_lists_the_registry():
    result = runner.invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    entries = json.loads(result.output)
    assert entries["plip"]["hub_id"] == "vinid/plip"
    assert entries["bioclip"]["format"] == "open_clip"


def test_info_describes_a_checkpoint(tiny_hf_clip_dir):
    result = runner.invoke(app, ["info", str(tiny_hf_clip_dir), "--json"])
    assert result.exit_code == 0, result.output
    details = json.loads(result.output)
    assert details["format"] == "hf" and details["model"]["vision"]["patch_size"] == 8
    assert details["parameters"] > 0
    table = runner.invoke(app, ["info", str(tiny_hf_clip_dir)])
    assert table.exit_code == 0 and "ViT 64w x 2L" in table.output


def test_classify_prints_probabilities_and_skips_bad_images(tiny_hf_clip_dir, tmp_path):
    folder = _images(tmp_path / "imgs", 2)
    result = runner.invoke(
        app,
        [
            "classify",
            str(folder / "img0.png"),
            str(folder / "broken.jpg"),
            "--labels",
            "red",
            "--labels",
            "blue",
            "--labels",
            "green",
            "--model",
            str(tiny_hf_clip_dir),
            "--json",
            "--top-k",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    ranking = out[str(folder / "img0.png")]
    assert len(ranking) == 2 and {label for label, _ in ranking} <= {"red", "blue", "green"}
    assert "broken.jpg" in out[str(folder / "broken.jpg")]


def test_embed_images_to_parquet_resumes_and_lists_failures(tiny_hf_clip_dir, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    folder = _images(tmp_path / "imgs", 5)
    out = tmp_path / "emb.parquet"
    # a previous run that was killed after writing one part: the rerun keeps it and adds the rest
    from polyclip.embed_store import _write_part

    parts = tmp_path / "emb.parquet.parts"
    parts.mkdir()
    (parts / "manifest.json").write_text(json.dumps({"model": str(tiny_hf_clip_dir), "key": "path"}))
    import torch

    _write_part(parts, 0, "path", [str(folder / "img0.png")], torch.full((1, 32), 7.0))
    result = runner.invoke(
        app, ["embed", str(folder), "--model", str(tiny_hf_clip_dir), "--out", str(out), "--batch-size", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "skipped 1 unreadable" in result.output and "broken.jpg" in result.output
    table = pq.read_table(out)
    paths = table.column("path").to_pylist()
    assert sorted(paths) == sorted(
        str(folder / f"img{i}.png") for i in range(5)
    )  # nothing lost or duplicated
    vectors = dict(zip(paths, table.column("embedding").to_pylist()))
    assert vectors[str(folder / "img0.png")][0] == 7.0  # the resumed part was kept, not recomputed
    assert not parts.exists()


def test_embed_text_file(tiny_hf_clip_dir, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    texts = tmp_path / "texts.txt"
    texts.write_text("a red square\n\na blue circle\n")
    out = tmp_path / "text.parquet"
    result = runner.invoke(
        app, ["embed", "--text", str(texts), "--model", str(tiny_hf_clip_dir), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.column("text").to_pylist() == ["a red square", "a blue circle"]


def test_user_errors_are_one_line_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "polyclip", "info", str(tmp_path / "missing")], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "error:" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "empty").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "polyclip", "info", str(tmp_path / "empty")], capture_output=True, text=True
    )
    assert result.returncode == 2 and "not a checkpoint folder" in result.stderr
