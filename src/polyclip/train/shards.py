"""Webdataset tar shards, streamed and split across ranks and data-loader workers.

A shard is a tar file whose members are grouped into samples by their name up to the first dot
(the webdataset convention): ``000123.jpg`` + ``000123.txt`` (a caption) or ``000123.json``
(``{"caption": ...}``, ``{"captions": [...]}``, or one key per text type). Images are any extension
Pillow decodes.

Splitting: with at least as many shards as streams (ranks x workers), stream ``s`` reads shards
``s, s + S, ...``; with fewer, every stream reads every shard and keeps samples ``s, s + S, ...``.
Each stream is endless: it reads its shards again and again, reshuffling the shard order and the
samples (a seeded buffer) on every pass, so every rank sees the same number of batches per epoch
(``samples_per_epoch / batch_size``) and no rank waits for another at the end.

Streams batch their own samples, and the data loader takes batches from its workers in turn
(batch ``j`` from worker ``j mod K``), so after ``n`` batches worker ``w`` has produced exactly
``len(range(w, n, K))`` of them. Resuming skips that many batches' samples in each worker without
decoding their images (and rotates the workers' roles, since the loader starts again at worker 0),
which reproduces the uninterrupted run as long as the number of workers is the same.
"""

from __future__ import annotations

import glob
import itertools
import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from polyclip.images import ImageDecodeError, is_image_file, load_image
from polyclip.train.data import Batch, DataError, sample_seed

_SHUFFLE_SALT, _PASS_SALT, _AUGMENT_SALT, _TEXT_SALT = 53, 59, 61, 67
_TEXT_EXTENSIONS = ("txt", "text", "caption")


def expand_shards(spec: str) -> list[str]:
    """Shard paths from a folder, a glob, or a brace range (``data-{000..099}.tar``), sorted."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if match:
        first, last = match.group(1), match.group(2)
        width = len(first)
        names = [
            spec[: match.start()] + str(n).zfill(width) + spec[match.end() :]
            for n in range(int(first), int(last) + 1)
        ]
        paths = [p for name in names for p in expand_shards(name)] if "{" in spec[match.end() :] else names
    elif Path(spec).is_dir():
        paths = sorted(str(p) for p in Path(spec).glob("*.tar"))
    elif any(ch in spec for ch in "*?["):
        paths = sorted(glob.glob(spec))
    else:
        paths = [spec]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise DataError(f"{len(missing)} shard(s) of {spec!r} do not exist, e.g. {missing[0]}")
    if not paths:
        raise DataError(f"no tar shards match {spec!r}: the dataset is empty")
    return paths


def _samples_in(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of one tar, in file order."""
    current, parts = None, {}
    try:
        with tarfile.open(path, "r|*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                name = Path(member.name).name
                key, _, extension = name.partition(".")
                if key != current and parts:
                    yield f"{path}:{current}", parts
                    parts = {}
                current = key
                handle = archive.extractfile(member)
                parts[extension.lower()] = handle.read() if handle is not None else b""
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DataError(f"cannot read shard {path}: {error}") from error
    if parts:
        yield f"{path}:{current}", parts


def count_samples(paths: list[str]) -> int:
    """Samples (distinct keys) in the shards, from the tar headers alone."""
    total = 0
    for path in paths:
        keys = set()
        try:
            with tarfile.open(path, "r|*") as archive:
                for member in archive:
                    if member.isfile():
                        keys.add(Path(member.name).name.partition(".")[0])
        except (tarfile.TarError, OSError, EOFError) as error:
            raise DataError(f"cannot read shard {path}: {error}") from error
        total += len(keys)
    return total


def _image_bytes(parts: dict[str, bytes]) -> bytes | None:
    for extension, data in parts.items():
        if is_image_file(f"x.{extension.rsplit('.', 1)[-1]}"):
            return data
    return None


def _captions(parts: dict[str, bytes], text_types: tuple[str, ...]) -> dict[str, list[str]] | list[str]:
    if "json" in parts:
        record = json.loads(parts["json"].decode("utf-8"))
        if text_types:
            return {kind: [str(record[kind])] for kind in text_types}
        for key in ("captions", "caption", "text", "title"):
            if key in record:
                value = record[key]
                return [str(v) for v in value] if isinstance(value, list) else [str(value)]
        raise ValueError(f"its json has none of captions, caption, text, title: {sorted(record)}")
    for extension in _TEXT_EXTENSIONS:
        if extension in parts:
            return [parts[extension].decode("utf-8").strip()]
    raise ValueError(f"no caption member (.txt or .json) among {sorted(parts)}")


class ShardStream(torch.utils.data.IterableDataset):
    """Endless batches of one rank's share of the shards; see the module docstring."""

    def __init__(
        self, shards: list[str], augmentation, tokenizer, local_batch: int, rank: int, world_size: int,
        seed: int, epoch: int, skip_batches: int = 0, shuffle_buffer: int = 1000,
        text_types: tuple[str, ...] = (), max_bad_in_a_row: int = 50,
    ) -> None:  # fmt: skip
        super().__init__()
        self.shards, self.augmentation, self.tokenizer = shards, augmentation, tokenizer
        self.local_batch, self.rank, self.world_size = local_batch, rank, world_size
        self.seed, self.epoch, self.skip_batches = seed, epoch, skip_batches
        self.shuffle_buffer, self.text_types, self.max_bad_in_a_row = (
            shuffle_buffer,
            text_types,
            max_bad_in_a_row,
        )

    def _stream(self, worker: int, num_workers: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        streams = self.world_size * num_workers
        slot = self.rank * num_workers + worker
        for repetition in itertools.count():
            rng = np.random.default_rng(sample_seed(self.seed, _PASS_SALT, self.epoch, slot, repetition))
            if len(self.shards) >= streams:
                mine = self.shards[slot::streams]
                samples = (s for path in rng.permutation(mine).tolist() for s in _samples_in(path))
            else:
                every = (s for path in self.shards for s in _samples_in(path))
                samples = (s for n, s in enumerate(every) if n % streams == slot)
            yielded = False
            for sample in _shuffled(samples, self.shuffle_buffer, rng):
                yielded = True
                yield sample
            if not yielded:
                raise DataError(f"stream {slot} of the shards {self.shards[0]}... holds no samples")

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The loader asks worker 0 first, so after a resume at batch n worker p continues the stream that
        # worker (p + n) mod K had in the uninterrupted run.
        worker = (physical + self.skip_batches) % num_workers
        produced = len(range(worker, self.skip_batches, num_workers))  # batches before the resume point
        samples = self._stream(worker, num_workers)
        for _ in range(produced * self.local_batch):  # skipped without decoding
            next(samples)
        batch_number = produced
        while True:
            pixels, texts, skipped, bad = [], [], [], 0
            global_batch = worker + batch_number * num_workers
            kind = (
                self.text_types[
                    sample_seed(self.seed, _TEXT_SALT, self.epoch, global_batch) % len(self.text_types)
                ]
                if self.text_types
                else None
            )
            while len(pixels) < self.local_batch:
                key, parts = next(samples)
                try:
                    data = _image_bytes(parts)
                    if data is None:
                        raise ImageDecodeError(f"no image member among {sorted(parts)}")
                    image = load_image(data)
                    captions = _captions(parts, self.text_types)
                except (ImageDecodeError, ValueError, UnicodeDecodeError) as error:
                    skipped.append(f"{key}: {error}")
                    bad += 1
                    if bad > self.max_bad_in_a_row:
                        raise DataError(
                            f"{bad} unreadable samples in a row; the last: {skipped[-1]}"
                        ) from None
                    continue
                bad = 0
                seed = sample_seed(self.seed, _AUGMENT_SALT, self.epoch, global_batch, len(pixels))
                pixels.append(self.augmentation(image, seed))
                chosen = captions[kind] if kind is not None else captions
                texts.append(chosen[seed % len(chosen)])
            batch_number += 1
            yield Batch(torch.stack(pixels), self.tokenizer(texts), skipped, kind)


def _shuffled(samples: Iterator, buffer_size: int, rng: np.random.Generator) -> Iterator:
    """Reservoir-style shuffle: fill a buffer, then emit a random element for each new one."""
    if buffer_size <= 1:
        yield from samples
        return
    buffer = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        position = int(rng.integers(len(buffer)))
        buffer[position], sample = sample, buffer[position]
        yield sample
    rng.shuffle(buffer)
    yield from buffer
