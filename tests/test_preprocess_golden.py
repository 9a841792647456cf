"""Preprocessing per checkpoint format against the outputs of the reference pipelines themselves.

tests/golden/preprocess.npz holds what OpenAI CLIP's ``preprocess``, open_clip's ``image_transform`` (each
``resize_mode``) and ``create_model_and_transforms`` on a folder, transformers' ``CLIPImageProcessor`` and
``SiglipImageProcessor`` (torchvision and PIL backends, loaded from a ``preprocessor_config.json``) and
pybioclip's transform return for the photos in tests/golden/images (odd sizes; RGB, greyscale, greyscale +
alpha, palette with transparency, RGBA, CMYK). scripts/golden/preprocess.py regenerates it. polyclip reads
the same settings the way it reads them from each format and must agree within one grey level (1/255) at
every pixel.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import polyclip
from polyclip.checkpoints.export import export_open_clip
from polyclip.checkpoints.hf import preprocess_from_hf
from polyclip.checkpoints.open_clip import preprocess_from_open_clip
from polyclip.checkpoints.openai import clip_preprocess
from polyclip.transforms import PRESETS, ImageTransform, PreprocessConfig, build_preprocess

GOLDEN = Path(__file__).parent / "golden"
IMAGES = GOLDEN / "images"
INDEX = json.loads((GOLDEN / "preprocess.json").read_text())
ARRAYS = np.load(GOLDEN / "preprocess.npz")
ONE_LEVEL = 1 / 255 + 1e-5  # float16 storage of the float outputs adds < 1e-4 in pixel units
# Pipelines that resize 8-bit images with Pillow, as polyclip does: equal to the pixel.
EXACT = {"openai", "open_clip_shortest", "open_clip_longest", "open_clip_squash", "open_clip_folder",
         "hf_clip_pil", "hf_clip_crop_pct_pil", "hf_siglip_pil"}  # fmt: skip
# 16-bit greyscale: Pillow's convert("RGB") in every reference clips values above 255 (the image turns
# white); polyclip scales the range instead (polyclip.images), so that photo is compared nowhere.
DELIBERATELY_DIFFERENT = {"grey16_45x61.png"}


def _hf_folder(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "preprocessor_config.json").write_text(json.dumps(INDEX["folders"][name]))
    return folder


def _open_clip_folder(tmp_path: Path) -> Path:
    """An open_clip folder whose open_clip_config.json records the golden folder's preprocess_cfg."""
    folder = export_open_clip(polyclip.create_model("tiny-vit"), tmp_path / "open_clip")
    record = json.loads((folder / "open_clip_config.json").read_text())
    record["preprocess_cfg"] = INDEX["folders"]["open_clip_folder"]
    (folder / "open_clip_config.json").write_text(json.dumps(record))
    return folder


def polyclip_transform(pipeline: str, tmp_path: Path) -> ImageTransform:
    """polyclip's preprocessing for the format and settings each reference pipeline stands for."""
    name, _, size = pipeline.partition("@")
    size = int(size or 32)
    base = name.removesuffix("_pil")
    if base == "openai":
        return build_preprocess(clip_preprocess(size))
    if base == "open_clip_shortest":
        return build_preprocess(preprocess_from_open_clip({}, size))
    if base == "open_clip_longest":
        return build_preprocess(
            preprocess_from_open_clip({"resize_mode": "longest", "fill_color": 127}, size)
        )
    if base == "open_clip_squash":
        return build_preprocess(
            preprocess_from_open_clip({"resize_mode": "squash", "interpolation": "bilinear"}, size)
        )
    if base == "open_clip_folder":
        _, preprocess, _ = polyclip.load(_open_clip_folder(tmp_path))
        return preprocess
    if base.startswith("hf_"):
        folder = _hf_folder(tmp_path, f"{base}@{size}" if size != 32 else base)
        model_type = "siglip" if "siglip" in base else "clip"
        return build_preprocess(preprocess_from_hf(folder, model_type, size))
    if base == "pybioclip":
        return build_preprocess({**PRESETS["bioclip"].to_dict(), "image_size": size})
    raise AssertionError(f"no polyclip counterpart for {pipeline}")


def _ours_as_stored(transform: ImageTransform, image: Path, entry: dict) -> np.ndarray:
    """polyclip's output in the golden's form: 8-bit pixels, or the normalised tensor."""
    if entry["stored"] == "normalised_float16":
        return transform(image).numpy().astype(np.float64)
    config = transform.config
    assert tuple(config.mean) == tuple(entry["mean"]) and tuple(config.std) == tuple(entry["std"])
    pixels = np.asarray(transform.resize_and_crop(image)).transpose(2, 0, 1)  # (3, S, S) uint8
    # the normalised tensor is those pixels / 255, normalised: check that path too
    tensor = transform(image).numpy()
    mean, std = np.array(config.mean).reshape(3, 1, 1), np.array(config.std).reshape(3, 1, 1)
    np.testing.assert_allclose((tensor * std + mean) * 255, pixels, atol=1e-3)
    return pixels.astype(np.int64)


CASES = sorted(key for key, entry in INDEX["entries"].items() if entry["image"] not in DELIBERATELY_DIFFERENT)


@pytest.mark.parametrize("key", CASES)
def test_preprocessing_matches_the_reference_pipeline(key: str, tmp_path: Path) -> None:
    entry = INDEX["entries"][key]
    transform = polyclip_transform(entry["pipeline"], tmp_path)
    image = IMAGES / entry["image"]
    ours = _ours_as_stored(transform, image, entry)
    reference = ARRAYS[key].astype(np.float64)
    if entry["stored"] == "normalised_float16":
        std = np.array(entry["std"]).reshape(3, 1, 1)
        difference = np.abs((ours - reference) * std).max()
        assert difference <= ONE_LEVEL, f"{key}: {difference * 255:.3f} grey levels"
        return
    if entry["stored"] == "uint8_edge_columns":
        import hashlib

        edge = reference.shape[-1] // 2
        if entry["pipeline"].split("@")[0] in EXACT:
            digest = hashlib.sha256(np.ascontiguousarray(ours.astype(np.uint8)).tobytes()).hexdigest()
            assert digest == entry["sha256"], f"{key}: the pixels differ from the reference's"
        ours = np.concatenate([ours[..., :edge], ours[..., -edge:]], axis=-1)
    difference = np.abs(ours - reference).max()
    limit = 0 if entry["pipeline"].split("@")[0] in EXACT else 1
    assert difference <= limit, f"{key}: {difference} grey levels (allowed {limit})"


def test_every_reference_output_is_compared() -> None:
    """The golden covers each format's pipelines on every photo mode (nothing silently left out)."""
    pipelines = {entry["pipeline"] for entry in INDEX["entries"].values()}
    assert {"openai", "open_clip_shortest", "open_clip_longest", "open_clip_squash", "open_clip_folder",
            "hf_clip", "hf_clip_pil", "hf_siglip", "hf_siglip_pil", "pybioclip", "openai@224",
            "hf_clip@224"} <= pipelines  # fmt: skip
    modes = {entry["image"].split("_")[0] for entry in INDEX["entries"].values()}
    assert {"rgb", "grey", "palette", "rgba", "cmyk", "photo"} <= modes


def test_the_one_pixel_crop_shift_is_real() -> None:
    """On the 639 x 427 photo (resized to 335 x 224) torchvision crops from x = 56, transformers from 55:
    the two references disagree with each other, so each format needs its own rounding."""
    openai = ARRAYS["openai@224/photo_639x427.jpg"].astype(np.int64)
    hf = ARRAYS["hf_clip_pil@224/photo_639x427.jpg"].astype(np.int64)
    edge = openai.shape[-1] // 2  # the stored left columns
    np.testing.assert_array_equal(openai[..., : edge - 1], hf[..., 1:edge])  # one column apart
    assert np.abs(openai[..., :edge] - hf[..., :edge]).max() > 5
    photo = IMAGES / "photo_639x427.jpg"
    torchvision_style = ImageTransform(PreprocessConfig(convention="torchvision")).resize_and_crop(photo)
    transformers_style = ImageTransform(PreprocessConfig(convention="transformers")).resize_and_crop(photo)
    shifted = np.asarray(torchvision_style)[:, :-1]
    np.testing.assert_array_equal(shifted, np.asarray(transformers_style)[:, 1:])


def test_bioclip_resizes_float_tensors_bilinear() -> None:
    """pybioclip: ToTensor() then Resize((224, 224), antialias=True): bilinear in float, not Pillow bicubic."""
    config = PRESETS["bioclip"]
    assert (config.resize_mode, config.interpolation, config.convention) == ("squash", "bilinear", "tensor")
    out = build_preprocess("bioclip")(IMAGES / "photo_639x427.jpg")
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32


def test_registry_presets_take_the_convention_of_their_format() -> None:
    """A CLIP published as a transformers folder is preprocessed as CLIPImageProcessor does, one published
    as an open_clip folder as open_clip does; BioCLIP as pybioclip; BioCLIP 2 as its folder records."""
    from polyclip.factory import _preprocess_config
    from polyclip.hub import registry

    config = polyclip.create_model("tiny-vit").config
    entries = registry()
    conventions = {
        name: PreprocessConfig.from_dict(_preprocess_config(entries[name], None, config)).convention
        for name in ("clip-vit-b-32", "siglip-base-patch16-224", "clip-rn50", "bioclip", "pubmedclip")
    }
    assert conventions == {"clip-vit-b-32": "transformers", "siglip-base-patch16-224": "transformers",
                           "clip-rn50": "torchvision", "bioclip": "tensor", "pubmedclip": "torchvision"}  # fmt: skip
    recorded = preprocess_from_open_clip({"resize_mode": "squash"}, 224)
    assert _preprocess_config(entries["bioclip-2"], recorded, config) == recorded
