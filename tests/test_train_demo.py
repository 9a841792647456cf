"""The offline demo: output keys and a saved model on a few steps; real learning in a slow test."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import polyclip
from polyclip.train.demo import run_demo
from polyclip.train.demo.shapes import COLOURS, SHAPES, held_out_combinations, seen_combinations

REQUIRED_KEYS = {"zero_shot_accuracy", "chance_accuracy", "recall_at_5", "search"}


def test_held_out_combinations_need_both_attributes():
    held = held_out_combinations()
    assert len(held) == 12 and len(set(held)) == 12
    assert not set(held) & set(seen_combinations())
    for (
        colour
    ) in COLOURS:  # every colour and shape is held out exactly twice: one attribute alone is not enough
        assert sum(c == colour for c, _ in held) == 2
    for shape in SHAPES:
        assert sum(s == shape for _, s in held) == 2


def test_demo_runs_saves_and_reports(tmp_path):
    report = run_demo(steps=3, out=tmp_path, verbose=False, train_images=192)
    assert REQUIRED_KEYS <= set(report)
    assert report["chance_accuracy"] == pytest.approx(1 / 12)
    assert 0.0 <= report["zero_shot_accuracy"] <= 1.0 and 0.0 <= report["recall_at_5"] <= 1.0
    assert len(report["search"]["top5"]) == 5
    assert json.loads((tmp_path / "demo.json").read_text())["steps"] == 3
    model, preprocess, tokenizer = polyclip.load(tmp_path)  # the saved model loads like any other
    with torch.no_grad():
        features = model.encode_image(preprocess.batch([tmp_path / report["search"]["top5"][0]["image"]]))
    assert features.shape == (1, model.config.embed_dim)
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def test_demo_is_deterministic(tmp_path):
    first = run_demo(steps=2, out=tmp_path / "a", verbose=False, train_images=128, threads=1)
    second = run_demo(steps=2, out=tmp_path / "b", verbose=False, train_images=128, threads=1)
    assert first["final_loss"] == second["final_loss"]
    assert first["zero_shot_accuracy"] == second["zero_shot_accuracy"]


def test_demo_command_prints_json(tmp_path):
    from polyclip.cli import app

    result = CliRunner().invoke(
        app, ["demo", "--json", "--steps", "2", "--train-images", "128", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # the whole output is one JSON object
    assert REQUIRED_KEYS <= set(report)


@pytest.mark.slow
def test_demo_learns_unseen_combinations(tmp_path):
    report = run_demo(out=tmp_path, verbose=False)
    assert report["zero_shot_accuracy"] > 3 * report["chance_accuracy"]
    assert report["zero_shot_accuracy_all_combinations"] > 3 * report["chance_accuracy_all_combinations"]
    assert report["recall_at_5"] > 0.5
