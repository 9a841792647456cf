"""Small generated datasets in the formats the trainer reads (imported by the test_train_* modules)."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (230, 210, 40)}


def write_image(path: Path, colour: tuple[int, int, int], seed: int, size: int = 40) -> Path:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 20, (size, size + 8, 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def colour_pairs(root: Path, count: int, corrupt: int = 0, missing: int = 0) -> list[dict]:
    """``count`` images of a colour each with captions; the first ``corrupt`` files hold garbage and the
    next ``missing`` are never written."""
    root.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    records = []
    for index in range(count):
        colour = names[index % len(names)]
        path = root / "images" / f"{index:04d}.png"
        if index < corrupt:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"not an image")
        elif index >= corrupt + missing:
            write_image(path, COLOURS[colour], index)
        records.append(
            {"image": f"images/{index:04d}.png", "captions": [f"a {colour} square", f"something {colour}"],
             "colour": colour}
        )  # fmt: skip
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text(
        "".join(json.dumps({"image": r["image"], "captions": r["captions"]}) + "\n" for r in records)
    )
    return path


def write_csv(path: Path, records: list[dict], delimiter: str = ",", image_key: str = "image") -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow([image_key, "caption"])
        for record in records:
            writer.writerow([record["image"], record["captions"][0]])
    return path


def write_rsicd_json(path: Path, records: list[dict], val_every: int = 5) -> Path:
    images = [
        {"filename": r["image"], "split": "val" if n % val_every == val_every - 1 else "train",
         "sentences": [{"raw": c, "tokens": c.split()} for c in r["captions"]]}
        for n, r in enumerate(records)
    ]  # fmt: skip
    path.write_text(json.dumps({"images": images, "dataset": "rsicd"}))
    return path


def write_image_folder(root: Path, per_class: int = 3) -> Path:
    for name, colour in COLOURS.items():
        for index in range(per_class):
            write_image(root / name / f"{index}.png", colour, hash(name) % 1000 + index)
    return root


def write_shards(folder: Path, records: list[dict], source: Path, per_shard: int) -> list[Path]:
    """webdataset tars: ``key.png`` + ``key.txt`` per sample."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for start in range(0, len(records), per_shard):
        path = folder / f"shard-{start // per_shard:03d}.tar"
        with tarfile.open(path, "w") as archive:
            for offset, record in enumerate(records[start : start + per_shard]):
                key = f"{start + offset:06d}"
                for name, data in (
                    (f"{key}.png", (source / record["image"]).read_bytes()),
                    (f"{key}.txt", record["captions"][0].encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One torch thread for the tiny models of these tests: on a busy machine, threads that wait for each
    other at every small operation make two threads many times slower than one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
