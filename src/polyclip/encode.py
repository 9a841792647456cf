"""Batched encoding of images with decoding overlapped with compute.

Images are decoded and preprocessed by a thread pool (Pillow releases the GIL while it decodes and
resizes) a few batches ahead of the model, so the encoder rarely waits. Unreadable images are skipped
and reported, never fatal. The items are file paths, or anything else the ``preprocess`` callable turns
into a tensor (the evaluation datasets pass their indices).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from polyclip.images import ImageDecodeError, is_image_file


class MixedShapesError(ValueError):
    """The preprocessing returned tensors of different shapes for the images of one batch."""


@dataclass
class ImageBatch:
    items: list[Any]  # the items (paths) that decoded, in order
    pixels: torch.Tensor  # (B, 3, H, W)
    failures: list[tuple[Any, str]] = field(default_factory=list)  # (item, reason) of skipped items


def list_images(sources: Iterable[str | os.PathLike]) -> list[str]:
    """Files named directly, plus image files found recursively in folders, sorted per folder."""
    paths: list[str] = []
    for source in sources:
        source = Path(source)
        if source.is_dir():
            paths += sorted(str(p) for p in source.rglob("*") if p.is_file() and is_image_file(p))
        elif source.is_file():
            paths.append(str(source))
        else:
            raise FileNotFoundError(f"{source} does not exist")
    return paths


def _decode(preprocess: Callable, item: Any) -> torch.Tensor | str:
    try:
        return preprocess(item)
    except ImageDecodeError as error:
        return str(error)
    except OSError as error:
        return f"{item}: {error}"


def iter_image_batches(
    items: Sequence[Any],
    preprocess: Callable,
    batch_size: int = 32,
    workers: int | None = None,
    prefetch: int = 2,
) -> Iterator[ImageBatch]:
    """Decoded, preprocessed batches in input order; ``prefetch`` batches are decoded ahead.

    ``preprocess(item)`` returns a (3, H, W) tensor, or raises `ImageDecodeError` (or OSError) for an
    item that cannot be read: that item is listed in the batch's failures.
    """
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="polyclip-decode") as pool:
        pending: deque = deque()
        chunks = (items[i : i + batch_size] for i in range(0, len(items), batch_size))
        for chunk in chunks:
            pending.append((chunk, [pool.submit(_decode, preprocess, item) for item in chunk]))
            if len(pending) <= prefetch:
                continue
            yield _collect(*pending.popleft())
        while pending:
            yield _collect(*pending.popleft())


def _collect(chunk: Sequence[Any], futures) -> ImageBatch:
    decoded, tensors, failures = [], [], []
    for item, future in zip(chunk, futures):
        result = future.result()
        if isinstance(result, str):
            failures.append((item, result))
        else:
            decoded.append(item)
            tensors.append(result)
    shapes = sorted({tuple(tensor.shape) for tensor in tensors})
    if len(shapes) > 1:
        raise MixedShapesError(f"preprocessing returned images of different shapes: {shapes}")
    pixels = torch.stack(tensors) if tensors else torch.zeros(0, 3, 1, 1)
    return ImageBatch(decoded, pixels, failures)


@torch.inference_mode()
def embed_images(
    model,
    preprocess: Callable,
    items: Sequence[Any],
    batch_size: int = 32,
    normalize: bool = True,
    workers: int | None = None,
    overlap: bool | None = None,
) -> Iterator[tuple[list[Any], torch.Tensor, list[tuple[Any, str]]]]:
    """Yields (items that decoded, embeddings (B, E) float32 on CPU, failures) per batch.

    ``overlap`` (default: on for a model on a GPU) keeps one batch in flight: batch k+1 is copied
    (from pinned memory, without blocking) and queued before batch k's embeddings are read back, so
    the copies, the decoding threads and the GPU overlap instead of taking turns.
    """
    device = _model_device(model)
    on_gpu = device is not None and device.type == "cuda"
    overlap = on_gpu if overlap is None else overlap
    in_flight = None  # (items, embeddings on the device, failures)
    for batch in iter_image_batches(items, preprocess, batch_size, workers):
        if batch.items:
            pixels = batch.pixels
            if on_gpu:
                pixels = pixels.pin_memory().to(device, non_blocking=True)
            embeddings = model.encode_image(pixels, normalize=normalize)
        else:
            embeddings = torch.zeros(0, model.config.embed_dim)
        if not overlap:
            yield batch.items, embeddings.float().cpu(), batch.failures
            continue
        if in_flight is not None:
            yield in_flight[0], in_flight[1].float().cpu(), in_flight[2]
        in_flight = (batch.items, embeddings, batch.failures)
    if in_flight is not None:
        yield in_flight[0], in_flight[1].float().cpu(), in_flight[2]


def _model_device(model) -> torch.device | None:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else None
