"""Image preprocessing per checkpoint and training augmentations, written with Pillow, NumPy and torch.

Evaluation preprocessing (`ImageTransform`) reproduces the pipeline each checkpoint format's own
reference runs, to the pixel (tests/test_preprocess_golden.py compares it with the references' outputs):

Geometry (``resize_mode``):

- ``"shortest"``: resize the short side to ``floor(image_size / crop_pct)`` (the long side truncated:
  ``int(size * long / short)``, as torchvision's ``Resize(int)`` and transformers'
  ``get_resize_output_image_size`` both do), then centre-crop ``image_size``.
- ``"squash"``: resize to exactly ``image_size`` x ``image_size`` (``SiglipImageProcessor``, open_clip's
  ``resize_mode="squash"``, pybioclip's ``Resize((224, 224))``).
- ``"longest"``: resize the long side (sizes rounded with ``round()``) and pad to a square with
  ``fill_color``, as open_clip's ``ResizeKeepRatio(longest=1)`` + ``CenterCropOrPad``.
- ``"naflex"``: SigLIP 2's NaFlex (transformers ``Siglip2ImageProcessor``): the aspect ratio is kept; both
  sides are scaled by the largest factor (found by the reference's binary search) for which each side,
  rounded up to a multiple of ``patch_size``, gives at most ``max_num_patches`` patches; the image is cut
  into those patches. The output is not a (3, S, S) image but the NaFlex tower's packed patches
  (``max_num_patches + 1``, P*P*3): see `polyclip.models.naflex`.

Order of operations and rounding (``convention``), which differ between the references:

- ``"torchvision"``: OpenAI CLIP (`clip/clip.py` ``_transform``), open_clip (`transform.py`
  ``image_transform``) and every pipeline built from torchvision's PIL transforms. Pillow resizes the image
  in its decoded mode (a palette image with nearest neighbour, as Pillow does for "P"; images with alpha
  premultiplied), the crop offset is torchvision's ``int(round((H - crop) / 2))`` (half to even), and the
  conversion to RGB comes after the crop, dropping transparency (``Image.convert("RGB")``).
- ``"transformers"``: ``CLIPImageProcessor`` / ``SiglipImageProcessor``: RGB first, transparent pixels
  composited over white (``image_transforms.convert_to_rgb``), then the resize, and a floored crop offset
  ``(H - crop) // 2``. Pillow's resize here equals the ``...Pil`` processors exactly and the default
  torchvision-backend processors within one grey level.
- ``"tensor"``: pybioclip (`src/bioclip/predict.py`): ``convert("RGB")``, ``ToTensor()``, then
  ``Resize(antialias=True)`` of the float tensor, i.e. torch's antialiased interpolation in float without
  rounding back to 8 bits. Only ``bilinear``, ``bicubic`` and ``nearest`` exist there.

Deliberate differences from every reference: an EXIF orientation tag is applied, and greyscale deeper than
8 bits is scaled into 0..255 where Pillow's ``convert`` clips it (see `polyclip.images`).
Rescaling to 0..1 and normalising are done in torch in float32.

Training augmentations follow torchvision's algorithms (``RandomResizedCrop``'s ten attempts and
centre-crop fallback, ``ColorJitter``'s random order of the four adjustments) and draw every random
number from a `RandomSource`: seeded, it gives each data-loader worker the seed ``base_seed + worker_id``
(see `RandomSource`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from polyclip.images import DEFAULT_MAX_PIXELS, ImageSource, load_image, to_rgb
from polyclip.models.naflex import pack_patches

__all__ = [
    "BIOCLIP_PREPROCESS",
    "CLIP_MEAN",
    "CONVENTIONS",
    "FAMILY_PRESETS",
    "FORMAT_CONVENTIONS",
    "CLIP_PREPROCESS",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_PREPROCESS",
    "IMAGENET_STD",
    "INTERPOLATIONS",
    "PRESETS",
    "PUBMEDCLIP_PREPROCESS",
    "RESIZE_MODES",
    "SIGLIP_MEAN",
    "SIGLIP_PREPROCESS",
    "SIGLIP_STD",
    "ColorJitter",
    "Compose",
    "ImageTransform",
    "PreprocessConfig",
    "PreprocessConfigError",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "RandomSource",
    "RandomVerticalFlip",
    "ToNormalizedTensor",
    "TrainTransform",
    "build_preprocess",
    "naflex_size",
]

# OpenAI CLIP's statistics of its training images (clip/clip.py), also used by BioCLIP and open_clip.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# SigLIP maps 0..1 to -1..1 (big_vision `value_range(-1, 1)`).
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

RESIZE_MODES = ("shortest", "squash", "longest", "naflex")
_NAFLEX_FIELDS = ("patch_size", "max_num_patches")  # recorded only with resize_mode "naflex"
# Order of RGB conversion and resize, crop rounding, resize arithmetic (see the module docstring)
CONVENTIONS = ("torchvision", "transformers", "tensor")
# The convention of each checkpoint format's reference loader (OpenAI files: clip.load; open_clip
# folders: open_clip; transformers and Flax folders: their image processors)
FORMAT_CONVENTIONS = {"openai": "torchvision", "open_clip": "torchvision", "hf": "transformers",
                      "flax": "transformers"}  # fmt: skip
_TENSOR_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest"}
INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


class PreprocessConfigError(ValueError):
    """A preprocessing or augmentation setting is invalid."""


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes the (3, image_size, image_size) tensor a checkpoint expects."""

    image_size: int = 224
    resize_mode: str = "shortest"  # one of RESIZE_MODES (see the module docstring)
    interpolation: str = "bicubic"  # a key of INTERPOLATIONS; the CLIP-family references all use bicubic
    # Fraction of the resized image kept by the centre crop: 1.0 resizes straight to image_size;
    # 0.875 resizes to image_size / 0.875 (224 -> 256) first, the classic ImageNet evaluation.
    crop_pct: float = 1.0
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    fill_color: int = 0  # grey level of the padding in "longest" mode
    convention: str = "torchvision"  # one of CONVENTIONS: whose order and rounding (module docstring)
    # resize_mode "naflex" only (0 otherwise): the patch side and the most patches an image may have
    patch_size: int = 0
    max_num_patches: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1:
            raise PreprocessConfigError(f"image_size must be a positive integer, got {self.image_size!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise PreprocessConfigError(
                f"resize_mode must be one of {', '.join(RESIZE_MODES)}; got {self.resize_mode!r}"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise PreprocessConfigError(
                f"interpolation must be one of {', '.join(INTERPOLATIONS)}; got {self.interpolation!r}"
            )
        if self.convention not in CONVENTIONS:
            raise PreprocessConfigError(
                f"convention must be one of {', '.join(CONVENTIONS)}; got {self.convention!r}"
            )
        if self.convention == "tensor" and self.interpolation not in _TENSOR_MODES:
            raise PreprocessConfigError(
                f"convention 'tensor' resizes with torch, which has {', '.join(_TENSOR_MODES)}; "
                f"got {self.interpolation!r}"
            )
        if not isinstance(self.crop_pct, int | float) or not 0.0 < self.crop_pct <= 1.0:
            raise PreprocessConfigError(f"crop_pct must be in (0, 1], got {self.crop_pct!r}")
        if self.resize_mode == "longest" and self.crop_pct != 1.0:
            raise PreprocessConfigError(
                "crop_pct must be 1.0 with resize_mode 'longest' (it pads, never crops)"
            )
        for name in ("mean", "std"):
            value = getattr(self, name)
            try:
                triple = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                raise PreprocessConfigError(f"{name} must be three numbers, got {value!r}") from None
            if len(triple) != 3 or not all(math.isfinite(v) for v in triple):
                raise PreprocessConfigError(f"{name} must be three finite numbers (R, G, B), got {value!r}")
            object.__setattr__(self, name, triple)
        if any(v <= 0 for v in self.std):
            raise PreprocessConfigError(f"std must be positive, got {self.std}")
        if (
            isinstance(self.fill_color, bool)
            or not isinstance(self.fill_color, int)
            or not 0 <= self.fill_color <= 255
        ):
            raise PreprocessConfigError(f"fill_color must be an integer in 0..255, got {self.fill_color!r}")
        object.__setattr__(self, "crop_pct", float(self.crop_pct))
        for name in _NAFLEX_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PreprocessConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if self.resize_mode == "naflex":
            if self.patch_size < 2 or self.max_num_patches < 1:
                raise PreprocessConfigError(
                    "resize_mode 'naflex' needs patch_size >= 2 and max_num_patches >= 1, got "
                    f"{self.patch_size} and {self.max_num_patches}"
                )
            if self.convention == "tensor" or self.crop_pct != 1.0:
                raise PreprocessConfigError("resize_mode 'naflex' resizes with Pillow and never crops")
        elif self.patch_size or self.max_num_patches:
            raise PreprocessConfigError("patch_size and max_num_patches belong to resize_mode 'naflex' only")

    @property
    def resize_size(self) -> int:
        """Target of the resize step before the centre crop: floor(image_size / crop_pct), as timm.

        The small tolerance makes a crop_pct written as ``crop / resize`` (as read from transformers'
        ``crop_size`` / ``shortest_edge``) give ``resize`` back: 224 / (224 / 232) is 231.99999999999997.
        """
        if self.crop_pct == 1.0:
            return self.image_size
        return math.floor(self.image_size / self.crop_pct + 1e-6)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists; the NaFlex fields only for resize_mode "naflex")."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in asdict(self).items()
            if key not in _NAFLEX_FIELDS or self.resize_mode == "naflex"
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        """Inverse of `to_dict`; missing keys take their defaults, unknown keys are an error."""
        if not isinstance(data, dict):
            raise PreprocessConfigError(f"a preprocessing config must be a dict, got {type(data).__name__}")
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PreprocessConfigError(
                f"unknown preprocessing config key(s): {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}"
            )
        return cls(**data)


CLIP_PREPROCESS = PreprocessConfig()
# SigLIP's transformers processor; open_clip's SigLIP folders record their own preprocess_cfg
SIGLIP_PREPROCESS = PreprocessConfig(
    resize_mode="squash", mean=SIGLIP_MEAN, std=SIGLIP_STD, convention="transformers"
)
# pybioclip's preprocess_img: ToTensor(), Resize((224, 224), antialias=True) (bilinear), OpenAI statistics
BIOCLIP_PREPROCESS = PreprocessConfig(resize_mode="squash", interpolation="bilinear", convention="tensor")
# PubMedCLIP's test transform (lib/data_transform/transform_wrapper.py) is torchvision's
# Resize(int(224 / 0.875)) with its default bilinear filter, CenterCrop(224) and ImageNet statistics.
PUBMEDCLIP_PREPROCESS = PreprocessConfig(
    interpolation="bilinear", crop_pct=0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD
)
IMAGENET_PREPROCESS = PreprocessConfig(
    interpolation="bilinear", crop_pct=0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD
)
# Presets that name a model family's statistics and geometry, not one reference's code: loading a
# registry entry with one of them takes the convention of the entry's format (FORMAT_CONVENTIONS).
FAMILY_PRESETS = ("clip", "siglip")
PRESETS: dict[str, PreprocessConfig] = {
    "clip": CLIP_PREPROCESS,
    "siglip": SIGLIP_PREPROCESS,
    "bioclip": BIOCLIP_PREPROCESS,
    "pubmedclip": PUBMEDCLIP_PREPROCESS,
    "imagenet": IMAGENET_PREPROCESS,
}


class ToNormalizedTensor:
    """8-bit RGB PIL image -> (3, H, W) float32, rescaled to 0..1 then (x - mean) / std per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self._stats = (tuple(mean), tuple(std))  # as given, for repr
        self.mean = torch.tensor(tuple(mean), dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(tuple(std), dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            image = to_rgb(image)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # (H, W, 3)
        tensor = pixels.permute(2, 0, 1).to(torch.float32).div_(255.0)  # (3, H, W)
        return self.normalize(tensor)

    def normalize(self, tensor: torch.Tensor) -> torch.Tensor:
        """(3, H, W) float in 0..1 -> (x - mean) / std, in place."""
        return tensor.sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        return f"ToNormalizedTensor(mean={self._stats[0]}, std={self._stats[1]})"


class ImageTransform:
    """Evaluation preprocessing: image (PIL, path, bytes or binary stream) -> (3, S, S) float tensor."""

    def __init__(
        self,
        config: PreprocessConfig | None = None,
        *,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        background: tuple[int, int, int] | None = None,
    ) -> None:
        self._config = config if config is not None else PreprocessConfig()
        if not isinstance(self._config, PreprocessConfig):
            raise PreprocessConfigError(f"config must be a PreprocessConfig, got {type(config).__name__}")
        self.max_pixels = max_pixels  # decompression-bomb limit for encoded input (see load_image)
        # None: the convention's own handling of transparency (dropped; over white for "transformers");
        # a colour composites transparent pixels over it in every convention
        self.background = background
        self.to_tensor = ToNormalizedTensor(self._config.mean, self._config.std)

    @property
    def config(self) -> PreprocessConfig:
        return self._config

    @property
    def image_size(self) -> int:
        return self._config.image_size

    def __call__(self, image: ImageSource) -> torch.Tensor:
        if self._config.resize_mode == "naflex":
            return self._naflex_patches(self.resize_and_crop(image))  # (max_num_patches + 1, P*P*3)
        if self._config.convention == "tensor":
            return self.to_tensor.normalize(self._resize_tensor(self._rgb(self._decode(image))))
        return self.to_tensor(self.resize_and_crop(image))  # (3, S, S)

    def batch(self, images: Iterable[ImageSource]) -> torch.Tensor:
        """Preprocess several images into one (B, 3, S, S) tensor."""
        tensors = [self(image) for image in images]
        if not tensors:
            config = self._config
            if config.resize_mode == "naflex":
                return torch.empty(0, config.max_num_patches + 1, 3 * config.patch_size**2)
            size = config.image_size
            return torch.empty(0, 3, size, size)
        return torch.stack(tensors)

    def resize_and_crop(self, image: ImageSource) -> Image.Image:
        """The geometric part alone: decoded, resized and cropped (or padded) RGB image of S x S pixels.

        For the "tensor" convention, whose resize is in float, this is that result rounded to 8 bits.
        """
        config = self._config
        image = self._decode(image)
        if config.convention == "tensor":
            pixels = self._resize_tensor(self._rgb(image)).mul(255).round_().clamp_(0, 255)
            return Image.fromarray(pixels.to(torch.uint8).permute(1, 2, 0).numpy(), "RGB")
        if config.convention == "transformers":
            image = self._rgb(image)  # RGB first, then the resize (torchvision: the other way round)
        elif image.mode not in _RESIZABLE_MODES:
            image = self._rgb(image)  # modes Pillow cannot resize ("1" is resized by nearest, as Pillow)
        resample = INTERPOLATIONS[config.interpolation]
        size = config.image_size
        if config.resize_mode == "naflex":
            width, height = image.size
            new_height, new_width = naflex_size(height, width, config.patch_size, config.max_num_patches)
            return self._rgb(image.resize((new_width, new_height), resample=resample))
        if config.resize_mode == "longest":
            image = _resize_longest_and_pad(image, size, resample, config.fill_color)
        else:
            target = config.resize_size
            new_size = (
                (target, target)
                if config.resize_mode == "squash"
                else _shortest_edge_size(image.size, target)
            )
            image = image.resize(new_size, resample=resample)
            left, top = _crop_offsets(image.size, size, config.convention)
            image = image.crop((left, top, left + size, top + size))
        return self._rgb(image)

    def _naflex_patches(self, image: Image.Image) -> torch.Tensor:
        """Resized RGB image -> packed patches (max_num_patches + 1, P*P*3), as Siglip2ImageProcessor's
        ``convert_image_to_patches``: patches row-major over the grid, each flattened (row, column, channel)."""
        config, patch = self._config, self._config.patch_size
        pixels = self.to_tensor(image)  # (3, H, W)
        rows, columns = pixels.shape[1] // patch, pixels.shape[2] // patch
        patches = (
            pixels.view(3, rows, patch, columns, patch).permute(1, 3, 2, 4, 0).reshape(rows * columns, -1)
        )  # (h*w, P*P*3)
        return pack_patches(patches, (rows, columns), config.max_num_patches)

    def _decode(self, image: ImageSource) -> Image.Image:
        """Decoded, upright, 8 bits per channel, in the image's own mode."""
        return load_image(image, max_pixels=self.max_pixels, convert_rgb=False)

    def _rgb(self, image: Image.Image) -> Image.Image:
        background = self.background
        if background is None and self._config.convention == "transformers":
            background = (255, 255, 255)
        return to_rgb(image, background=background, exif_orientation=False)

    def _resize_tensor(self, image: Image.Image) -> torch.Tensor:
        """RGB image -> (3, S, S) float in 0..1, resized as torchvision resizes a float tensor."""
        config = self._config
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W)
        tensor = pixels.to(torch.float32).div_(255.0).unsqueeze(0)  # (1, 3, H, W), as ToTensor()
        mode = _TENSOR_MODES[config.interpolation]
        target = config.resize_size
        size = config.image_size
        if config.resize_mode == "longest":
            width, height = image.size
            ratio = max(width, height) / size
            new_width, new_height = max(1, round(width / ratio)), max(1, round(height / ratio))
        elif config.resize_mode == "squash":
            new_width = new_height = target
        else:
            new_width, new_height = _shortest_edge_size(image.size, target)
        antialias = {"antialias": True} if mode != "nearest" else {}
        align = {"align_corners": False} if mode != "nearest" else {}
        tensor = torch.nn.functional.interpolate(
            tensor, size=(new_height, new_width), mode=mode, **antialias, **align
        )
        tensor = tensor[0]  # (3, h, w)
        if config.resize_mode == "longest":
            canvas = torch.full((3, size, size), config.fill_color / 255.0)
            top, left = (size - new_height) // 2, (size - new_width) // 2
            canvas[:, top : top + new_height, left : left + new_width] = tensor
            return canvas
        left, top = _crop_offsets((new_width, new_height), size, "torchvision")
        return tensor[:, top : top + size, left : left + size].contiguous()

    def __repr__(self) -> str:
        c = self._config
        return (
            f"ImageTransform(image_size={c.image_size}, resize_mode={c.resize_mode!r}, "
            f"interpolation={c.interpolation!r}, crop_pct={c.crop_pct}, mean={c.mean}, std={c.std}, "
            f"fill_color={c.fill_color}, convention={c.convention!r})"
        )


# Modes Pillow resizes with every filter (others are converted to RGB first)
_RESIZABLE_MODES = frozenset(
    {"L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "1"}
)


def build_preprocess(config_or_name: PreprocessConfig | dict[str, Any] | str) -> ImageTransform:
    """An `ImageTransform` from a config, its dict form, or a preset name (a key of PRESETS)."""
    if isinstance(config_or_name, PreprocessConfig):
        return ImageTransform(config_or_name)
    if isinstance(config_or_name, dict):
        return ImageTransform(PreprocessConfig.from_dict(config_or_name))
    if isinstance(config_or_name, str):
        if config_or_name not in PRESETS:
            raise PreprocessConfigError(
                f"unknown preprocessing preset {config_or_name!r}; known presets: {', '.join(PRESETS)}"
            )
        return ImageTransform(PRESETS[config_or_name])
    raise PreprocessConfigError(
        "build_preprocess takes a PreprocessConfig, a dict or a preset name; "
        f"got {type(config_or_name).__name__}"
    )


def naflex_size(height: int, width: int, patch_size: int, max_num_patches: int) -> tuple[int, int]:
    """(height, width) of SigLIP 2's NaFlex resize: the largest scale whose sides, each rounded up to a
    multiple of ``patch_size`` (at least one patch), make at most ``max_num_patches`` patches.

    The scale is found by the reference's bisection over [1e-6, 100] down to an interval of 1e-5
    (transformers ``get_image_size_for_max_num_patches``), so that sizes agree with it to the pixel.
    """

    def side(scale: float, size: int) -> int:
        return max(patch_size, math.ceil(size * scale / patch_size) * patch_size)

    low, high, eps = 1e-6, 100.0, 1e-5
    while high - low >= eps:
        scale = (low + high) / 2
        if (side(scale, height) / patch_size) * (side(scale, width) / patch_size) <= max_num_patches:
            low = scale
        else:
            high = scale
    return side(low, height), side(low, width)


def _shortest_edge_size(size: tuple[int, int], target: int) -> tuple[int, int]:
    """(width, height) with the short side at ``target`` and the long side truncated (torchvision and
    transformers alike)."""
    width, height = size
    if width <= height:
        return target, int(target * height / width)
    return int(target * width / height), target


def _crop_offsets(size: tuple[int, int], crop: int, convention: str) -> tuple[int, int]:
    """(left, top) of a centred ``crop`` x ``crop`` box in a (width, height) image (both sides >= crop).

    torchvision's ``center_crop`` rounds ``(H - crop) / 2`` half to even (``int(round(...))``), which is one
    pixel more than transformers' ``(H - crop) // 2`` when ``H - crop`` is 3 modulo 4 (a 640 x 427 photo
    resized to 335 x 224 is cropped from x = 56 by OpenAI CLIP and open_clip, from x = 55 by transformers).
    """
    width, height = size
    if convention == "transformers":
        return (width - crop) // 2, (height - crop) // 2
    return int(round((width - crop) / 2.0)), int(round((height - crop) / 2.0))


def _resize_longest_and_pad(
    image: Image.Image, size: int, resample: Image.Resampling, fill_color: int
) -> Image.Image:
    """Long side to ``size`` (open_clip rounds with round()), pasted centred on a ``fill_color`` square of
    the image's own mode (torchvision pads before the conversion to RGB)."""
    width, height = image.size
    ratio = max(width, height) / size
    new_width, new_height = max(1, round(width / ratio)), max(1, round(height / ratio))
    resized = image.resize((new_width, new_height), resample=resample)
    bands = len(resized.getbands())
    canvas = Image.new(resized.mode, (size, size), fill_color if bands == 1 else (fill_color,) * bands)
    if resized.mode == "P":
        canvas.putpalette(resized.getpalette())
        if "transparency" in resized.info:
            canvas.info["transparency"] = resized.info["transparency"]
    canvas.paste(resized, ((size - new_width) // 2, (size - new_height) // 2))
    return canvas


# ---------------------------------------------------------------------------------------------------------
# Training augmentations


class RandomSource:
    """Where augmentations draw their random numbers.

    - ``seed`` given: a private ``torch.Generator`` seeded with ``seed + worker_id`` in each data-loader
      worker (``seed`` in the main process), re-created whenever the process, the worker or the epoch
      changes. Workers that are started anew each epoch (``persistent_workers=False``) would replay the
      same augmentations every epoch; call ``set_epoch(epoch)`` before each epoch to move every worker's
      seed to ``seed + worker_id + EPOCH_STRIDE * epoch``.
    - ``generator`` given: that generator is used as it is.
    - neither: torch's global generator, which the DataLoader already seeds differently per worker.
    """

    EPOCH_STRIDE = 1_000_003  # larger than any worker count, so (worker, epoch) pairs never share a seed

    def __init__(self, seed: int | None = None, generator: torch.Generator | None = None) -> None:
        if seed is not None and generator is not None:
            raise PreprocessConfigError("give either a seed or a generator, not both")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise PreprocessConfigError(f"seed must be a non-negative integer, got {seed!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise PreprocessConfigError(
                f"generator must be a torch.Generator, got {type(generator).__name__}"
            )
        self.seed = seed
        self.epoch = 0
        self._generator = generator
        self._seeded_for: tuple[int, int, int] | None = None  # (process id, worker id, epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def worker_seed(self, worker_id: int) -> int:
        assert self.seed is not None
        return self.seed + worker_id + self.EPOCH_STRIDE * self.epoch

    @property
    def generator(self) -> torch.Generator | None:
        if self.seed is None:
            return self._generator
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker is not None else 0
        key = (os.getpid(), worker_id, self.epoch)
        if key != self._seeded_for:
            self._generator = torch.Generator().manual_seed(self.worker_seed(worker_id))
            self._seeded_for = key
        return self._generator

    def uniform(self, low: float, high: float) -> float:
        return float(torch.empty(1).uniform_(low, high, generator=self.generator))

    def randint(self, low: int, high: int) -> int:
        """An integer in [low, high)."""
        return int(torch.randint(low, high, (1,), generator=self.generator))

    def random(self) -> float:
        return float(torch.rand(1, generator=self.generator))

    def permutation(self, n: int) -> list[int]:
        return torch.randperm(n, generator=self.generator).tolist()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self.seed is not None:  # re-created from the seed in the receiving process
            state["_generator"], state["_seeded_for"] = None, None
        return state

    def __repr__(self) -> str:
        if self.seed is not None:
            return f"RandomSource(seed={self.seed}, epoch={self.epoch})"
        return "RandomSource(generator)" if self._generator is not None else "RandomSource(torch global)"


def _random_source(generator: torch.Generator | RandomSource | None, seed: int | None) -> RandomSource:
    if isinstance(generator, RandomSource):
        if seed is not None:
            raise PreprocessConfigError("give either a seed or a generator, not both")
        return generator
    return RandomSource(seed=seed, generator=generator)


def _pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    """An int or (height, width) -> (height, width) of positive ints."""
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise PreprocessConfigError(f"{name} must be a positive int or (height, width), got {size!r}")
    return pair  # type: ignore[return-value]


def _resampling(interpolation: str) -> Image.Resampling:
    if interpolation not in INTERPOLATIONS:
        raise PreprocessConfigError(
            f"interpolation must be one of {', '.join(INTERPOLATIONS)}; got {interpolation!r}"
        )
    return INTERPOLATIONS[interpolation]


class Compose:
    """Apply transforms one after the other."""

    def __init__(self, transforms: Sequence[Callable[[Any], Any]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Any) -> Any:
        for transform in self.transforms:
            image = transform(image)
        return image

    def __repr__(self) -> str:
        lines = "".join(f"\n    {transform!r}," for transform in self.transforms)
        return f"{type(self).__name__}([{lines}\n])"


class RandomResizedCrop:
    """Crop a random area and aspect ratio, then resize to ``size`` (torchvision's algorithm).

    Ten tries draw an area fraction uniformly from ``scale`` and an aspect ratio (width / height)
    log-uniformly from ``ratio``; the first crop that fits is taken at a uniform position. If none fits, the
    largest centred crop whose aspect ratio is clamped into ``ratio`` is used.
    """

    ATTEMPTS = 10

    def __init__(
        self,
        size: int | Sequence[int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: str = "bilinear",
        generator: torch.Generator | RandomSource | None = None,
        seed: int | None = None,
    ) -> None:
        self.size = _pair(size, "size")  # (height, width)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise PreprocessConfigError(f"scale must be (min, max) with 0 < min <= max, got {scale!r}")
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise PreprocessConfigError(f"ratio must be (min, max) with 0 < min <= max, got {ratio!r}")
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.interpolation = interpolation
        self.resample = _resampling(interpolation)
        self.rng = _random_source(generator, seed)

    def get_params(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(top, left, crop_height, crop_width) of a crop inside a width x height image."""
        area = width * height
        log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(self.ATTEMPTS):
            target_area = area * self.rng.uniform(*self.scale)
            aspect = math.exp(self.rng.uniform(log_low, log_high))
            crop_width = int(round(math.sqrt(target_area * aspect)))
            crop_height = int(round(math.sqrt(target_area / aspect)))
            if 0 < crop_width <= width and 0 < crop_height <= height:
                top = self.rng.randint(0, height - crop_height + 1)
                left = self.rng.randint(0, width - crop_width + 1)
                return top, left, crop_height, crop_width
        image_ratio = width / height
        if image_ratio < self.ratio[0]:
            crop_width, crop_height = width, int(round(width / self.ratio[0]))
        elif image_ratio > self.ratio[1]:
            crop_width, crop_height = int(round(height * self.ratio[1])), height
        else:
            crop_width, crop_height = width, height
        return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width

    def __call__(self, image: Image.Image) -> Image.Image:
        top, left, crop_height, crop_width = self.get_params(*image.size)
        crop = image.crop((left, top, left + crop_width, top + crop_height))
        return crop.resize((self.size[1], self.size[0]), resample=self.resample)

    def __repr__(self) -> str:
        return (
            f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
            f"interpolation={self.interpolation!r})"
        )


class RandomCrop:
    """Pad (optionally), then crop ``size`` at a uniformly random position (torchvision's RandomCrop).

    ``padding``: one int for all sides, (left/right, top/bottom) or (left, top, right, bottom).
    """

    def __init__(
        self,
        size: int | Sequence[int],
        padding: int | Sequence[int] = 0,
        pad_if_needed: bool = False,
        fill: int = 0,
        generator: torch.Generator | RandomSource | None = None,
        seed: int | None = None,
    ) -> None:
        self.size = _pair(size, "size")  # (height, width)
        pads = (padding,) * 4 if isinstance(padding, int) else tuple(padding)
        if len(pads) == 2:
            pads = (pads[0], pads[1], pads[0], pads[1])
        if len(pads) != 4 or not all(isinstance(p, int) and p >= 0 for p in pads):
            raise PreprocessConfigError(
                f"padding must be a non-negative int, (left/right, top/bottom) or (left, top, right, bottom); "
                f"got {padding!r}"
            )
        self.padding = pads  # (left, top, right, bottom)
        self.pad_if_needed = pad_if_needed
        self.fill = fill
        self.rng = _random_source(generator, seed)

    def __call__(self, image: Image.Image) -> Image.Image:
        if any(self.padding):
            image = ImageOps.expand(image, border=self.padding, fill=self.fill)
        crop_height, crop_width = self.size
        width, height = image.size
        if self.pad_if_needed and (width < crop_width or height < crop_height):
            extra_w, extra_h = max(0, crop_width - width), max(0, crop_height - height)
            image = ImageOps.expand(image, border=(extra_w, extra_h, extra_w, extra_h), fill=self.fill)
            width, height = image.size
        if width < crop_width or height < crop_height:
            raise PreprocessConfigError(
                f"RandomCrop of {crop_height} x {crop_width} (height x width) does not fit a {height} x {width} "
                "image; add padding or pad_if_needed=True"
            )
        if (width, height) == (crop_width, crop_height):
            return image
        top = self.rng.randint(0, height - crop_height + 1)
        left = self.rng.randint(0, width - crop_width + 1)
        return image.crop((left, top, left + crop_width, top + crop_height))

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size}, padding={self.padding}, pad_if_needed={self.pad_if_needed})"


class _RandomFlip:
    """Flip with probability ``p``; PIL images and (..., H, W) tensors."""

    def __init__(
        self, p: float = 0.5, generator: torch.Generator | RandomSource | None = None, seed: int | None = None
    ) -> None:
        if not 0.0 <= p <= 1.0:
            raise PreprocessConfigError(f"flip probability must be in [0, 1], got {p!r}")
        self.p = float(p)
        self.rng = _random_source(generator, seed)

    def __call__(self, image: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        if self.rng.random() >= self.p:
            return image
        if isinstance(image, torch.Tensor):
            return image.flip(self._tensor_dim)
        return image.transpose(self._pil_method)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


class RandomHorizontalFlip(_RandomFlip):
    _tensor_dim = -1
    _pil_method = Image.Transpose.FLIP_LEFT_RIGHT


class RandomVerticalFlip(_RandomFlip):
    _tensor_dim = -2
    _pil_method = Image.Transpose.FLIP_TOP_BOTTOM


class ColorJitter:
    """Random brightness, contrast, saturation and hue, applied in a random order (torchvision's ColorJitter).

    Each of brightness, contrast and saturation is a number ``x`` (factor drawn from [max(0, 1 - x), 1 + x])
    or a (min, max) range of factors; hue is ``h`` in [0, 0.5] (shift drawn from [-h, h] of a full turn) or a
    (min, max) range inside [-0.5, 0.5]. Brightness blends with black, contrast with the mean grey level,
    saturation with the greyscale image (Pillow's ImageEnhance, as torchvision's PIL backend); hue rotates
    the H channel of HSV.
    """

    def __init__(
        self,
        brightness: float | tuple[float, float] = 0.0,
        contrast: float | tuple[float, float] = 0.0,
        saturation: float | tuple[float, float] = 0.0,
        hue: float | tuple[float, float] = 0.0,
        generator: torch.Generator | RandomSource | None = None,
        seed: int | None = None,
    ) -> None:
        self.brightness = _factor_range(brightness, "brightness", center=1.0, bounds=(0.0, math.inf))
        self.contrast = _factor_range(contrast, "contrast", center=1.0, bounds=(0.0, math.inf))
        self.saturation = _factor_range(saturation, "saturation", center=1.0, bounds=(0.0, math.inf))
        self.hue = _factor_range(hue, "hue", center=0.0, bounds=(-0.5, 0.5))
        self.rng = _random_source(generator, seed)

    def get_params(self) -> tuple[list[int], float | None, float | None, float | None, float | None]:
        """(order of the four adjustments, brightness, contrast, saturation, hue factors or None)."""
        order = self.rng.permutation(4)
        factors = [
            self.rng.uniform(*bounds) if bounds is not None else None
            for bounds in (self.brightness, self.contrast, self.saturation, self.hue)
        ]
        return order, *factors  # type: ignore[return-value]

    def __call__(self, image: Image.Image) -> Image.Image:
        if image.mode != "RGB":
            image = to_rgb(image)
        order, *factors = self.get_params()
        adjust = (_adjust_brightness, _adjust_contrast, _adjust_saturation, _adjust_hue)
        for index in order:
            if factors[index] is not None:
                image = adjust[index](image, factors[index])
        return image

    def __repr__(self) -> str:
        return (
            f"ColorJitter(brightness={self.brightness}, contrast={self.contrast}, "
            f"saturation={self.saturation}, hue={self.hue})"
        )


def _factor_range(
    value: float | tuple[float, float], name: str, center: float, bounds: tuple[float, float]
) -> tuple[float, float] | None:
    """A jitter setting -> (low, high) range of factors, or None when it would change nothing."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise PreprocessConfigError(f"{name} must be non-negative, got {value}")
        low, high = center - value, center + value
        if name != "hue":
            low = max(low, 0.0)
    elif isinstance(value, Sequence) and len(value) == 2:
        low, high = float(value[0]), float(value[1])
    else:
        raise PreprocessConfigError(f"{name} must be a number or a (min, max) pair, got {value!r}")
    if not bounds[0] <= low <= high <= bounds[1]:
        raise PreprocessConfigError(f"{name} range {(low, high)} must lie inside {bounds} with min <= max")
    return None if low == high == center else (low, high)


def _adjust_brightness(image: Image.Image, factor: float) -> Image.Image:
    return ImageEnhance.Brightness(image).enhance(factor)


def _adjust_contrast(image: Image.Image, factor: float) -> Image.Image:
    return ImageEnhance.Contrast(image).enhance(factor)


def _adjust_saturation(image: Image.Image, factor: float) -> Image.Image:
    return ImageEnhance.Color(image).enhance(factor)


def _adjust_hue(image: Image.Image, shift: float) -> Image.Image:
    """Rotate hue by ``shift`` of a full turn (-0.5..0.5); H is stored in 0..255 in Pillow's HSV."""
    hue, saturation, value = image.convert("HSV").split()
    rotated = (np.asarray(hue, dtype=np.int16) + int(round(shift * 255))) % 256  # wraps around the circle
    hue = Image.fromarray(rotated.astype(np.uint8), "L")
    return Image.merge("HSV", (hue, saturation, value)).convert("RGB")


class TrainTransform(Compose):
    """A training pipeline with its preprocessing config and one shared `RandomSource`."""

    def __init__(
        self, transforms: Sequence[Callable[[Any], Any]], config: PreprocessConfig, rng: RandomSource
    ):
        super().__init__(transforms)
        self.config = config
        self.rng = rng

    def set_epoch(self, epoch: int) -> None:
        """Move seeded augmentation streams to ``epoch`` (see `RandomSource`)."""
        self.rng.set_epoch(epoch)
