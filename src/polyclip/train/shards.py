"""Webdataset tar shards, streamed so that every sample is read exactly once per epoch, whatever the
numbers of shards, ranks and data-loader workers.

Reading is the ``webdataset`` library's: its tar iterator and ``group_by_keys`` (members grouped into
samples by their path up to the first dot of the file name: ``000123.jpg`` + ``000123.txt`` (a
caption) or ``000123.json`` (``{"caption": ...}``, ``{"captions": [...]}``, or one key per text
type)), and ``braceexpand`` for ``data-{000..099}.tar``. Images are any extension Pillow decodes.

Splitting. webdataset's own ``split_by_node`` / ``split_by_worker`` hand out whole shards, which reads
every sample exactly once only when the streams (ranks x workers) divide the shards and the shards
are of equal size: 6 shards on 4 streams read 16 of 96 samples twice per epoch and 16 never. Here the
split is by samples instead. The samples are counted once from the tar headers (`shard_sizes`,
which seeks past the data). Epoch ``e`` lays the shards out in an order seeded by ``e`` (the same on
every rank and worker) and numbers their samples ``0 .. N-1``; one epoch uses the first
``steps * batch_size`` of them, counted from a seeded starting number (cyclically), so the samples
left over when the batches do not divide the data (as in the record sampler) change every epoch. The
data loader takes batch ``j`` of a rank from worker ``j mod K``, so worker ``w`` of rank ``r`` needs
``len(range(w, steps, K)) * local_batch`` samples: each (rank, worker) stream gets that many
consecutive numbers, streams in (rank, worker) order. A stream therefore reads only the shards its
range touches, and a shard split between two streams is read by both, each keeping its part.
With ``data.samples_per_epoch`` set, epochs are consecutive windows of one endless sequence of
passes instead (pass ``p`` in the order seeded by ``p``), so small epochs walk through the data.

Each stream mixes its range with a seeded shuffle buffer. An unreadable sample is counted and its
slot filled by another sample of the same batch (or, if the whole batch is unreadable, by the
stream's next readable sample), so a batch always consumes exactly ``local_batch`` numbers: a resume
at batch ``n`` skips ``len(range(w, n, K)) * local_batch`` samples of each stream without decoding
them, and rotates the workers' roles (the loader starts again at worker 0), which reproduces the
uninterrupted run. The ranges depend on the number of workers and ranks, so the trainer refuses to
resume mid-epoch with another ``data.num_workers`` or number of processes (at an epoch boundary
either may change).
"""

from __future__ import annotations

import collections
import glob
import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from polyclip.images import ImageDecodeError, is_image_file, load_image
from polyclip.train.data import Batch, DataError, sample_seed

_SHUFFLE_SALT, _ORDER_SALT, _AUGMENT_SALT, _TEXT_SALT, _START_SALT = 53, 59, 61, 67, 71
_TEXT_EXTENSIONS = ("txt", "text", "caption")
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: members that belong to no sample


def expand_shards(spec: str) -> list[str]:
    """Shard paths from a folder, a glob, or braces (``data-{000..099}.tar``, ``{a,b}.tar``), in order."""
    try:
        import braceexpand
        import webdataset  # noqa: F401 (the reader, needed as soon as the shards are read)
    except ImportError as error:
        raise DataError(f"reading tar shards needs {error.name}: pip install 'polyclip[train]'") from None

    paths = []
    for name in braceexpand.braceexpand(spec):
        if Path(name).is_dir():
            paths += sorted(str(p) for p in Path(name).glob("*.tar"))
        elif any(ch in name for ch in "*?["):
            paths += sorted(glob.glob(name))
        else:
            paths.append(name)
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise DataError(f"{len(missing)} shard(s) of {spec!r} do not exist, e.g. {missing[0]}")
    if not paths:
        raise DataError(f"no tar shards match {spec!r}: the dataset is empty")
    return paths


def _sample_key(name: str) -> str | None:
    """webdataset's grouping key of a member (``base_plus_ext``), None for members of no sample."""
    from webdataset.tariterators import base_plus_ext, meta_prefix, meta_suffix

    if _META.match(name) or ("/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix)):
        return None
    return base_plus_ext(name)[0]


def shard_sizes(paths: list[str]) -> list[int]:
    """Samples in each shard, as webdataset groups them, from the tar headers alone (seeking past the data)."""
    sizes = []
    for path in paths:
        count, previous = 0, None
        try:
            with tarfile.open(path, "r:*") as archive:
                for member in archive:
                    key = _sample_key(member.name) if member.isreg() else None
                    if key is not None and key != previous:
                        count, previous = count + 1, key
        except (tarfile.TarError, OSError, EOFError) as error:
            raise DataError(f"cannot read shard {path}: {error}") from error
        sizes.append(count)
    return sizes


def _samples_in(path: str, first: int, stop: int) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of samples ``first .. stop-1`` of one shard, read by webdataset."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    try:
        with open(path, "rb") as stream:
            samples = group_by_keys(tar_file_expander([{"url": path, "stream": stream}]))
            for number, sample in enumerate(samples):
                if number >= stop:
                    break
                if number >= first:
                    key = sample.pop("__key__")
                    parts = {k: v for k, v in sample.items() if not k.startswith("__")}
                    yield f"{path}:{key}", parts
    except (tarfile.TarError, OSError, EOFError, ValueError) as error:
        raise DataError(f"cannot read shard {path}: {error}") from error


def stream_share(rank: int, worker: int, num_workers: int, steps: int, local_batch: int) -> tuple[int, int]:
    """(offset, count) of the epoch's sample numbers that stream (rank, worker) reads."""

    def count(w: int) -> int:
        return len(range(w, steps, num_workers)) * local_batch

    rank_total = steps * local_batch
    return rank * rank_total + sum(count(w) for w in range(worker)), count(worker)


def epoch_pieces(
    sizes: list[int], seed: int, start: int, stop: int, epoch: int | None = None
) -> list[tuple[int, int, int]]:
    """(shard, first, stop) pieces holding sample numbers ``start .. stop-1`` of a sequence of passes.

    With ``epoch`` given, the numbers lie in that epoch's pass: its shards in an order seeded by the
    epoch, read cyclically from a seeded starting sample, so the samples left over when the batches do
    not divide the data differ from epoch to epoch (even with one shard). Without, they count through
    passes ``0, 1, ...`` (``data.samples_per_epoch``).
    """
    total = sum(sizes)
    if total == 0:
        raise DataError("the shards hold no samples: the dataset is empty")
    if epoch is not None and stop - start > total:
        raise DataError(f"an epoch of {total} samples cannot give {stop - start}")
    pieces, position = [], start
    while position < stop:
        if epoch is None:
            pass_number, offset = divmod(position, total)
        else:
            pass_number = epoch
            offset = (position + sample_seed(seed, _START_SALT, epoch) % total) % total
        take = min(stop - position, total - offset)
        pieces += _pass_pieces(sizes, seed, pass_number, offset, offset + take)
        position += take
    return pieces


def _pass_pieces(
    sizes: list[int], seed: int, pass_number: int, low: int, high: int
) -> list[tuple[int, int, int]]:
    """Samples ``low .. high-1`` of one pass (the shards in the pass's seeded order) as shard pieces."""
    order = np.random.default_rng(sample_seed(seed, _ORDER_SALT, pass_number)).permutation(len(sizes))
    pieces, cursor = [], 0
    for shard in order.tolist():
        first, last = max(low, cursor), min(high, cursor + sizes[shard])
        if first < last:
            pieces.append((shard, first - cursor, last - cursor))
        cursor += sizes[shard]
    return pieces


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
    """One rank's batches of one epoch, each sample of the epoch read once; see the module docstring."""

    def __init__(
        self, shards: list[str], sizes: list[int], augmentation, tokenizer, local_batch: int, rank: int,
        world_size: int, seed: int, epoch: int, steps: int, skip_batches: int = 0, shuffle_buffer: int = 1000,
        text_types: tuple[str, ...] = (), max_bad_in_a_row: int = 50, continuous: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        if len(sizes) != len(shards):
            raise DataError(f"{len(shards)} shards but {len(sizes)} sizes")
        if steps * local_batch * world_size > sum(sizes) and not continuous:
            raise DataError(
                f"an epoch of {steps} batches of {local_batch * world_size} needs {steps * local_batch * world_size} "
                f"samples; the shards hold {sum(sizes)}"
            )
        self.shards, self.sizes, self.augmentation, self.tokenizer = shards, sizes, augmentation, tokenizer
        self.local_batch, self.rank, self.world_size = local_batch, rank, world_size
        self.seed, self.epoch, self.steps, self.skip_batches = seed, epoch, steps, skip_batches
        self.shuffle_buffer, self.text_types, self.max_bad_in_a_row = (
            shuffle_buffer,
            text_types,
            max_bad_in_a_row,
        )
        self.continuous = continuous

    def _stream(self, worker: int, num_workers: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        """This stream's samples of the epoch, shuffled; read again (reshuffled) if more are asked for."""
        offset, count = stream_share(self.rank, worker, num_workers, self.steps, self.local_batch)
        if count == 0:
            return
        epoch_start = self.epoch * self.steps * self.local_batch * self.world_size
        start, epoch = (epoch_start + offset, None) if self.continuous else (offset, self.epoch)
        pieces = epoch_pieces(self.sizes, self.seed, start, start + count, epoch)
        slot = self.rank * num_workers + worker
        for repetition in range(1 << 30):
            rng = np.random.default_rng(sample_seed(self.seed, _SHUFFLE_SALT, self.epoch, slot, repetition))
            samples = (s for shard, a, b in pieces for s in _samples_in(self.shards[shard], a, b))
            yield from _shuffled(samples, self.shuffle_buffer, rng)

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.batches(physical, num_workers)

    def batches(self, physical: int, num_workers: int) -> Iterator[Batch]:
        """The batches data-loader worker ``physical`` of ``num_workers`` yields (``__iter__`` in a worker)."""
        # The loader asks worker 0 first, so after a resume at batch n worker p continues the stream that
        # worker (p + n) mod K had in the uninterrupted run.
        worker = (physical + self.skip_batches) % num_workers
        produced = len(range(worker, self.skip_batches, num_workers))  # batches before the resume point
        total = len(range(worker, self.steps, num_workers))
        samples = _Lookahead(self._stream(worker, num_workers))
        for _ in range(produced * self.local_batch):  # skipped without decoding
            samples.take()
        for batch_number in range(produced, total):
            yield self._batch(samples, worker + batch_number * num_workers)

    def _decode(self, key: str, parts: dict[str, bytes]):
        data = _image_bytes(parts)
        if data is None:
            raise ImageDecodeError(f"no image member among {sorted(parts)}")
        return load_image(data), _captions(parts, self.text_types)

    def _batch(self, samples: _Lookahead, batch: int) -> Batch:
        """Batch ``batch`` of this rank (its number in the epoch) from the next ``local_batch`` samples."""
        kind = None
        if self.text_types:
            kind = self.text_types[
                sample_seed(self.seed, _TEXT_SALT, self.epoch, batch) % len(self.text_types)
            ]
        decoded, skipped, keys = [], [], []
        for _ in range(self.local_batch):
            key, parts = samples.take()
            keys.append(key)
            try:
                decoded.append(self._decode(key, parts))
                samples.bad_in_a_row = 0
            except (ImageDecodeError, ValueError, UnicodeDecodeError, KeyError) as error:
                decoded.append(None)
                skipped.append(f"{key}: {error}")
                samples.bad_in_a_row += 1
                if samples.bad_in_a_row > self.max_bad_in_a_row:
                    raise DataError(
                        f"{samples.bad_in_a_row} unreadable samples in a row "
                        f"(data.max_bad_in_a_row={self.max_bad_in_a_row}); the last: {skipped[-1]}"
                    ) from None
        readable = [(k, d) for k, d in zip(keys, decoded) if d is not None]
        if not readable:  # the whole batch is unreadable: borrow the stream's next readable sample
            readable = [self._next_readable(samples, skipped)]
        pixels, texts = [], []
        for slot, item in enumerate(decoded):
            if item is None:
                keys[slot], item = readable[slot % len(readable)]
            image, captions = item
            seed = sample_seed(self.seed, _AUGMENT_SALT, self.epoch, self.rank, batch, slot)
            pixels.append(self.augmentation(image, seed))
            chosen = captions[kind] if kind is not None else captions
            texts.append(chosen[seed % len(chosen)])
        return Batch(torch.stack(pixels), self.tokenizer(texts), skipped, kind, keys)

    def _next_readable(self, samples: _Lookahead, skipped: list[str]):
        for depth in range(self.max_bad_in_a_row + 1):
            key, parts = samples.peek(depth)
            try:
                return key, self._decode(key, parts)
            except (ImageDecodeError, ValueError, UnicodeDecodeError, KeyError):
                continue
        raise DataError(
            f"more than {self.max_bad_in_a_row} unreadable samples in a row; the last: {skipped[-1]}"
        )


class _Lookahead:
    """An iterator whose next items can be looked at without taking them (replacements for a bad batch)."""

    def __init__(self, iterator: Iterator) -> None:
        self.iterator, self.buffer, self.bad_in_a_row = iterator, collections.deque(), 0

    def peek(self, depth: int):
        while len(self.buffer) <= depth:
            self.buffer.append(self._next())
        return self.buffer[depth]

    def take(self):
        return self.buffer.popleft() if self.buffer else self._next()

    def _next(self):
        try:
            return next(self.iterator)
        except StopIteration:
            raise DataError("a shard stream ran dry: the shards changed while training?") from None


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
