"""The core commands as a user runs them: models, info, classify, embed (with bad files and resume)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import run_polyclip
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
    assert entries["bioclip"]["preprocessing"] == "bioclip preset"
    assert entries["clip-vit-l-14-336"]["preprocessing"] == "shortest 336px bicubic"
    assert entries["clip-vit-b-32"]["tokenization"] == "CLIP BPE, 77 tokens"


@pytest.mark.parametrize("columns", [80, 250])
def test_models_table_never_breaks_a_hub_id(columns):
    """The README's columns, and every name and hub id whole, on a narrow and on a wide terminal."""
    from polyclip.hub import registry

    shown = run_polyclip("models", timeout=60, COLUMNS=str(columns), TERM="dumb")
    assert shown.returncode == 0, shown.stderr
    assert max(len(line) for line in shown.stdout.splitlines()) <= columns
    for name, entry in registry().items():
        assert name in shown.stdout and entry.hub_id in shown.stdout, entry.hub_id
    for column in ("preprocessing", "tokenizer", "licence", "architecture"):
        assert column in shown.stdout


def test_templates_mean_one_thing_everywhere(tmp_path):
    """A set name, a literal with {} and a file, through one resolver, for classify and eval alike."""
    import typer

    from polyclip.cli.options import resolve_templates_option
    from polyclip.zero_shot import template_sets

    (tmp_path / "mine.txt").write_text("# mine\nart of {}.\n")
    assert resolve_templates_option(["plip"]) == template_sets()["plip"]
    assert resolve_templates_option(["a photo of a {}."]) == ["a photo of a {}."]
    assert resolve_templates_option([str(tmp_path / "mine.txt"), "plip"]) == [
        "art of {}.",
        *template_sets()["plip"],
    ]
    assert resolve_templates_option(None, "bioclip") == template_sets()["bioclip"]
    with pytest.raises(typer.BadParameter, match="unknown template set 'nope'"):
        resolve_templates_option(["nope"])
    for command in (["classify"], ["eval", "zeroshot"], ["eval", "fewshot"], ["eval", "hierarchy"]):
        help_text = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"}).output
        assert "--templates" in help_text and "--template " in help_text, command


def test_fixed_choices_match_the_api():
    """The choice lists of the CLI (written out so that --help needs no torch) are the API's."""
    from polyclip.cli import domains, options, video
    from polyclip.domains.clipbert import AGGREGATIONS
    from polyclip.domains.taxonomy import RANKS, TEXT_TYPES
    from polyclip.factory import DTYPES

    assert [c.value for c in video.AggregationChoice] == list(AGGREGATIONS)
    assert [c.value for c in domains.Rank] == list(RANKS)
    assert [c.value for c in domains.TextType] == list(TEXT_TYPES)
    assert {c.value for c in options.DtypeChoice} <= set(DTYPES)
    result = runner.invoke(app, ["convert", "x", "--out", "y", "--to", "onnx"])
    assert result.exit_code == 2 and "hf" in result.output and "open_clip" in result.output
    for command in (["embed"], ["index", "build"], ["serve"]):
        help_text = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"}).output
        assert "fp32|bf16|fp16" in help_text, command


def test_every_json_option_says_what_it_does_and_k_is_spelled_alike():
    import typer.main

    from polyclip.cli import command_paths

    root = typer.main.get_command(app)
    checked = 0
    for path in command_paths():
        command = root
        for word in path:
            command = command.commands[word]
        for param in getattr(command, "params", []):
            if "--json" in param.opts:
                assert param.help, path
                checked += 1
            if "-k" in param.opts or "--top-k" in param.opts:
                assert {"-k", "--top-k"} <= set(param.opts), path
    assert checked >= 8


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
    from polyclip.embed.parquet import _write_part

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
    result = run_polyclip("info", tmp_path / "missing")
    assert result.returncode == 2
    assert "error:" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "empty").mkdir()
    result = run_polyclip("info", tmp_path / "empty")
    assert result.returncode == 2 and "not a checkpoint folder" in result.stderr


def test_convert_to_transformers_with_tokenizer(tiny_hf_clip_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    import polyclip

    native = tmp_path / "native"
    assert (
        runner.invoke(
            app, ["convert", str(tiny_hf_clip_dir), "--to", "native", "--out", str(native)]
        ).exit_code
        == 0
    )
    hf = tmp_path / "hf"
    result = runner.invoke(app, ["convert", str(native), "--to", "hf", "--out", str(hf)])
    assert result.exit_code == 0, result.output
    reference = transformers.CLIPModel.from_pretrained(hf).eval()
    hf_tokenizer = transformers.CLIPTokenizer.from_pretrained(hf)
    model, _, tokenizer = polyclip.load(native)
    texts = ["a photo of a cat", "two dogs playing in the snow!"]
    ids = tokenizer(texts)
    theirs = hf_tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    # transformers pads with the end token where OpenAI pads with 0; the ids up to the end token agree
    assert torch.equal(torch.where(ids == 0, theirs, ids), theirs)
    with torch.no_grad():
        expected = reference.get_text_features(input_ids=theirs)
        expected = expected if torch.is_tensor(expected) else expected.pooler_output
        torch.testing.assert_close(model.encode_text(ids), expected, atol=1e-5, rtol=1e-5)
    result = runner.invoke(app, ["convert", str(native), "--to", "open_clip", "--out", str(tmp_path / "oc")])
    assert result.exit_code == 0, result.output
    again, _, _ = polyclip.load(tmp_path / "oc")
    with torch.no_grad():
        torch.testing.assert_close(again.encode_text(ids), model.encode_text(ids), atol=1e-6, rtol=1e-6)


HELP_WITHOUT_TORCH = """
import contextlib, io, sys
from polyclip.cli import app, command_paths, print_help_without_parsing
paths = command_paths()
assert len(paths) >= 30, paths
for path in paths:
    with contextlib.redirect_stdout(io.StringIO()) as shown:
        assert print_help_without_parsing([*path, "--help"]), path
    assert "Usage: polyclip" in shown.getvalue(), path
    # the same help through typer's own parsing, and an argument error for each command
    for args in ([*path, "--help"], [*path, "--no-such-option"]):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                app(args, prog_name="polyclip")
            except SystemExit as stop:
                assert stop.code == (0 if args[-1] == "--help" else 2), (args, stop.code)
    leaked = [m for m in ("torch", "numpy", "PIL", "pyarrow") if m in sys.modules]
    assert not leaked, (path, leaked)
print(len(paths))
"""


def test_help_and_argument_errors_do_not_import_torch():
    """`polyclip --help`, every subcommand's --help and a bad option stay light: no torch, numpy, PIL."""
    done = subprocess.run(
        [sys.executable, "-c", HELP_WITHOUT_TORCH], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) >= 30


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("tty", "enabled", "shown"), [(True, True, True), (True, False, False), (False, True, False)]
)
def test_progress_bar_only_on_a_terminal_and_only_when_enabled(monkeypatch, tty, enabled, shown):
    from polyclip.progress import progress_bar

    stream = _Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    assert list(progress_bar(range(5), total=5, desc="work", enabled=enabled)) == list(range(5))
    with progress_bar(total=3, unit="img", enabled=enabled) as bar:
        bar.update(3)
    assert ("work" in stream.getvalue() and "5/5" in stream.getvalue()) == shown
    assert bool(stream.getvalue()) == shown
