"""Image-caption pairs for training: readers, a resumable distributed sampler, and the batch maker.

Sources (``DataConfig.format``):
- CSV / TSV / Parquet: one row per image with an image path and a caption (a list column in Parquet,
  or several rows for the same image);
- JSONL / JSON: ``{"image": ..., "captions": [...]}`` or ``"caption": "..."`` per record; a
  ``dataset_*.json`` split file (``images[].filename``, ``split``, ``sentences[].raw``: COCO,
  Flickr30k, RSICD) is read the same way;
- an ImageFolder ``root/<class>/<image>``, whose class names become captions through templates;
- webdataset tar shards (`polyclip.train.shards`).

Sampling is deterministic and resumable: epoch ``e`` visits a permutation seeded by (seed, e); global
batch ``b`` is the ``batch_size`` positions after ``b * batch_size``, and rank ``r`` of ``W`` takes its
``r``-th slice, so the ranks' batches concatenated are exactly the one-process batch. Each sample is
addressed by a `SampleKey` (epoch, batch, index) from which its caption choice and augmentation seed
derive, independent of workers and resumption.

An image that cannot be read (missing, corrupt, truncated) is replaced by the next sample of a fixed
probe sequence and counted; batch sizes therefore never change (the contrastive losses need equal
batches on every rank). A run gives up only after ``max_bad_in_a_row`` unreadable images in a row.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from polyclip.images import ImageDecodeError, is_image_file, load_image
from polyclip.records import read_json_records
from polyclip.train.config import DataConfig, TrainConfigError

_IMAGE_KEYS = ("image", "filename", "filepath", "path", "image_path", "file")
_CAPTION_KEYS = ("captions", "caption", "sentences", "text", "title", "raw")
_SUFFIX_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".jsonl": "jsonl",
    ".json": "json",
    ".tar": "wds",
}
# Salts keep the random streams drawn from the same (seed, epoch, ...) apart.
_CAPTION_SALT, _AUGMENT_SALT, _TEXT_TYPE_SALT, _PERMUTATION_SALT = 11, 23, 37, 41


class DataError(ValueError):
    """Training data that cannot be used: unreadable files, missing columns, an empty dataset."""


@dataclass
class PairRecord:
    """One image with its captions (or, for mixed text types, its caption of each type)."""

    image: str  # absolute or working-directory-relative path
    captions: list[str] = field(default_factory=list)
    typed_captions: dict[str, str] | None = None


class SampleKey(NamedTuple):
    epoch: int
    batch: int  # global batch number within the epoch
    index: int  # dataset position


def sample_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence hashing: nearby inputs give unrelated seeds)."""
    state = np.random.SeedSequence([seed, *parts]).generate_state(1, np.uint64)
    return int(state[0]) & 0x7FFF_FFFF_FFFF_FFFF


# ---------------------------------------------------------------------------------------------------------
# readers


def detect_format(config: DataConfig) -> str:
    if config.format != "auto":
        return config.format
    path = Path(config.train)
    if any(ch in config.train for ch in "*{"):
        return "wds"
    if path.is_dir():
        tars = list(path.glob("*.tar"))
        return "wds" if tars else "folder"
    suffix = path.suffix.lower()
    if suffix not in _SUFFIX_FORMATS:
        raise DataError(
            f"cannot tell the format of {config.train}: use a .csv, .tsv, .parquet, .jsonl, .json or .tar "
            "file, an image folder, or set data.format"
        )
    return _SUFFIX_FORMATS[suffix]


def read_records(config: DataConfig) -> list[PairRecord]:
    """Every training record of a CSV/TSV/Parquet/JSONL/JSON file or an ImageFolder."""
    kind = detect_format(config)
    path = Path(config.train)
    if kind == "folder":
        return _folder_records(path, config.folder_templates)
    if not path.is_file():
        raise DataError(f"training data {path} does not exist or is not a file")
    base = Path(config.image_root) if config.image_root is not None else path.parent
    if kind in ("csv", "tsv"):
        rows = _read_delimited(path, "\t" if kind == "tsv" else ",")
    elif kind == "parquet":
        rows = _read_parquet(path)
    elif kind in ("jsonl", "json"):
        rows = read_json_records(path, DataError)
    else:
        raise DataError(f"format {kind!r} is streamed from shards, not read as records")
    records = _rows_to_records(rows, config, base, str(path))
    if not records:
        detail = f" in split {config.split!r}" if config.split else ""
        raise DataError(f"training data {path} holds no image-caption pairs{detail}: the dataset is empty")
    return records


def _read_delimited(path: Path, delimiter: str) -> list[tuple[str, dict]]:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            rows = [(f"{path}, line {n}", row) for n, row in enumerate(reader, start=2)]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"cannot read {path}: {error}") from error
    return rows


def _read_parquet(path: Path) -> list[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as error:
        raise DataError("reading Parquet needs pyarrow: pip install 'polyclip[train]'") from error
    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises its own ArrowInvalid / OSError types
        raise DataError(f"cannot read Parquet {path}: {error}") from error
    return [(f"{path}, row {n}", row) for n, row in enumerate(table.to_pylist())]


def _pick(row: dict, wanted: str | None, candidates: tuple[str, ...], where: str, role: str) -> str:
    if wanted is not None:
        if wanted not in row:
            raise DataError(f"{where}: no {role} field {wanted!r}; fields: {', '.join(map(str, row))}")
        return wanted
    for name in candidates:
        if name in row:
            return name
    raise DataError(
        f"{where}: no {role} field; expected one of {', '.join(candidates)} (or set data.{role}_key); "
        f"fields: {', '.join(map(str, row))}"
    )


def _caption_list(value: Any, where: str) -> list[str]:
    items = value if isinstance(value, list) else [value]
    texts = []
    for item in items:
        if isinstance(item, dict):  # dataset_*.json sentences: {"raw": ..., "tokens": ...}
            item = item.get("raw")
        if not isinstance(item, str):
            raise DataError(f"{where}: a caption is not text: {item!r}")
        if item.strip():
            texts.append(item.strip())
    return texts


def _rows_to_records(
    rows: list[tuple[str, dict]], config: DataConfig, base: Path, origin: str
) -> list[PairRecord]:
    records: list[PairRecord] = []
    by_image: dict[str, PairRecord] = {}
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with an image and captions")
        if config.split is not None and row.get("split") != config.split:
            continue
        image_key = _pick(row, config.image_key, _IMAGE_KEYS, where, "image")
        image = row[image_key]
        if not isinstance(image, str) or not image.strip():
            raise DataError(f"{where}: empty image path")
        if "filepath" in row and image_key == "filename":  # COCO's dataset_coco.json
            image = str(Path(row["filepath"]) / image)
        path = image if Path(image).is_absolute() else str(base / image.strip())
        if config.text_types:
            typed = {}
            for kind in config.text_types:
                if kind not in row:
                    raise DataError(f"{where}: no text type {kind!r} (data.text_types)")
                texts = _caption_list(row[kind], where)
                if not texts:
                    raise DataError(f"{where}: empty caption for text type {kind!r}")
                typed[kind] = texts[0]
            records.append(PairRecord(path, [], typed))
            continue
        if config.caption_template is not None:
            texts = [_fill_template(config.caption_template, row, where)]
        else:
            texts = _caption_list(row[_pick(row, config.caption_key, _CAPTION_KEYS, where, "caption")], where)
        if not texts:
            raise DataError(f"{where}: no caption for image {image!r}")
        if path in by_image:  # several rows of one image: its captions are gathered
            by_image[path].captions.extend(texts)
        else:
            by_image[path] = PairRecord(path, texts)
            records.append(by_image[path])
    if config.captions == "each" and not config.text_types:
        records = [PairRecord(r.image, [caption]) for r in records for caption in r.captions]
    return records


def _fill_template(template: str, row: dict, where: str) -> str:
    try:
        return template.format_map({k: str(v).strip() for k, v in row.items()})
    except KeyError as error:
        raise DataError(
            f"{where}: data.caption_template names the field {error}, which this record lacks"
        ) from None
    except (ValueError, IndexError) as error:
        raise DataError(f"data.caption_template {template!r} is not a valid template: {error}") from None


def _folder_records(root: Path, templates: Sequence[str]) -> list[PairRecord]:
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"image folder {root} has no class sub-folders (expected root/<class>/<image>)")
    records = []
    for class_dir in class_dirs:
        name = class_dir.name.replace("_", " ")
        captions = [template.replace("{}", name) for template in templates]
        for path in sorted(p for p in class_dir.rglob("*") if p.is_file() and is_image_file(p)):
            records.append(PairRecord(str(path), captions))
    if not records:
        raise DataError(f"image folder {root}: the class folders hold no images; the dataset is empty")
    return records


# ---------------------------------------------------------------------------------------------------------
# dataset and batches


@dataclass
class Batch:
    pixels: torch.Tensor  # (B, 3, S, S)
    token_ids: torch.Tensor  # (B, L)
    skipped: list[str] = field(default_factory=list)  # "path: reason" of images replaced in this batch
    text_type: str | None = None
    keys: list[str] = field(default_factory=list)  # tar shards: "shard:key" of each row

    def __len__(self) -> int:
        return self.pixels.shape[0]


class PairDataset(torch.utils.data.Dataset):
    """Records -> (pixels, caption) addressed by `SampleKey`; unreadable images are replaced."""

    def __init__(
        self,
        records: list[PairRecord],
        augmentation,
        seed: int,
        captions: str = "random",
        text_types: Sequence[str] = (),
        max_bad_in_a_row: int = 50,
    ) -> None:
        if not records:
            raise DataError("the training dataset is empty")
        self.records = records
        self.augmentation = augmentation
        self.seed = seed
        self.captions = captions
        self.text_types = tuple(text_types)
        self.max_bad_in_a_row = max_bad_in_a_row

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, str, list[str], str | None]:
        epoch, batch, index = key
        skipped = []
        # Probe sequence: index, index + step, ... with a step coprime to N, so every record is reachable.
        size = len(self.records)
        step = _coprime_step(size)
        for attempt in range(self.max_bad_in_a_row + 1):
            position = (index + attempt * step) % size
            record = self.records[position]
            try:
                image = load_image(record.image)
            except ImageDecodeError as error:
                skipped.append(f"{record.image}: {error}")
                continue
            pixels = self.augmentation(image, sample_seed(self.seed, _AUGMENT_SALT, epoch, position))
            text, text_type = self._caption(record, epoch, batch, position)
            return pixels, text, skipped, text_type
        raise DataError(
            f"{len(skipped)} unreadable images in a row (data.max_bad_in_a_row={self.max_bad_in_a_row}); "
            f"the last: {skipped[-1]}"
        )

    def _caption(self, record: PairRecord, epoch: int, batch: int, position: int) -> tuple[str, str | None]:
        if self.text_types:
            kind = self.text_types[
                sample_seed(self.seed, _TEXT_TYPE_SALT, epoch, batch) % len(self.text_types)
            ]
            return record.typed_captions[kind], kind
        if self.captions == "first" or len(record.captions) == 1:
            return record.captions[0], None
        choice = sample_seed(self.seed, _CAPTION_SALT, epoch, position) % len(record.captions)
        return record.captions[choice], None


def _coprime_step(size: int) -> int:
    step = max(1, int(size * 0.618))  # far from the failing image: a bad folder is not retried in a row
    while np.gcd(step, size) != 1:
        step += 1
    return step % size or 1


class Collate:
    """Samples -> `Batch`, tokenising the captions (runs in the data-loader workers)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, samples: list[tuple[torch.Tensor, str, list[str], str | None]]) -> Batch:
        pixels = torch.stack([s[0] for s in samples])  # (B, 3, S, S)
        token_ids = self.tokenizer([s[1] for s in samples])  # (B, L)
        skipped = [reason for s in samples for reason in s[2]]
        return Batch(pixels, token_ids, skipped, samples[0][3])


class EpochBatchSampler(torch.utils.data.Sampler):
    """This rank's `SampleKey` lists for one epoch, starting at batch ``start_batch`` (resumption)."""

    def __init__(
        self, num_samples: int, global_batch: int, rank: int, world_size: int, seed: int, epoch: int,
        start_batch: int = 0, shuffle: bool = True,
    ) -> None:  # fmt: skip
        if global_batch % world_size:
            raise TrainConfigError(
                f"data.batch_size ({global_batch}) must be a multiple of the number of processes ({world_size})"
            )
        self.num_samples, self.global_batch = num_samples, global_batch
        self.rank, self.world_size = rank, world_size
        self.seed, self.epoch, self.start_batch, self.shuffle = seed, epoch, start_batch, shuffle
        self.local_batch = global_batch // world_size

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.global_batch  # the last partial batch is dropped

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start_batch)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, _PERMUTATION_SALT, self.epoch))
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        for batch in range(self.start_batch, self.batches_per_epoch):
            first = batch * self.global_batch + self.rank * self.local_batch
            yield [SampleKey(self.epoch, batch, index) for index in order[first : first + self.local_batch]]
