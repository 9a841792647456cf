"""Captions and metadata for indexed images, read from a CSV, TSV, JSON or JSON Lines file.

Each record names an image (``path``; ``image``, ``file`` or ``filename`` are accepted too), an
optional ``caption`` (or ``text``), and metadata: a ``metadata`` object in JSON, and every other
column or key. Relative image paths are read against the folder of the captions file.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polyclip.index.errors import IndexStoreError
from polyclip.records import read_json_records

PATH_KEYS = ("path", "image", "file", "filename")
CAPTION_KEYS = ("caption", "text")


@dataclass
class Annotation:
    caption: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def read_captions(file: str | Path) -> dict[str, Annotation]:
    """Absolute image path -> its caption and metadata."""
    file = Path(file)
    if not file.is_file():
        raise IndexStoreError(f"captions file {file} does not exist")
    suffix = file.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(file, newline="", encoding="utf-8") as handle:
            records = list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
    elif suffix in (".jsonl", ".json"):
        records = [record for _, record in read_json_records(file, IndexStoreError)]
    else:
        raise IndexStoreError(
            f"{file}: captions must be .csv, .tsv, .json or .jsonl, not {suffix or 'no suffix'}"
        )
    annotations: dict[str, Annotation] = {}
    for number, record in enumerate(records, 1):
        path, annotation = _parse_record(record, file, number)
        annotations[str((file.parent / path).expanduser().resolve())] = annotation
    return annotations


def _parse_record(record: Any, file: Path, number: int) -> tuple[str, Annotation]:
    if not isinstance(record, dict):
        raise IndexStoreError(f"{file}: record {number} is not an object")
    record = dict(record)
    path_key = next((key for key in PATH_KEYS if record.get(key)), None)
    if path_key is None:
        raise IndexStoreError(f"{file}: record {number} names no image (a '{PATH_KEYS[0]}' column or key)")
    path = str(record.pop(path_key))
    caption_key = next((key for key in CAPTION_KEYS if key in record), None)
    caption = record.pop(caption_key) if caption_key else None
    if caption is not None and not isinstance(caption, str):
        raise IndexStoreError(f"{file}: record {number}: the caption must be text")
    metadata = record.pop("metadata", None) or {}
    if isinstance(metadata, str):  # a CSV column holding JSON
        try:
            metadata = json.loads(metadata)
        except json.JSONDecodeError:
            raise IndexStoreError(f"{file}: record {number}: 'metadata' is not valid JSON") from None
    if not isinstance(metadata, dict):
        raise IndexStoreError(f"{file}: record {number}: 'metadata' must be an object")
    metadata = {**record, **metadata}
    return path, Annotation(caption or None, metadata)
