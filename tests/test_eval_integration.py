"""The protocols through the real core: a tiny model saved, loaded by path with polyclip.load, evaluated."""

import json

import pytest
import torch

import polyclip
from polyclip.eval import runner
from polyclip.eval.data import read_captions, read_image_folder
from polyclip.eval.features import EncodeConfig
from test_eval_support import colour_folder


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "tiny-vit"
    torch.manual_seed(0)
    polyclip.save(polyclip.create_model("tiny-vit"), None, {"type": "clip", "context_length": 77}, folder)
    return str(folder)


def test_zero_shot_and_retrieval_with_a_loaded_model(tiny_checkpoint, tmp_path):
    data = read_image_folder(colour_folder(tmp_path / "data", ["red", "green", "blue"], per_class=2))
    run = runner.RunConfig(encode=EncodeConfig(batch_size=4, num_workers=0), cache_dir=tmp_path / "cache")
    config = runner.ZeroShotConfig(templates="simple")
    first = runner.run_zero_shot([tiny_checkpoint], data, config, run)
    second = runner.run_zero_shot([tiny_checkpoint], data, config, run)  # every feature from the cache
    assert first.results[0].metrics == second.results[0].metrics
    assert 0.0 <= first.results[0].metrics["accuracy"] <= 1.0
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2

    lines = [
        json.dumps({"image": f"data/{c}/0.png", "captions": [f"a {c} square", f"{c}"]})
        for c in ("red", "blue")
    ]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    report = runner.run_retrieval([tiny_checkpoint], read_captions(tmp_path / "captions.jsonl"), run=run)
    metrics = report.results[0].metrics
    assert metrics["i2t_R@1"] in (0.0, 0.5, 1.0) and 1.0 <= metrics["t2i_mean_rank"] <= 2.0
