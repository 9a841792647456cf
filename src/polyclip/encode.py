"""Batched encoding of image files with decoding overlapped with compute.

Images are decoded and preprocessed by a thread pool (Pillow releases the GIL while it decodes and
resizes) a few batches ahead of the model, so the encoder rarely waits. Unreadable files are skipped
and reported, never fatal.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from polyclip.images import ImageDecodeError, is_image_file


@dataclass
class ImageBatch:
    paths: list[str]  # the files that decoded, in order
    pixels: torch.Tensor  # (B, 3, H, W)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of skipped files


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


def _decode(preprocess: Callable, path: str) -> torch.Tensor | str:
    try:
        return preprocess(path)
    except ImageDecodeError as error:
        return str(error)
    except OSError as error:
        return f"{path}: {error}"


def iter_image_batches(
    paths: Sequence[str],
    preprocess: Callable,
    batch_size: int = 32,
    workers: int | None = None,
    prefetch: int = 2,
) -> Iterator[ImageBatch]:
    """Decoded, preprocessed batches in input order; ``prefetch`` batches are decoded ahead."""
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="polyclip-decode") as pool:
        pending: deque = deque()
        chunks = (paths[i : i + batch_size] for i in range(0, len(paths), batch_size))
        for chunk in chunks:
            pending.append((chunk, [pool.submit(_decode, preprocess, p) for p in chunk]))
            if len(pending) <= prefetch:
                continue
            yield _collect(*pending.popleft())
        while pending:
            yield _collect(*pending.popleft())


def _collect(chunk: Sequence[str], futures) -> ImageBatch:
    ok_paths, tensors, failures = [], [], []
    for path, future in zip(chunk, futures):
        result = future.result()
        if isinstance(result, str):
            failures.append((path, result))
        else:
            ok_paths.append(path)
            tensors.append(result)
    pixels = torch.stack(tensors) if tensors else torch.zeros(0, 3, 1, 1)
    return ImageBatch(ok_paths, pixels, failures)


@torch.inference_mode()
def embed_images(
    model,
    preprocess: Callable,
    paths: Sequence[str],
    batch_size: int = 32,
    normalize: bool = True,
    workers: int | None = None,
) -> Iterator[tuple[list[str], torch.Tensor, list[tuple[str, str]]]]:
    """Yields (paths, embeddings (B, E) float32 on CPU, failures) per batch."""
    for batch in iter_image_batches(paths, preprocess, batch_size, workers):
        if batch.paths:
            embeddings = model.encode_image(batch.pixels, normalize=normalize).float().cpu()
        else:
            embeddings = torch.zeros(0, model.config.embed_dim)
        yield batch.paths, embeddings, batch.failures
