"""Tests for image decoding (polyclip.images) and preprocessing/augmentations (polyclip.transforms).

Parity references: transformers' PIL/NumPy image processors (CLIPImageProcessor, SiglipImageProcessor) on
scikit-image's sample photographs. Fixtures for odd modes and broken files are generated at test time.
"""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from polyclip.images import DEFAULT_MAX_PIXELS, ImageDecodeError, is_image_file, load_image
from polyclip.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    ColorJitter,
    Compose,
    ImageTransform,
    PreprocessConfig,
    PreprocessConfigError,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    RandomSource,
    RandomVerticalFlip,
    ToNormalizedTensor,
    TrainTransform,
    build_preprocess,
)

skimage_data = pytest.importorskip("skimage.data")

ONE_LEVEL = 1.0 / 255.0  # one 8-bit grey level, the parity tolerance in pixel units


# ---------------------------------------------------------------------------------------------------------
# fixtures


def _sample_photos() -> dict[str, Image.Image]:
    photos = {
        name: Image.fromarray(getattr(skimage_data, name)())
        for name in ("astronaut", "chelsea", "coffee", "rocket")
    }
    # Portrait crop of rocket: 201 x 427 resizes to 224 x 475, and 475 - 224 = 251 is 3 mod 4, the case where
    # transformers' floor offset and torchvision's half-to-even rounding disagree.
    photos["portrait"] = photos["rocket"].crop((10, 0, 211, 427))
    photos["tiny_17x31"] = Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (17, 31, 3), dtype=np.uint8)
    )
    return photos


PHOTOS = _sample_photos()


def _clip_processor(size: int, crop: int, **kwargs):
    """transformers' PIL/NumPy CLIP processor (transformers >= 5 names it ...Pil; 4.x's default is PIL-based)."""
    pytest.importorskip("transformers")
    try:
        from transformers.models.clip.image_processing_pil_clip import (
            CLIPImageProcessorPil as processor_class,
        )
    except ImportError:
        from transformers import CLIPImageProcessor as processor_class
    return processor_class(size={"shortest_edge": size}, crop_size={"height": crop, "width": crop}, **kwargs)


def _siglip_processor():
    pytest.importorskip("transformers")
    try:
        from transformers.models.siglip.image_processing_pil_siglip import (
            SiglipImageProcessorPil as processor_class,
        )
    except ImportError:
        from transformers import SiglipImageProcessor as processor_class
    return processor_class()


def _pixel_difference(ours: torch.Tensor, reference: np.ndarray, std: tuple[float, float, float]) -> float:
    """Largest per-pixel difference after un-normalising (0..1 units)."""
    reference_tensor = torch.from_numpy(np.asarray(reference, dtype=np.float32))
    return float(((ours - reference_tensor).abs() * torch.tensor(std).view(3, 1, 1)).max())


def _encode(image: Image.Image, fmt: str, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_kwargs)
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header claims width x height 8-bit grey pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + _png_chunk(b"IEND", b"")
    )


def _assert_valid_tensor(tensor: torch.Tensor, size: int = 224) -> None:
    assert tensor.shape == (3, size, size)
    assert tensor.dtype == torch.float32
    assert torch.isfinite(tensor).all()


# ---------------------------------------------------------------------------------------------------------
# parity with transformers


@pytest.mark.parametrize("size", [224, 336])
@pytest.mark.parametrize("name", list(PHOTOS))
def test_clip_parity_with_transformers(name: str, size: int) -> None:
    image = PHOTOS[name]
    reference = _clip_processor(size, size)(image, return_tensors="np")["pixel_values"][0]
    ours = ImageTransform(PreprocessConfig(image_size=size, convention="transformers"))(image)
    assert ours.shape == (3, size, size)
    difference = _pixel_difference(ours, reference, CLIP_STD)
    assert difference <= ONE_LEVEL
    # Same resize, same crop, same arithmetic: in practice identical up to float rounding.
    assert difference < 1e-4


@pytest.mark.parametrize("name", list(PHOTOS))
def test_siglip_parity_with_transformers(name: str) -> None:
    image = PHOTOS[name]
    reference = _siglip_processor()(image, return_tensors="np")["pixel_values"][0]
    ours = build_preprocess("siglip")(image)
    assert ours.shape == (3, 224, 224)
    difference = _pixel_difference(ours, reference, (0.5, 0.5, 0.5))
    assert difference <= ONE_LEVEL
    assert difference < 1e-4


@pytest.mark.parametrize("name", ["chelsea", "portrait", "tiny_17x31"])
def test_crop_pct_matches_resize_then_crop(name: str) -> None:
    """PubMedCLIP's test transform: short side to 224 / 0.875 = 256 (bilinear), centre crop 224, ImageNet stats."""
    from PIL.Image import Resampling

    reference_processor = _clip_processor(
        256, 224, resample=Resampling.BILINEAR, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)
    )
    reference = reference_processor(PHOTOS[name], return_tensors="np")["pixel_values"][0]
    # PubMedCLIP's own transform is torchvision's (rounded crop offsets); transformers floors them
    ours = build_preprocess(dataclasses.replace(PRESETS["pubmedclip"], convention="transformers"))(
        PHOTOS[name]
    )
    assert _pixel_difference(ours, reference, IMAGENET_STD) <= ONE_LEVEL


def test_longest_mode_pads_the_short_side_with_fill_color() -> None:
    config = PreprocessConfig(resize_mode="longest", fill_color=128)
    transform = ImageTransform(config)
    photo = PHOTOS[
        "chelsea"
    ]  # 451 x 300 -> 224 x round(300 / (451 / 224)) = 224 x 149, padded top and bottom
    square = transform.resize_and_crop(photo)
    assert square.size == (224, 224)
    pixels = np.asarray(square)
    top = (224 - 149) // 2
    assert (pixels[:top] == 128).all() and (pixels[top + 149 :] == 128).all()
    assert not (pixels[top : top + 149] == 128).all()
    resized = np.asarray(photo.resize((224, 149), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(pixels[top : top + 149], resized)
    _assert_valid_tensor(transform(photo))


def test_squash_keeps_the_whole_image_and_shortest_crops_it() -> None:
    wide = Image.new("RGB", (300, 100), (0, 0, 0))
    wide.paste((255, 255, 255), (0, 0, 20, 100))  # a white band on the far left
    squashed = np.asarray(ImageTransform(PreprocessConfig(resize_mode="squash")).resize_and_crop(wide))
    cropped = np.asarray(ImageTransform(PreprocessConfig(resize_mode="shortest")).resize_and_crop(wide))
    assert squashed[:, :5].mean() > 200  # the band survives squashing
    assert cropped[:, :5].mean() < 10  # and is cut away by the centre crop


# ---------------------------------------------------------------------------------------------------------
# ImageTransform interface


def test_image_transform_accepts_paths_bytes_streams_and_batches(tmp_path: Path) -> None:
    path = tmp_path / "coffee.png"
    PHOTOS["coffee"].save(path)
    transform = build_preprocess("clip")
    from_image = transform(PHOTOS["coffee"])
    for source in (path, str(path), path.read_bytes(), io.BytesIO(path.read_bytes())):
        torch.testing.assert_close(transform(source), from_image, rtol=0, atol=0)
    batch = transform.batch([PHOTOS["coffee"], path, PHOTOS["tiny_17x31"]])
    assert batch.shape == (3, 3, 224, 224)
    torch.testing.assert_close(batch[0], from_image, rtol=0, atol=0)
    assert transform.batch([]).shape == (0, 3, 224, 224)
    assert transform.config == PRESETS["clip"]
    assert "image_size=224" in repr(transform) and "shortest" in repr(transform)


def test_normalisation_uses_the_config_statistics() -> None:
    grey = Image.new("RGB", (50, 50), (255, 0, 128))
    tensor = build_preprocess("clip")(grey)
    expected = [
        (255 / 255 - CLIP_MEAN[0]) / CLIP_STD[0],
        (0 - CLIP_MEAN[1]) / CLIP_STD[1],
        (128 / 255 - CLIP_MEAN[2]) / CLIP_STD[2],
    ]
    torch.testing.assert_close(tensor[:, 10, 10], torch.tensor(expected), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# decoding of odd modes


def _rgba_image() -> Image.Image:
    pixels = np.zeros((40, 60, 4), dtype=np.uint8)
    pixels[..., 0] = 200
    pixels[..., 1] = np.arange(60, dtype=np.uint8)[None, :] * 4
    pixels[..., 2] = 30
    pixels[..., 3] = 255
    pixels[:, :30, 3] = 0  # left half fully transparent
    return Image.fromarray(pixels, "RGBA")


def _palette_with_transparency() -> Image.Image:
    image = Image.fromarray(np.arange(48 * 32, dtype=np.uint32).reshape(32, 48).astype(np.uint8) % 16, "P")
    image.putpalette([channel for i in range(256) for channel in (i * 15 % 256, 255 - i * 15 % 256, 40)])
    image.info["transparency"] = 3
    return image


def _cmyk_image() -> Image.Image:
    pixels = np.zeros((30, 30, 4), dtype=np.uint8)
    pixels[..., 0] = 255  # full cyan
    return Image.fromarray(pixels, "CMYK")


MODE_FIXTURES = {
    "RGBA": lambda: _encode(_rgba_image(), "PNG"),
    "LA": lambda: _encode(_rgba_image().convert("LA"), "PNG"),
    "P_transparency": lambda: _encode(_palette_with_transparency(), "PNG", transparency=3),
    "L": lambda: _encode(PHOTOS["chelsea"].convert("L"), "PNG"),
    "I;16": lambda: _encode(
        Image.fromarray((np.arange(32 * 64).reshape(32, 64) * 32).astype(np.uint16)), "PNG"
    ),
    "CMYK": lambda: _encode(_cmyk_image(), "JPEG", quality=95),
    "1": lambda: _encode(PHOTOS["chelsea"].convert("1"), "PNG"),
    "F": lambda: _encode(
        Image.fromarray(np.linspace(-3, 7, 40 * 20, dtype=np.float32).reshape(20, 40)), "TIFF"
    ),
}


@pytest.mark.parametrize("mode", list(MODE_FIXTURES))
def test_every_mode_gives_a_finite_rgb_tensor(mode: str, tmp_path: Path) -> None:
    path = tmp_path / f"image_{mode.replace(';', '_')}.bin"
    path.write_bytes(MODE_FIXTURES[mode]())
    with Image.open(path) as raw:
        assert raw.mode == {"P_transparency": "P"}.get(mode, mode)
    image = load_image(path)
    assert image.mode == "RGB"
    for preset in ("clip", "siglip"):
        _assert_valid_tensor(build_preprocess(preset)(path))


def test_alpha_is_dropped_like_openai_or_composited_on_request() -> None:
    data = _encode(_rgba_image(), "PNG")
    dropped = np.asarray(load_image(data))
    assert (dropped[:, :30, 0] == 200).all() and (dropped[:, :30, 2] == 30).all()  # colour kept under alpha 0
    np.testing.assert_array_equal(dropped, np.asarray(_rgba_image().convert("RGB")))
    on_white = np.asarray(load_image(data, background=(255, 255, 255)))
    assert (on_white[:, :30] == 255).all()  # transparent half becomes the background
    np.testing.assert_array_equal(on_white[:, 30:], dropped[:, 30:])  # opaque half untouched
    palette = np.asarray(
        load_image(_encode(_palette_with_transparency(), "PNG", transparency=3), background=(0, 0, 255))
    )
    transparent = np.asarray(_palette_with_transparency()) == 3
    assert (palette[transparent] == (0, 0, 255)).all()


def test_16_bit_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 32896, 65535, 1000, 30000]], dtype=np.uint16)
    image = load_image(_encode(Image.fromarray(values), "PNG"))
    grey = np.asarray(image)[0, :, 0]
    np.testing.assert_array_equal(grey, np.rint(values[0] / 257).astype(np.uint8))
    assert grey[4] == 4 and grey[5] == 117  # Pillow's convert("RGB") would clip both to 255
    stretched = np.asarray(
        load_image(Image.fromarray(np.array([[100, 4195]], dtype=np.uint16)), bit_depth_scaling="min_max")
    )
    assert stretched[0, 0, 0] == 0 and stretched[0, 1, 0] == 255
    wide_int = np.asarray(
        load_image(Image.fromarray(np.array([[-5, 95, 195]], dtype=np.int32)))
    )  # mode "I", out of range
    assert list(wide_int[0, [0, 2], 0]) == [0, 255] and 127 <= wide_int[0, 1, 0] <= 128


def test_exif_orientation_6_is_applied(tmp_path: Path) -> None:
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)  # 80 wide, 40 tall: red left half, blue right half
    pixels[:, :40] = (255, 0, 0)
    pixels[:, 40:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "phone.jpg"
    Image.fromarray(pixels).save(path, quality=95, exif=exif.tobytes())

    upright = np.asarray(load_image(path)).astype(np.int16)
    assert upright.shape == (80, 40, 3)  # transposed: 40 wide, 80 tall
    expected = np.rot90(pixels, k=-1).astype(np.int16)  # clockwise: the red left half ends on top
    assert np.abs(upright - expected).mean() < 4  # JPEG noise only
    assert upright[:30, :, 0].mean() > 200 and upright[50:, :, 2].mean() > 200
    unrotated = np.asarray(load_image(path, exif_orientation=False))
    assert unrotated.shape == (40, 80, 3)
    _assert_valid_tensor(build_preprocess("siglip")(path))


# ---------------------------------------------------------------------------------------------------------
# broken files and decompression bombs


def test_corrupt_truncated_empty_and_missing_files_raise(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    jpeg = _encode(PHOTOS["astronaut"], "JPEG", quality=90)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(jpeg[: len(jpeg) // 2])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")

    cases = [
        (corrupt, "not an image"),
        (truncated, "truncated"),
        (empty, "empty"),
        (tmp_path / "missing.png", "does not exist"),
        (tmp_path, "not a regular file"),
    ]
    for path, words in cases:
        with pytest.raises(ImageDecodeError, match=words) as caught:
            load_image(path)
        assert str(path) in str(caught.value)
        assert isinstance(caught.value, ValueError)
    with pytest.raises(ImageDecodeError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageDecodeError, match="truncated"):
        build_preprocess("clip")(jpeg[:2000])
    with pytest.raises(ImageDecodeError, match="type int"):
        load_image(42)  # type: ignore[arg-type]
    with pytest.raises(ImageDecodeError, match="URL"):
        load_image("https://example.org/cat.jpg")


def test_decompression_bomb_is_refused_and_pillow_limit_restored(tmp_path: Path) -> None:
    before = Image.MAX_IMAGE_PIXELS
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_declaring(100_000, 100_000))  # 10^10 pixels declared in under 100 bytes
    assert bomb.stat().st_size < 100
    with pytest.raises(ImageDecodeError, match="too large") as caught:
        load_image(bomb)
    message = str(caught.value)
    assert str(bomb) in message and "max_pixels" in message and f"{DEFAULT_MAX_PIXELS:,}" in message
    assert Image.MAX_IMAGE_PIXELS == before

    small = _encode(PHOTOS["chelsea"], "PNG")
    with pytest.raises(ImageDecodeError, match="too large"):
        load_image(small, max_pixels=1000)
    with pytest.raises(ImageDecodeError, match="too large"):
        ImageTransform(PreprocessConfig(), max_pixels=1000)(small)
    assert load_image(small, max_pixels=451 * 300).size == (451, 300)  # the limit is inclusive
    assert Image.MAX_IMAGE_PIXELS == before


def test_own_limit_replaces_pillows_global_which_is_left_as_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # Pillow alone would refuse 451 x 300 (> 2 x 5000)
    data = _encode(PHOTOS["chelsea"], "PNG")
    assert load_image(data).size == (451, 300)
    assert Image.MAX_IMAGE_PIXELS == 5000

    errors: list[BaseException] = []

    def decode_many() -> None:
        try:
            for _ in range(5):
                load_image(data)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=decode_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert Image.MAX_IMAGE_PIXELS == 5000


def test_is_image_file() -> None:
    assert is_image_file("a/b/photo.JPG") and is_image_file(Path("scan.tiff")) and is_image_file("x.webp")
    assert not is_image_file("notes.txt") and not is_image_file("archive.tar.gz") and not is_image_file("jpg")


# ---------------------------------------------------------------------------------------------------------
# PreprocessConfig


def test_config_round_trip_through_json() -> None:
    for config in [
        *PRESETS.values(),
        PreprocessConfig(image_size=336, resize_mode="longest", fill_color=255),
    ]:
        restored = PreprocessConfig.from_dict(json.loads(json.dumps(config.to_dict())))
        assert restored == config
        assert isinstance(restored.mean, tuple)
    assert PreprocessConfig.from_dict({"image_size": 384}).resize_mode == "shortest"


def test_config_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(PreprocessConfigError, match="unknown preprocessing config key.*resize_mod") as caught:
        PreprocessConfig.from_dict({"image_size": 224, "resize_mod": "squash"})
    assert "valid keys" in str(caught.value)
    bad_values = [
        {"image_size": 0},
        {"image_size": 224.0},
        {"resize_mode": "crop"},
        {"interpolation": "cubic"},
        {"crop_pct": 1.5},
        {"crop_pct": 0.0},
        {"mean": (0.5, 0.5)},
        {"std": (0.5, 0.0, 0.5)},
        {"fill_color": 300},
        {"resize_mode": "longest", "crop_pct": 0.9},
    ]
    for values in bad_values:
        with pytest.raises(PreprocessConfigError):
            PreprocessConfig(**values)
    with pytest.raises(PreprocessConfigError, match="known presets"):
        build_preprocess("clipp")
    with pytest.raises(PreprocessConfigError):
        build_preprocess(224)  # type: ignore[arg-type]


def test_presets_hold_the_reference_settings() -> None:
    assert PRESETS["clip"].mean == CLIP_MEAN and PRESETS["clip"].resize_mode == "shortest"
    assert PRESETS["siglip"].mean == (0.5, 0.5, 0.5) and PRESETS["siglip"].resize_mode == "squash"
    assert PRESETS["bioclip"].resize_mode == "squash" and PRESETS["bioclip"].std == CLIP_STD
    assert PRESETS["pubmedclip"].crop_pct == 0.875 and PRESETS["pubmedclip"].mean == IMAGENET_MEAN
    assert (
        PRESETS["pubmedclip"].resize_size == 256
        and PreprocessConfig(image_size=336, crop_pct=0.875).resize_size == 384
    )
    # crop_pct read back from a (crop, shortest edge) pair must give the shortest edge again.
    for crop, shortest in [(224, 232), (9, 14), (384, 438), (224, 224)]:
        assert PreprocessConfig(image_size=crop, crop_pct=crop / shortest).resize_size == shortest
    assert build_preprocess({"image_size": 64, "resize_mode": "squash"})(PHOTOS["coffee"]).shape == (
        3,
        64,
        64,
    )


# ---------------------------------------------------------------------------------------------------------
# augmentations


@pytest.mark.parametrize("size", [(640, 427), (31, 17), (1000, 10), (10, 1000), (224, 224)])
def test_random_resized_crop_stays_inside_the_image(size: tuple[int, int]) -> None:
    width, height = size
    crop = RandomResizedCrop(64, seed=0)
    for _ in range(200):
        top, left, crop_height, crop_width = crop.get_params(width, height)
        assert 0 <= top and 0 <= left and crop_height > 0 and crop_width > 0
        assert top + crop_height <= height and left + crop_width <= width
    image = Image.new("RGB", size)
    assert crop(image).size == (64, 64)
    assert RandomResizedCrop((32, 48), seed=0)(image).size == (48, 32)


def test_random_resized_crop_falls_back_to_a_centred_crop() -> None:
    crop = RandomResizedCrop(32, scale=(0.9, 1.0), ratio=(0.75, 1.333), seed=0)
    # A 1000 x 10 strip: no crop of 90 % of its area has an aspect ratio within 3/4..4/3.
    top, left, crop_height, crop_width = crop.get_params(1000, 10)
    assert (
        (top, crop_height) == (0, 10) and crop_width == round(10 * 1.333) and left == (1000 - crop_width) // 2
    )


def test_random_resized_crop_respects_scale() -> None:
    crop = RandomResizedCrop(32, scale=(0.25, 0.5), seed=3)
    for _ in range(100):
        _, _, crop_height, crop_width = crop.get_params(400, 400)
        assert 0.2 <= crop_height * crop_width / 160_000 <= 0.55  # rounding of the sides only


def test_augmentations_are_deterministic_per_seed() -> None:
    photo = PHOTOS["astronaut"]

    def run(transform_factory, seed):
        transform = transform_factory(seed)
        return [np.asarray(transform(photo)) for _ in range(4)]

    factories = [
        lambda seed: RandomResizedCrop(64, seed=seed),
        lambda seed: RandomCrop(100, padding=8, seed=seed),
        lambda seed: ColorJitter(0.4, 0.4, 0.4, 0.1, seed=seed),
        lambda seed: Compose([RandomResizedCrop(48, seed=seed), RandomHorizontalFlip(0.5, seed=seed + 1)]),
    ]
    for factory in factories:
        first, again, other = run(factory, 7), run(factory, 7), run(factory, 8)
        for a, b in zip(first, again, strict=True):
            np.testing.assert_array_equal(a, b)
        assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))
        assert any(not np.array_equal(first[0], later) for later in first[1:])  # the stream moves on


def test_random_crop_shapes_padding_and_errors() -> None:
    photo = PHOTOS["coffee"]  # 600 x 400
    assert RandomCrop(128, seed=0)(photo).size == (128, 128)
    assert RandomCrop((100, 50), seed=0)(photo).size == (50, 100)
    padded = RandomCrop(416, padding=8, seed=0)(photo)  # 400 + 2 x 8 = 416 rows: only the padding decides
    assert padded.size == (416, 416)
    generator = torch.Generator().manual_seed(5)
    small = Image.new("RGB", (20, 20), (255, 255, 255))
    grown = np.asarray(RandomCrop(30, pad_if_needed=True, fill=0, generator=generator)(small))
    assert grown.shape == (30, 30, 3) and grown.min() == 0 and grown.max() == 255
    with pytest.raises(PreprocessConfigError, match="does not fit"):
        RandomCrop(30)(small)
    with pytest.raises(PreprocessConfigError):
        RandomCrop(10, padding=(1, 2, 3))


def test_flips_flip() -> None:
    photo = PHOTOS["chelsea"]
    pixels = np.asarray(photo)
    np.testing.assert_array_equal(np.asarray(RandomHorizontalFlip(1.0, seed=0)(photo)), pixels[:, ::-1])
    np.testing.assert_array_equal(np.asarray(RandomVerticalFlip(1.0, seed=0)(photo)), pixels[::-1])
    np.testing.assert_array_equal(np.asarray(RandomHorizontalFlip(0.0, seed=0)(photo)), pixels)
    tensor = torch.arange(24.0).view(2, 3, 4)
    torch.testing.assert_close(RandomHorizontalFlip(1.0)(tensor), tensor.flip(-1))
    torch.testing.assert_close(RandomVerticalFlip(1.0)(tensor), tensor.flip(-2))
    flips = RandomHorizontalFlip(0.5, seed=1)
    flipped = sum(not np.array_equal(np.asarray(flips(photo)), pixels) for _ in range(200))
    assert 60 < flipped < 140
    with pytest.raises(PreprocessConfigError):
        RandomHorizontalFlip(1.5)


def test_color_jitter_factors_and_order() -> None:
    grey = Image.new("RGB", (8, 8), (100, 100, 100))
    brighter = np.asarray(ColorJitter(brightness=(2.0, 2.0), seed=0)(grey))
    assert (brighter == 200).all()
    photo = PHOTOS["coffee"].resize((64, 48))
    unchanged = ColorJitter(seed=0)(photo)
    np.testing.assert_array_equal(np.asarray(unchanged), np.asarray(photo))
    rotated = np.asarray(ColorJitter(hue=(0.5, 0.5), seed=0)(Image.new("RGB", (4, 4), (255, 0, 0))))
    assert rotated[0, 0, 0] < 10 and rotated[0, 0, 1] > 245 and rotated[0, 0, 2] > 245  # red -> cyan
    desaturated = np.asarray(ColorJitter(saturation=(0.0, 0.0), seed=0)(photo)).astype(int)
    assert np.abs(desaturated[..., 0] - desaturated[..., 1]).max() <= 1
    jitter = ColorJitter(0.4, 0.4, 0.4, 0.1, seed=0)
    orders = {tuple(jitter.get_params()[0]) for _ in range(50)}
    assert len(orders) > 5 and all(sorted(order) == [0, 1, 2, 3] for order in orders)
    for _ in range(50):
        _, brightness, contrast, saturation, hue = jitter.get_params()
        assert 0.6 <= brightness <= 1.4 and 0.6 <= contrast <= 1.4 and 0.6 <= saturation <= 1.4
        assert -0.1 <= hue <= 0.1
    with pytest.raises(PreprocessConfigError):
        ColorJitter(hue=0.7)
    with pytest.raises(PreprocessConfigError):
        ColorJitter(brightness=-1)


def _seeded_crop(config: PreprocessConfig, seed: int):
    rng = RandomSource(seed=seed)
    steps = [
        RandomResizedCrop(config.image_size, scale=(0.9, 1.0), generator=rng),
        ToNormalizedTensor(config.mean, config.std),
    ]
    return TrainTransform(steps, config, rng)


def test_seeded_random_source_per_worker_and_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    config = PreprocessConfig(image_size=32)
    photo = PHOTOS["astronaut"].resize((128, 128))
    main_process = _seeded_crop(config, seed=100)(photo)

    class FakeWorker:
        id = 3

    import torch.utils.data

    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: FakeWorker())
    in_worker_3 = _seeded_crop(config, seed=100)(photo)
    monkeypatch.undo()
    torch.testing.assert_close(in_worker_3, _seeded_crop(config, seed=103)(photo), rtol=0, atol=0)
    assert not torch.equal(in_worker_3, main_process)

    transform = _seeded_crop(config, seed=100)
    transform.set_epoch(1)
    assert transform.rng.worker_seed(0) == 100 + RandomSource.EPOCH_STRIDE
    assert not torch.equal(transform(photo), main_process)
