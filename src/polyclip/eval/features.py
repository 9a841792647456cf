"""Batched image feature extraction through the model contract's ``encode_image``.

Images are decoded and preprocessed ahead of the model by the core's thread pool
(`polyclip.encode.iter_image_batches`); an image that cannot be decoded is skipped and reported (its
index and the error), never silently dropped. Features come
back as float32 on the CPU, unnormalised: each protocol normalises as its paper does.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from polyclip.encode import MixedShapesError, iter_image_batches
from polyclip.eval.data import ImageSet
from polyclip.eval.errors import EvalError
from polyclip.images import ImageDecodeError
from polyclip.progress import progress_bar

# Decoding failures that mean "this file is not a readable image" (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass
class EncodeConfig:
    batch_size: int = 64
    num_workers: int = min(4, os.cpu_count() or 1)  # decoding threads (Pillow releases the GIL); 0 = 1
    device: str | None = None  # None = the model's device
    text_batch_size: int = 256  # prompts / captions per text forward pass
    progress: bool = False  # a progress bar on a terminal (see `polyclip.progress`)


@dataclass
class EncodedImages:
    features: torch.Tensor  # (N_ok, E) float32, unnormalised
    indices: np.ndarray  # (N_ok,) int64 dataset positions of the rows of ``features``
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (dataset index, reason)


def model_device(model: torch.nn.Module) -> torch.device:
    parameter = next(iter(model.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


@contextlib.contextmanager
def evaluation_mode(model: torch.nn.Module):
    """Eval mode and no gradients for the duration; the model's previous mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _decoder(images: ImageSet, preprocess):
    """index -> (3, H, W) pixels; a failure names the image, as `iter_image_batches` reports it."""

    def decode(index: int) -> torch.Tensor:
        try:
            image = images.load(index)
        except _DECODE_ERRORS as error:
            where, reason = images.describe(index), str(error)
            raise ImageDecodeError(
                reason if where in reason else f"{where}: {type(error).__name__}: {reason}"
            ) from None
        return preprocess(image)

    return decode


def encode_images(model, preprocess, images: ImageSet, config: EncodeConfig | None = None) -> EncodedImages:
    """Encode every readable image of ``images``; unreadable ones are listed in ``skipped``."""
    config = config or EncodeConfig()
    device = torch.device(config.device) if config.device else model_device(model)
    dtype = model_dtype(model)
    batches = iter_image_batches(
        range(len(images)), _decoder(images, preprocess), config.batch_size, max(1, config.num_workers)
    )
    features, indices, skipped = [], [], []
    bar = progress_bar(total=len(images), unit="img", desc="encoding images", enabled=config.progress)
    with evaluation_mode(model), bar:
        try:
            for batch in batches:
                bar.update(len(batch.items) + len(batch.failures))
                skipped += batch.failures
                if not batch.items:
                    continue
                pixels = batch.pixels.to(device=device, dtype=dtype)
                features.append(model.encode_image(pixels, normalize=False).float().cpu())  # (B, E)
                indices += batch.items
        except MixedShapesError as error:  # from a custom preprocess
            raise EvalError(str(error)) from None
    if not features:
        raise EvalError(f"none of the {len(images)} images could be read; first error: {skipped[0][1]}")
    return EncodedImages(torch.cat(features), np.array(indices, dtype=np.int64), skipped)
