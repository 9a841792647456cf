"""`polyclip choose` on generated data with models whose ranking is known.

The sample: images of three colours (a shape of random size and place, noise); classes are the colour
names. One candidate is trained here for a few seconds to classify them zero-shot (its prompts are the
class names), another is the same architecture at random initialisation (chance is 1/3), and one is a
registry name that the empty, offline hub cache does not hold.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from typer.testing import CliRunner

import polyclip
from polyclip.cli import app
from polyclip.eval.choose import Candidate, ChooseConfig, bootstrap_interval, choose, recommend
from polyclip.factory import default_preprocess
from polyclip.models import DualEncoderConfig, TextConfig, VisionConfig
from polyclip.tokenizers import build_tokenizer
from polyclip.transforms import build_preprocess

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
TEMPLATES = ["a {} picture."]
runner = CliRunner()


def _image(colour: tuple[int, int, int], rng: np.random.Generator) -> Image.Image:
    noise = rng.integers(0, 80, (32, 32, 3), dtype=np.uint8)
    image = Image.fromarray(noise + 90)  # grey noise background
    x, y, r = rng.integers(4, 28), rng.integers(4, 28), rng.integers(6, 12)
    ImageDraw.Draw(image).ellipse((x - r, y - r, x + r, y + r), fill=colour)
    return image


def _sample_folder(root, per_class: int, seed: int):
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            _image(colour, rng).save(root / name / f"{i}.png")
    return root


def _config() -> DualEncoderConfig:
    return DualEncoderConfig(
        embed_dim=32,
        vision=VisionConfig(kind="resnet", image_size=32, resnet_layers=(1, 1, 1, 1), resnet_width=8),
        text=TextConfig(context_length=16, width=32, layers=1, heads=2, mlp_dim=64),
    )


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """One torch thread here and in the candidates' processes: on shared cores two threads of a tiny
    model mostly wait for each other."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def candidates(tmp_path_factory):
    """(trained folder, random folder): the same architecture, saved with polyclip.save."""
    root = tmp_path_factory.mktemp("choose")
    tokenizer = build_tokenizer({"type": "clip", "context_length": 16})
    torch.manual_seed(0)
    random_model = polyclip.create_model(_config()).eval()
    preprocess = build_preprocess(default_preprocess(random_model.config))
    random_dir = polyclip.save(random_model, preprocess, tokenizer, root / "random")

    torch.manual_seed(1)
    model = polyclip.create_model(_config())
    rng = np.random.default_rng(100)
    names = list(COLOURS)
    prompts = tokenizer([TEMPLATES[0].format(name) for name in names])  # (3, 16)
    labels = torch.from_numpy(rng.integers(0, 3, 96))
    pixels = torch.stack([preprocess(_image(COLOURS[names[i]], rng)) for i in labels])  # (96, 3, 32, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped: the autouse one-thread fixture does not cover it
    for _ in range(30):
        batch = torch.from_numpy(rng.choice(96, 24, replace=False))
        logits = model(pixels[batch], prompts).logits_per_image  # (24, 3)
        loss = torch.nn.functional.cross_entropy(logits, labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    trained_dir = polyclip.save(model.eval(), preprocess, tokenizer, root / "trained")
    return trained_dir, random_dir, _sample_folder(root / "sample", per_class=10, seed=7)


def test_choose_ranks_the_informative_model_first_and_reports_what_it_could_not_try(
    candidates, tmp_path, monkeypatch
):
    trained, random_init, sample = candidates
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    png, report = tmp_path / "choose.png", tmp_path / "choose.json"
    result = runner.invoke(
        app,
        ["choose", "--data", str(sample), "--models", str(random_init), str(trained), "clip-vit-b-32",
         "--offline", "--batch-size", "8", "--png", str(png), "--json", str(report),
         "--templates", "a {} picture."],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"recommended: {trained}" in result.output
    data = json.loads(report.read_text())
    ranked = [c["name"] for c in data["candidates"]]
    assert ranked == [str(trained), str(random_init), "clip-vit-b-32"]
    best, worst, missing = data["candidates"]
    assert best["status"] == worst["status"] == "tried"
    assert best["accuracy"] >= 0.9 and worst["accuracy"] <= 0.6
    assert best["ci_low"] > worst["ci_high"]  # 30 samples separate them
    assert best["ci_low"] <= best["accuracy"] <= best["ci_high"] and best["samples"] == 30
    for row in (best, worst):
        assert row["images_per_second"] > 0 and row["peak_memory_mib"] >= 0
        assert row["ms_per_image"] == pytest.approx(1000 / row["images_per_second"])
    assert missing["status"] == "not tried" and "cache" in missing["reason"]
    assert missing["license"] == "MIT"  # from the registry
    assert "not tried (1): clip-vit-b-32" in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_few_shot_task_uses_the_few_shot_protocol(candidates):
    trained, _, sample = candidates
    result = choose(
        sample, "fewshot", [str(trained)], ChooseConfig(shots=3, folds=2, batch_size=4, isolate=False)
    )
    (row,) = result.tried
    assert row.metrics["shots"] == 3 and "3shot_accuracy" in row.metrics
    assert row.samples == 30 - 3 * 3  # one fold's queries: the rest of the sample
    assert row.accuracy >= 0.9 and result.recommendation == str(trained)


def test_recommendation_rule_budget_and_ties():
    def tried(name, accuracy, ips):
        c = Candidate(name, "local", status="tried", accuracy=accuracy, images_per_second=ips)
        c.ms_per_image, c.ci_low, c.ci_high = 1000 / ips, accuracy - 0.05, accuracy + 0.05
        return c

    rows = [tried("slow-best", 0.9, 10), tried("fast-good", 0.8, 100), tried("fast-tie", 0.8, 200)]
    assert recommend(rows, None)[0] == "slow-best"
    for row in rows:
        row.within_budget = row.ms_per_image <= 20
    name, reason = recommend(rows, 20)
    assert name == "fast-tie" and "tied with fast-good" in reason and "over the budget: slow-best" in reason
    for row in rows:
        row.within_budget = False
    name, reason = recommend(rows, 1)
    assert name is None and "no candidate meets the budget" in reason


def test_bootstrap_interval_equals_resampling_the_outcomes():
    outcomes = np.array([1] * 17 + [0] * 8)
    rng = np.random.default_rng(3)
    means = rng.choice(outcomes, size=(20000, outcomes.size), replace=True).mean(axis=1)
    explicit = np.quantile(means, [0.025, 0.975])
    low, high = bootstrap_interval(17, 25, resamples=20000, seed=4)
    assert abs(low - explicit[0]) <= 0.041 and abs(high - explicit[1]) <= 0.041  # one outcome is 0.04
    assert low < 17 / 25 < high


def test_bad_input_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["choose", "--data", str(tmp_path / "missing"), "--models", "all"])
    # a ValueError: `polyclip` prints it as one line and exits 2 (cli.main's user errors)
    assert isinstance(result.exception, ValueError) and "does not exist" in str(result.exception)
    with pytest.raises(ValueError, match="unknown task"):
        choose(tmp_path, "segmentation", ["all"])
    with pytest.raises(ValueError, match="not a local path"):
        choose(_sample_folder(tmp_path / "s", 2, 0), "zeroshot", ["no-such-model"])
