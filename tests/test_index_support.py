"""Shared by the index and service tests: a tiny real checkpoint saved in polyclip's own format, and
folders of distinct images (random noise, so every image's nearest neighbour is itself)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import polyclip
from polyclip.tokenizers import ClipTokenizer
from polyclip.transforms import PRESETS, PreprocessConfig

SHAPES = ("circle", "square", "stripes")


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A random tiny-vit checkpoint with CLIP preprocessing at 32 px; ``polyclip.load`` reads it offline."""
    torch.manual_seed(seed)
    model = polyclip.create_model("tiny-vit")
    preprocess = PreprocessConfig.from_dict({**PRESETS["clip"].to_dict(), "image_size": 32})
    polyclip.save(model, preprocess, ClipTokenizer(), folder)
    return folder


def make_images(folder: Path, count: int, size: tuple[int, int] = (48, 40), seed: int = 0) -> list[Path]:
    """``count`` random-noise PNGs named 0000.png ...; ``size`` is (width, height)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        path = folder / f"{i:04d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def make_shapes(folder: Path, count: int, size: int = 96) -> list[Path]:
    """Coloured circles, squares and stripes: pictures a person can tell apart in a screenshot."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:size, 0:size]
    paths = []
    for i in range(count):
        colour = rng.integers(30, 230, 3)
        background = 255 - colour // 2
        image = np.empty((size, size, 3), np.uint8)
        image[:] = background
        shape = SHAPES[i % len(SHAPES)]
        if shape == "circle":
            mask = (xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (size / 3) ** 2
        elif shape == "square":
            mask = (abs(xx - size / 2) < size / 3) & (abs(yy - size / 2) < size / 3)
        else:
            mask = (xx // 8) % 2 == 0
        image[mask] = colour
        path = folder / f"{shape}-{i:03d}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def write_captions(file: Path, paths: list[Path]) -> Path:
    """JSON Lines captions: every other image gets a caption and a 'split' and 'rank' metadata field."""
    with open(file, "w") as handle:
        for i, path in enumerate(paths):
            if i % 2 == 0:
                record = {
                    "path": str(path),
                    "caption": f"picture number {i}",
                    "split": "train" if i < len(paths) // 2 else "test",
                    "rank": i,
                }
                handle.write(json.dumps(record) + "\n")
    return file


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("other-model"), seed=1)


@pytest.fixture(scope="session")
def tiny_encoder(tiny_model_dir):
    from polyclip.index import Encoder

    return Encoder.load(tiny_model_dir)


def build_captioned_index(root: Path, encoder, images: list[Path], image_dir: Path) -> Path:
    """An index at ``root / "index"`` of the images under ``image_dir``, half of them captioned
    (`write_captions`), built with ``encoder`` as `polyclip index build` would."""
    from polyclip.index import BuildOptions, Index, add_paths
    from polyclip.index.build import collect_inputs

    captions = write_captions(root / "captions.jsonl", images)
    found, annotations, _ = collect_inputs([image_dir], captions)
    with Index.create(root / "index", encoder.identity) as index:
        add_paths(index, encoder, found, annotations, BuildOptions(batch_size=8, progress=False))
    return root / "index"
