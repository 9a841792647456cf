"""Zero-shot: template ensembling, chunked top-k, template sets, and the protocol end to end."""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from polyclip.eval import runner
from polyclip.eval.data import read_image_folder
from polyclip.eval.errors import EvalError
from polyclip.eval.features import EncodeConfig
from polyclip.eval.templates import list_template_sets, load_templates
from polyclip.eval.zero_shot import build_zero_shot_weights, class_scores, top_k_classes
from test_eval_support import COLOURS, FakePreprocess, FakeTokenizer, colour_folder, fake_triple, save_square

RUN = runner.RunConfig(encode=EncodeConfig(batch_size=4, num_workers=0))


class LinearTextModel(torch.nn.Module):
    """Text embedding = a fixed random projection of the byte histogram: different for every prompt."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(256, 8, generator=torch.Generator().manual_seed(0)))
        self.config = SimpleNamespace(embed_dim=8)

    def encode_text(self, ids, normalize=False):
        histogram = F.one_hot(ids, 256).float().sum(dim=1)  # (B, 256)
        out = histogram @ self.weight
        return F.normalize(out, dim=-1) if normalize else out


def test_weights_are_the_renormalised_mean_of_normalised_prompt_embeddings():
    model, tokenizer = LinearTextModel(), FakeTokenizer()
    templates = ["a photo of a {}.", "a drawing of the {}.", "itap of my {}."]
    classes = ["cat", "dog"]
    weights = build_zero_shot_weights(model, tokenizer, classes, templates, batch_size=2)
    for row, name in enumerate(classes):
        embeddings = model.encode_text(tokenizer([t.format(name) for t in templates]))
        expected = F.normalize(F.normalize(embeddings, dim=-1).mean(dim=0), dim=0)
        torch.testing.assert_close(weights[row], expected)
    torch.testing.assert_close(weights.norm(dim=-1), torch.ones(2))


def test_chunked_top_k_equals_full_matrix():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(1000, 16, generator=generator)
    weights = F.normalize(torch.randn(300, 16, generator=generator), dim=-1)
    scores, indices = top_k_classes(features, weights, k=5, chunk_size=128)
    full = class_scores(features, weights).topk(5, dim=1)
    assert torch.equal(indices, full.indices)
    torch.testing.assert_close(scores, full.values)


def test_dimension_mismatch_is_explained():
    with pytest.raises(EvalError, match="same model"):
        top_k_classes(torch.randn(3, 4), torch.randn(2, 5))


def test_builtin_template_sets():
    sets = list_template_sets()
    assert {"openai_imagenet", "clip-rsicd", "plip", "fashionclip", "bioclip", "streetclip"} <= set(sets)
    imagenet = load_templates("openai_imagenet")
    assert len(imagenet) == 80 and len(set(imagenet)) == 80
    assert imagenet[0] == "a bad photo of a {}." and "itap of my {}." in imagenet
    for name in sets:
        assert all(t.count("{}") == 1 for t in load_templates(name))
    assert load_templates("fashionclip") == ["{}"]  # the raw label; PLIP's and RSICD's: test_eval_protocols


def test_template_files(tmp_path):
    (tmp_path / "t.txt").write_text("# comment\na {c} photo.\n\nart of {}.\n")
    assert load_templates(tmp_path / "t.txt") == ["a {} photo.", "art of {}."]
    (tmp_path / "t.json").write_text(json.dumps({"templates": ["x {}"]}))
    assert load_templates(str(tmp_path / "t.json")) == ["x {}"]
    (tmp_path / "t.toml").write_text('templates = ["y {}"]\n')
    assert load_templates(tmp_path / "t.toml") == ["y {}"]
    (tmp_path / "braces.txt").write_text("a {} with {stray} braces\n")
    with pytest.raises(EvalError, match="exactly one"):
        load_templates(tmp_path / "braces.txt")
    (tmp_path / "bad.txt").write_text("no placeholder\n")
    with pytest.raises(EvalError, match="exactly one"):
        load_templates(tmp_path / "bad.txt")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(EvalError, match="malformed"):
        load_templates(tmp_path / "bad.json")
    with pytest.raises(EvalError, match="unknown template set"):
        load_templates("no_such_set")


def test_zero_shot_protocol_known_answer(tmp_path):
    colours = ["red", "green", "blue", "yellow", "magenta", "cyan"]
    data = read_image_folder(colour_folder(tmp_path, colours, per_class=2))
    report = runner.run_zero_shot([fake_triple()], data, runner.ZeroShotConfig(templates="simple"), RUN)
    metrics = report.results[0].metrics
    assert metrics["accuracy"] == 1.0 and metrics["top5_accuracy"] == 1.0 and metrics["macro_f1"] == 1.0


def test_zero_shot_protocol_with_a_wrong_label(tmp_path):
    root = colour_folder(tmp_path, ["red", "green", "blue"], per_class=2)
    save_square(root / "red" / "odd.png", COLOURS["blue"])  # a blue image labelled red
    data = read_image_folder(root)
    two_models = [("first", *fake_triple()), ("second", *fake_triple(seed=3))]
    report = runner.run_zero_shot(two_models, data, runner.ZeroShotConfig(templates=["a {} square"]), RUN)
    assert [r.model for r in report.results] == ["first", "second"]
    result = report.results[0]
    assert result.metrics["accuracy"] == pytest.approx(6 / 7)
    # classes sorted: blue, green, red; the odd red image is predicted blue
    assert result.details["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [1, 0, 2]]
    assert result.metrics["balanced_accuracy"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    assert "top5_accuracy" not in result.metrics  # top-5 of 3 classes is meaningless


def test_model_names_resolve_through_polyclip_load(monkeypatch):
    import polyclip

    loaded = []

    def fake_load(name, device=None):
        loaded.append((name, device))
        return fake_triple()

    monkeypatch.setattr(polyclip, "load", fake_load, raising=False)
    models = runner.resolve_models(
        ["tiny", "tiny", (FakeTokenizer(), FakePreprocess(), FakeTokenizer())], "cpu"
    )
    assert [m.name for m in models] == ["tiny", "tiny#2", "model2"]
    assert loaded == [("tiny", "cpu"), ("tiny", "cpu")]
    with pytest.raises(EvalError, match="no models"):
        runner.resolve_models([])
