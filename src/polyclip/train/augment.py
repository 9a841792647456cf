"""Training augmentations assembled from `polyclip.transforms`' torchvision-compatible pieces.

Resize + random crop and/or random resized crop (or, with neither, the model's own resize and centre
crop), horizontal and vertical flips and colour jitter, then the model's normalisation. Every random number comes from one ``torch.Generator`` that the dataset
re-seeds for each sample from (seed, epoch, sample index): a sample is augmented the same way
whichever data-loader worker decodes it and whether or not the run was resumed in between, so
every worker is seeded for exactly the samples it draws.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from polyclip.train.config import AugmentConfig, TrainConfigError
from polyclip.transforms import (
    INTERPOLATIONS,
    ColorJitter,
    ImageTransform,
    PreprocessConfig,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    RandomSource,
    RandomVerticalFlip,
    ToNormalizedTensor,
    TrainTransform,
)


class _ResizeShortSide:
    """Resize so that the short side is ``size`` (the long side keeps the aspect ratio)."""

    def __init__(self, size: int, interpolation: str) -> None:
        self.size = size
        self.resample = INTERPOLATIONS[interpolation]

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        scale = self.size / min(width, height)
        new_size = (max(self.size, round(width * scale)), max(self.size, round(height * scale)))
        return image.resize(new_size, resample=self.resample)

    def __repr__(self) -> str:
        return f"ResizeShortSide({self.size})"


class _EvalGeometry:
    """The checkpoint's own resize and crop (no randomness), when no random crop is configured."""

    def __init__(self, config: PreprocessConfig) -> None:
        self.transform = ImageTransform(config)

    def __call__(self, image: Image.Image) -> Image.Image:
        return self.transform.resize_and_crop(image)

    def __repr__(self) -> str:
        return f"EvalGeometry({self.transform!r})"


class SeededAugmentation:
    """Decoded RGB image -> (3, S, S) tensor, with its randomness seeded per call."""

    def __init__(
        self,
        pipeline: TrainTransform,
        generator: torch.Generator,
        recipe: tuple[PreprocessConfig, AugmentConfig],
    ) -> None:
        self.pipeline = pipeline
        self.generator = generator
        self.recipe = recipe  # what it was built from

    def __reduce__(self):
        # Rebuilt from its recipe in the receiving process: a torch.Generator cannot be sent to a
        # spawned or forkserver data-loader worker (its state tensor fails to map there).
        return build_train_augmentation, self.recipe

    @property
    def config(self) -> PreprocessConfig:
        return self.pipeline.config

    def __call__(self, image: Image.Image, seed: int) -> torch.Tensor:
        self.generator.manual_seed(seed)
        return self.pipeline(image)  # (3, S, S)

    def __repr__(self) -> str:
        return f"SeededAugmentation({self.pipeline!r})"


def build_train_augmentation(preprocess: PreprocessConfig, augment: AugmentConfig) -> SeededAugmentation:
    """The training pipeline for a model whose evaluation preprocessing is ``preprocess``."""
    generator = torch.Generator()
    rng = RandomSource(generator=generator)
    size = preprocess.image_size
    steps: list[Callable[[Any], Any]] = []
    if augment.random_crop is not None:
        if not 0.0 < augment.random_crop <= 1.0:
            raise TrainConfigError(f"augment.random_crop must be in (0, 1], got {augment.random_crop}")
        steps += [
            _ResizeShortSide(round(size / augment.random_crop), preprocess.interpolation),
            RandomCrop(size, generator=rng),
        ]
    if augment.random_resized_crop is not None:  # after a random crop too, as CLIP-RSICD does
        steps.append(
            RandomResizedCrop(
                size,
                scale=augment.random_resized_crop,
                ratio=augment.aspect_ratio,
                interpolation=preprocess.interpolation,
                generator=rng,
            )
        )
    if not steps:
        steps.append(_EvalGeometry(preprocess))
    if augment.hflip > 0:
        steps.append(RandomHorizontalFlip(augment.hflip, generator=rng))
    if augment.vflip > 0:
        steps.append(RandomVerticalFlip(augment.vflip, generator=rng))
    if augment.color_jitter is not None:
        if len(augment.color_jitter) not in (1, 3, 4):
            raise TrainConfigError(
                "augment.color_jitter takes 1, 3 or 4 numbers (brightness, contrast, saturation[, hue]); "
                f"got {augment.color_jitter}"
            )
        values = augment.color_jitter * 3 if len(augment.color_jitter) == 1 else augment.color_jitter
        steps.append(ColorJitter(*values, generator=rng))
    steps.append(ToNormalizedTensor(preprocess.mean, preprocess.std))
    return SeededAugmentation(TrainTransform(steps, preprocess, rng), generator, (preprocess, augment))
