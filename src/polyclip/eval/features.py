"""Batched image feature extraction through the model contract's ``encode_image``.

Images are decoded and preprocessed in DataLoader worker processes; an image that cannot be
decoded is skipped and reported (its index and the error), never silently dropped. Features come
back as float32 on the CPU, unnormalised: each protocol normalises as its paper does.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from polyclip.eval.data import ImageSet
from polyclip.eval.errors import EvalError

# Decoding failures that mean "this file is not a readable image" (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass
class EncodeConfig:
    batch_size: int = 64
    num_workers: int = min(4, os.cpu_count() or 1)  # decoding processes; 0 decodes in this process
    device: str | None = None  # None = the model's device
    text_batch_size: int = 256  # prompts / captions per text forward pass


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


class _DecodedImages(torch.utils.data.Dataset):
    def __init__(self, images: ImageSet, preprocess) -> None:
        self.images = images
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        try:
            image = self.images.load(index)
        except _DECODE_ERRORS as error:
            where, reason = self.images.describe(index), str(error)
            return index, None, reason if where in reason else f"{where}: {type(error).__name__}: {reason}"
        return index, self.preprocess(image), None


def _collate(batch):
    indices = [index for index, pixels, _ in batch if pixels is not None]
    tensors = [pixels for _, pixels, _ in batch if pixels is not None]
    skipped = [(index, reason) for index, pixels, reason in batch if pixels is None]
    if tensors and len({tuple(t.shape) for t in tensors}) > 1:
        raise EvalError(
            f"preprocessing returned images of different shapes: {sorted({tuple(t.shape) for t in tensors})}"
        )
    return indices, (torch.stack(tensors) if tensors else None), skipped


def encode_images(model, preprocess, images: ImageSet, config: EncodeConfig | None = None) -> EncodedImages:
    """Encode every readable image of ``images``; unreadable ones are listed in ``skipped``."""
    config = config or EncodeConfig()
    device = torch.device(config.device) if config.device else model_device(model)
    dtype = model_dtype(model)
    loader = torch.utils.data.DataLoader(
        _DecodedImages(images, preprocess),
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        collate_fn=_collate,
        shuffle=False,
    )
    features, indices, skipped = [], [], []
    with evaluation_mode(model):
        for batch_indices, pixels, batch_skipped in loader:
            skipped += batch_skipped
            if pixels is None:
                continue
            embeddings = model.encode_image(pixels.to(device=device, dtype=dtype), normalize=False)  # (B, E)
            features.append(embeddings.float().cpu())
            indices += batch_indices
    if not features:
        raise EvalError(f"none of the {len(images)} images could be read; first error: {skipped[0][1]}")
    return EncodedImages(torch.cat(features), np.array(indices, dtype=np.int64), skipped)
