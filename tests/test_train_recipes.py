"""Every recipe's smoke version trains on tiny generated data in that system's own data format."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from polyclip.train.launch import build_config
from polyclip.train.recipes import RECIPES
from polyclip.train.recipes.systems import BIOCLIP_TEXT_TYPES
from polyclip.train.trainer import train
from test_train_fixtures import COLOURS, colour_pairs, single_thread, write_csv, write_jsonl, write_rsicd_json  # noqa: F401 (autouse fixture)


def _rows_csv(path, header, rows):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def recipe_data(name: str, root) -> list[str]:
    """The overrides that point recipe ``name`` at 16 generated pairs in its format."""
    records = colour_pairs(root, 16, corrupt=1)
    if name == "pubmedclip":  # ROCO: id, name, caption; images in their own folder
        rows = [(f"ROCO_{n:05d}", r["image"].split("/")[-1], r["captions"][0]) for n, r in enumerate(records)]
        path = _rows_csv(root / "train.csv", ["id", "name", "caption"], rows)
        return [f"data.train={path}", f"data.image_root={root / 'images'}"]
    if name == "clip_rsicd":
        # 14 training images x 2 captions: 3 steps make the first epoch, so every sample is drawn
        path = write_rsicd_json(root / "dataset_rsicd.json", records, val_every=8)
        return [f"data.train={path}", "schedule.max_steps=3"]
    if name == "bioclip":
        rows = [(r["image"], *[f"{kind} {r['colour']}" for kind in BIOCLIP_TEXT_TYPES]) for r in records]
        return [f"data.train={_rows_csv(root / 'train.csv', ['image', *BIOCLIP_TEXT_TYPES], rows)}"]
    if name == "streetclip":
        places = {c: (f"{c}ville", f"{c} region", f"{c}land") for c in COLOURS}
        rows = [(r["image"], *places[r["colour"]]) for r in records]
        return [f"data.train={_rows_csv(root / 'train.csv', ['image', 'city', 'region', 'country'], rows)}"]
    if name == "fashionclip":
        return [f"data.train={write_csv(root / 'catalog.csv', records)}"]
    if name == "siglip":
        return [f"data.train={write_csv(root / 'pairs.tsv', records, delimiter=chr(9))}"]
    return [f"data.train={write_jsonl(root / 'pairs.jsonl', records)}"]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_smoke_run(name, tmp_path):
    config = build_config(name, recipe_data(name, tmp_path / "data"), smoke=True, output_dir=tmp_path / "run")
    result = train(config)
    assert result.steps == config.schedule.max_steps and result.last_loss == result.last_loss  # not NaN
    assert result.skipped_images >= 1  # a whole epoch was drawn: the corrupt image was met and replaced
    saved = json.loads((result.model_dir / "polyclip_config.json").read_text())
    assert saved["model"]["vision"]["width"] == config.model.config.vision.width


def test_train_command_runs_a_recipe_smoke(tmp_path):
    from polyclip.cli import app

    overrides = recipe_data("clip_rsicd", tmp_path / "data")
    args = ["train", "clip_rsicd", "--smoke", "--out", str(tmp_path / "run")]
    for item in overrides + ["optim.lr=1e-4"]:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "model:" in result.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["optim"]["lr"] == 1e-4


@pytest.mark.parametrize("sigmoid", [True, False])
def test_fine_tuning_a_local_folder_takes_its_loss_from_the_model(sigmoid, tmp_path):
    import polyclip
    from polyclip.losses import ClipLoss, SigLipLoss
    from polyclip.tokenizers import ClipTokenizer
    from polyclip.train.recipes import smoke_model
    from polyclip.train.trainer import Trainer
    from polyclip.transforms import PreprocessConfig, build_preprocess

    model = polyclip.create_model(smoke_model(sigmoid))
    preprocess = build_preprocess(PreprocessConfig(image_size=model.image_size))
    folder = polyclip.save(model, preprocess, ClipTokenizer(context_length=32), tmp_path / "local")
    data = write_jsonl(tmp_path / "pairs.jsonl", colour_pairs(tmp_path, 16))
    overrides = [f"data.train={data}", "data.batch_size=8", "data.num_workers=0", "schedule.max_steps=1"]
    overrides += ["schedule.epochs=none", "log.progress=false", "log.plots=false"]
    config = build_config("clip", overrides, output_dir=tmp_path / "run", start_from=folder)
    assert config.model.pretrained == str(folder) and config.schedule.epochs is None
    trainer = Trainer(config)
    assert isinstance(trainer.loss_fn, SigLipLoss if sigmoid else ClipLoss)
    assert trainer.fit().steps == 1
    recipe = build_config("finetune", [f"data.train={data}"], start_from=folder)
    assert recipe.augment.random_resized_crop is None and recipe.loss.kind == "auto"
