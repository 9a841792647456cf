"""The `polyclip eval` commands: several models in one call, reports written, readable errors."""

import json

import pytest
import typer
from typer.testing import CliRunner

import polyclip
from polyclip.cli.eval import expand_greedy_models, register
from test_eval_support import colour_folder, fake_triple


@pytest.fixture
def app(monkeypatch):
    monkeypatch.setattr(
        polyclip, "load", lambda name, device=None: fake_triple(seed=len(name)), raising=False
    )
    application = typer.Typer()
    register(application)
    return application


def test_greedy_models_expansion():
    args = ["--models", "a", "b", "c", "--out", "x", "--models", "d", "--", "--models"]
    assert expand_greedy_models(args) == [
        "--models",
        "a",
        "--models",
        "b",
        "--models",
        "c",
        "--out",
        "x",
        "--models",
        "d",
        "--",
        "--models",
    ]


def test_zeroshot_command_with_three_models(app, tmp_path):
    colour_folder(tmp_path / "data", ["red", "green", "blue"], per_class=2)
    args = [
        "eval",
        "zeroshot",
        "--models",
        "alpha",
        "beta",
        "gamma",
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "out"),
        "--templates",
        "simple",
        "--workers",
        "0",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--no-plots",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "| metric | alpha | beta | gamma |" in result.output
    payload = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["model"] for r in payload["results"]] == ["alpha", "beta", "gamma"]
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 6  # images + class weights per model


def test_retrieval_and_probe_commands(app, tmp_path):
    colour_folder(tmp_path / "img", ["red", "blue"], per_class=1)
    (tmp_path / "c.jsonl").write_text(
        '{"image": "img/red/0.png", "captions": ["a red box", "red again"]}\n'
        '{"image": "img/blue/0.png", "captions": ["a blue box"]}\n'
    )
    out = tmp_path / "retrieval"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "retrieval",
            "--models",
            "m",
            "--captions",
            str(tmp_path / "c.jsonl"),
            "--out",
            str(out),
            "--recall-ks",
            "1,2",
            "--precision-ks",
            "1",
            "--workers",
            "0",
            "--no-plots",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads((out / "results.json").read_text())["results"][0]["metrics"]["i2t_R@1"] == 1.0
    colour_folder(tmp_path / "train", ["red", "green", "blue"], per_class=4)
    colour_folder(tmp_path / "test", ["red", "green", "blue"], per_class=1)
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "probe",
            "--models",
            "m",
            "--train",
            str(tmp_path / "train"),
            "--test",
            str(tmp_path / "test"),
            "--protocol",
            "plip",
            "--out",
            str(tmp_path / "probe"),
            "--workers",
            "0",
            "--no-plots",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "chosen_alpha" in result.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", "/nonexistent/data"], "does not exist"),
        (["--data", "{data}", "--templates", "nope"], "unknown template set"),
        (["--data", "{data}", "--batch-size", "0"], "--batch-size"),
    ],
)
def test_user_errors_are_one_line_without_traceback(app, tmp_path, extra, message):
    colour_folder(tmp_path / "data", ["red", "blue"], per_class=1)
    extra = [e.replace("{data}", str(tmp_path / "data")) for e in extra]
    result = CliRunner().invoke(
        app, ["eval", "zeroshot", "--models", "m", "--out", str(tmp_path / "o"), *extra]
    )
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_fewshot_and_bad_ints(app, tmp_path):
    colour_folder(tmp_path / "train", ["red", "green"], per_class=3)
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "fewshot",
            "--models",
            "m",
            "--train",
            str(tmp_path / "train"),
            "--shots",
            "1,x",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2 and "comma-separated integers" in result.output
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "fewshot",
            "--models",
            "m",
            "n",
            "--train",
            str(tmp_path / "train"),
            "--shots",
            "1,2",
            "--folds",
            "2",
            "--workers",
            "0",
            "--out",
            str(tmp_path / "o"),
            "--no-plots",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "| 2shot_accuracy |" in result.output


def test_templates_command(app):
    result = CliRunner().invoke(app, ["eval", "templates"])
    assert result.exit_code == 0 and "openai_imagenet (80 templates)" in result.output
