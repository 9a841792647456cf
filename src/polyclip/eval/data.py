"""Evaluation data sources: labelled images and captioned images.

Formats read:
- ImageFolder: ``root/<class>/**/<image>``, classes in sorted order (torchvision's convention);
- CSV of ``path,label`` rows (column names configurable), paths relative to the CSV's folder;
- captions: CSV (one ``image,caption`` row per caption), JSONL (``{"image": ..., "captions": [...]}``
  or one ``"caption"`` per line; RSICD's ``{"filename", "captions"}`` too) and the
  ``dataset_*.json`` split files used for COCO / Flickr30k / RSICD
  (``images[].filename``, ``filepath``, ``split``, ``sentences[].raw``);
- RSICD scene labels (``read_rsicd_labels``): the test split of ``dataset_rsicd.json``, the class
  from each file name's prefix, as CLIP-RSICD's evaluation script reads them;
- MNIST / Fashion-MNIST idx files (``*-images-idx3-ubyte[.gz]`` with ``*-labels-idx1-ubyte[.gz]``),
  read with numpy: magic = two zero bytes, a type code (0x08 = unsigned byte), the number of
  dimensions, then one big-endian int32 per dimension.

Images are decoded lazily (``ImageSet.load``, with the core's ``polyclip.images.load_image``); the
feature extractor decodes them in workers.
Every reader fails with a ``DataError`` naming the file and line on empty or malformed input.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from polyclip.eval.errors import DataError
from polyclip.images import is_image_file, load_image
from polyclip.records import read_json_records

MNIST_CLASSES = [str(digit) for digit in range(10)]
# Fashion-MNIST's label order (zalandoresearch/fashion-mnist README).
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CLASS_NAME_PRESETS = {"mnist": MNIST_CLASSES, "fashion-mnist": FASHION_MNIST_CLASSES}

_IMAGE_COLUMNS = ("image", "filename", "file", "path", "image_path", "filepath")
_CAPTION_COLUMNS = ("caption", "text", "sentence", "title", "raw")


class ImageSet(Protocol):
    """A sequence of images that can be decoded one at a time and fingerprinted for caching."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> Image.Image: ...

    def describe(self, index: int) -> str: ...

    def fingerprint(self, content: bool = False) -> str: ...


@dataclass
class FileImages:
    """Images stored as files."""

    paths: list[Path]

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        return load_image(self.paths[index])  # the core's decoding: EXIF, 16-bit scaling, bomb limit

    def describe(self, index: int) -> str:
        return str(self.paths[index])

    def fingerprint(self, content: bool = False) -> str:
        """Hash of every path with its size and modification time, or with its bytes if ``content``."""
        digest = hashlib.blake2b(digest_size=20)
        for path in self.paths:
            digest.update(str(path).encode())
            try:
                if content:
                    digest.update(hashlib.blake2b(path.read_bytes(), digest_size=20).digest())
                else:
                    stat = path.stat()
                    digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
            except OSError:
                digest.update(b"<unreadable>")
        return digest.hexdigest()


@dataclass
class ArrayImages:
    """Images held in memory as a (N, H, W) or (N, H, W, 3) uint8 array (idx files)."""

    pixels: np.ndarray
    origin: str

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    def load(self, index: int) -> Image.Image:
        return load_image(Image.fromarray(self.pixels[index]))

    def describe(self, index: int) -> str:
        return f"{self.origin}[{index}]"

    def fingerprint(self, content: bool = False) -> str:
        # The pixels are in memory already, so hashing them is cheap and always exact.
        digest = hashlib.blake2b(np.ascontiguousarray(self.pixels).data, digest_size=20)
        digest.update(str(self.pixels.shape).encode())
        return digest.hexdigest()


@dataclass
class LabeledImages:
    """Images with one class label each."""

    images: ImageSet
    labels: np.ndarray  # (N,) int64 indices into class_names
    class_names: list[str]
    name: str = ""

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.images) == 0:
            raise DataError(f"{self.name or 'dataset'}: no images")
        if self.labels.shape != (len(self.images),):
            raise DataError(f"{self.name}: {len(self.images)} images but {self.labels.shape[0]} labels")
        if not self.class_names:
            raise DataError(f"{self.name}: no class names")
        if self.labels.min() < 0 or self.labels.max() >= len(self.class_names):
            raise DataError(f"{self.name}: labels fall outside the {len(self.class_names)} classes")


@dataclass
class CaptionedImages:
    """Images with one or more captions each."""

    images: ImageSet
    captions: list[str]
    caption_to_image: np.ndarray  # (N_captions,) int64 image index of each caption
    name: str = ""

    def __post_init__(self) -> None:
        self.caption_to_image = np.asarray(self.caption_to_image, dtype=np.int64)
        if len(self.images) == 0 or not self.captions:
            raise DataError(f"{self.name or 'captions'}: no images or no captions")
        if self.caption_to_image.shape != (len(self.captions),):
            raise DataError(f"{self.name}: caption-to-image map does not match the captions")


def resolve_class_names(spec: str | Sequence[str] | None) -> list[str] | None:
    """Class names from a preset (``mnist``, ``fashion-mnist``), a file (one per line, or JSON list) or a list."""
    if spec is None or isinstance(spec, list | tuple):
        return list(spec) if spec is not None else None
    if spec in CLASS_NAME_PRESETS:
        return list(CLASS_NAME_PRESETS[spec])
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"class names {spec!r}: not a file and not one of {', '.join(CLASS_NAME_PRESETS)}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            names = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not valid JSON ({error})") from error
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataError(f"{path}: expected a JSON list of class names")
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: no class names")
    if len(set(names)) != len(names):
        raise DataError(f"{path}: class names repeat")
    return names


def read_image_folder(root: str | Path) -> LabeledImages:
    """``root/<class>/**/<image>``; classes sorted by name, images sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"image folder {root} has no class sub-folders (expected root/<class>/<image>)")
    paths, labels, empty = [], [], []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and is_image_file(p))
        if not files:
            empty.append(class_dir.name)
        paths += files
        labels += [label] * len(files)
    if empty:
        raise DataError(f"image folder {root}: no images in class folder(s) {', '.join(empty)}")
    return LabeledImages(FileImages(paths), np.array(labels), [d.name for d in class_dirs], name=str(root))


def _open_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            header = list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"cannot read CSV {path}: {error}") from error
    if not header:
        raise DataError(f"CSV {path} is empty (expected a header line)")
    if not rows:
        raise DataError(f"CSV {path} has a header but no rows")
    return header, rows


def _pick_column(
    header: list[str], wanted: str | None, candidates: tuple[str, ...], path: Path, role: str
) -> str:
    if wanted is not None:
        if wanted not in header:
            raise DataError(
                f"CSV {path} has no column {wanted!r} for the {role}; columns: {', '.join(header)}"
            )
        return wanted
    for name in candidates:
        if name in header:
            return name
    raise DataError(
        f"CSV {path}: no {role} column; expected one of {', '.join(candidates)}; columns: {', '.join(header)}"
    )


def _resolve(base: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else base / path


def read_image_csv(
    path: str | Path,
    path_column: str = "path",
    label_column: str = "label",
    class_names: Sequence[str] | None = None,
) -> LabeledImages:
    """A CSV with an image path and a label per row; labels are class names (or indices into them)."""
    path = Path(path)
    header, rows = _open_csv(path)
    path_column = _pick_column(header, path_column, (), path, "image path")
    label_column = _pick_column(header, label_column, (), path, "label")
    files, raw_labels = [], []
    for line, row in enumerate(rows, start=2):
        image, label = (row.get(path_column) or "").strip(), (row.get(label_column) or "").strip()
        if not image or not label:
            raise DataError(f"CSV {path}, line {line}: empty {path_column!r} or {label_column!r}")
        files.append(_resolve(path.parent, image))
        raw_labels.append(label)
    if class_names is None:
        unique = set(raw_labels)
        numeric = all(label.lstrip("-").isdigit() for label in unique)
        class_names = sorted(unique, key=int) if numeric else sorted(unique)
    class_names = list(class_names)
    index = {name: i for i, name in enumerate(class_names)}
    labels = []
    for line, label in enumerate(raw_labels, start=2):
        if label in index:
            labels.append(index[label])
        elif label.isdigit() and int(label) < len(class_names):
            labels.append(int(label))
        else:
            raise DataError(f"CSV {path}, line {line}: label {label!r} is not one of the class names")
    return LabeledImages(FileImages(files), np.array(labels), class_names, name=str(path))


def _group_captions(records: list[tuple[str, list[str]]], base: Path, origin: Path) -> CaptionedImages:
    image_index: dict[str, int] = {}
    captions, caption_to_image = [], []
    for image, texts in records:
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{origin}: an empty or non-text caption for image {image!r}")
            index = image_index.setdefault(image, len(image_index))
            captions.append(text.strip())
            caption_to_image.append(index)
    if not captions:
        raise DataError(f"{origin}: no captions found")
    paths = [_resolve(base, image) for image in image_index]
    return CaptionedImages(FileImages(paths), captions, np.array(caption_to_image), name=str(origin))


def _record_captions(record: dict, origin: str) -> tuple[str, list[str]]:
    image = next((record[key] for key in _IMAGE_COLUMNS if key in record), None)
    if not isinstance(image, str) or not image:
        raise DataError(f"{origin}: no image path (one of {', '.join(_IMAGE_COLUMNS)})")
    if "captions" in record or "sentences" in record:
        texts = record.get("captions", record.get("sentences"))
        if not isinstance(texts, list):
            raise DataError(f"{origin}: 'captions' must be a list")
        texts = [t["raw"] if isinstance(t, dict) and "raw" in t else t for t in texts]
    else:
        text = next((record[key] for key in _CAPTION_COLUMNS if key in record), None)
        if text is None:
            raise DataError(f"{origin}: no caption (one of captions, {', '.join(_CAPTION_COLUMNS)})")
        texts = [text]
    return image, texts


def read_captions(
    path: str | Path,
    image_root: str | Path | None = None,
    split: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
) -> CaptionedImages:
    """Captioned images from CSV, JSONL or a ``dataset_*.json`` split file; see the module docstring.

    Image paths are relative to ``image_root`` (default: the captions file's folder). ``split``
    keeps only the images of that split (``dataset_*.json`` files and records with a ``split`` key).
    """
    path = Path(path)
    base = Path(image_root) if image_root is not None else path.parent
    suffix = path.suffix.lower()
    records: list[tuple[str, list[str]]] = []
    if suffix == ".csv":
        header, rows = _open_csv(path)
        image_column = _pick_column(header, image_column, _IMAGE_COLUMNS, path, "image")
        caption_column = _pick_column(header, caption_column, _CAPTION_COLUMNS, path, "caption")
        for line, row in enumerate(rows, start=2):
            if split is not None and row.get("split") != split:
                continue
            image, text = (row.get(image_column) or "").strip(), (row.get(caption_column) or "").strip()
            if not image or not text:
                raise DataError(f"CSV {path}, line {line}: empty image or caption")
            records.append((image, [text]))
    elif suffix in (".jsonl", ".json"):
        for origin, record in read_json_records(path, DataError):
            if split is not None and record.get("split") != split:
                continue
            if "filepath" in record and "filename" in record:  # COCO's dataset_coco.json
                record = {**record, "filename": str(Path(record["filepath"]) / record["filename"])}
            records.append(_record_captions(record, origin))
    else:
        raise DataError(f"captions file {path}: unknown format {suffix!r} (use .csv, .jsonl or .json)")
    if not records:
        raise DataError(f"{path}: no captioned images" + (f" in split {split!r}" if split else ""))
    return _group_captions(records, base, path)


def read_rsicd_labels(
    captions_path: str | Path, image_root: str | Path | None = None, split: str = "test"
) -> LabeledImages:
    """RSICD scene classification as arampacha/CLIP-rsicd ``run_clip_eval.py`` builds it.

    The images are those of ``split`` in ``dataset_rsicd.json`` whose file name has a "_" after its
    first character ("airport_12.jpg"; the numbered-only files have no class); an image's class is
    its file name before the first "_"; the classes are the sorted prefixes of every file in the
    image folder with a "_" in its name (RSICD's 30 scenes), not only those of the split.
    """
    captions_path = Path(captions_path)
    root = Path(image_root) if image_root is not None else captions_path.parent
    if not root.is_dir():
        raise DataError(f"RSICD image folder {root} does not exist (give it with --image-root)")
    try:
        data = json.loads(captions_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"cannot read {captions_path} as dataset_rsicd.json: {error}") from error
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise DataError(f"{captions_path}: expected a dataset_*.json file with an 'images' list")
    filenames = [
        record["filename"]
        for record in images
        if isinstance(record, dict)
        and record.get("split") == split
        and isinstance(record.get("filename"), str)
        and record["filename"].find("_") > 0
    ]
    if not filenames:
        raise DataError(f"{captions_path}: no class-named images (prefix_N.jpg) in split {split!r}")
    class_names = sorted({name.split("_")[0] for name in os.listdir(root) if "_" in name})
    index = {name: position for position, name in enumerate(class_names)}
    missing = sorted({name for name in filenames if name.split("_")[0] not in index})
    if missing:
        raise DataError(
            f"{root}: the images {', '.join(missing[:5])} of {captions_path} are not in the folder"
        )
    labels = [index[name.split("_")[0]] for name in filenames]
    return LabeledImages(
        FileImages([root / name for name in filenames]),
        np.array(labels),
        class_names,
        name=str(captions_path),
    )


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx_array(path: str | Path) -> np.ndarray:
    """An idx file (optionally gzip-compressed) as a numpy array."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise DataError(f"cannot read idx file {path}: {error}") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an idx file (bad magic number)")
    ndim = raw[3]
    header_size = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header_size:
        raise DataError(f"{path}: truncated idx header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header_size != expected:
        raise DataError(
            f"{path}: header promises {shape} ({expected} bytes) but holds {len(raw) - header_size}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)


def read_idx(
    images_path: str | Path, labels_path: str | Path | None = None, class_names: Sequence[str] | None = None
) -> LabeledImages:
    """MNIST-style idx image and label files; labels default to the file next to the images."""
    images_path = Path(images_path)
    if labels_path is None:
        guess = images_path.name.replace("images-idx3", "labels-idx1").replace("images.idx3", "labels.idx1")
        if guess == images_path.name:
            raise DataError(f"cannot guess the labels file for {images_path}; pass it explicitly")
        labels_path = images_path.with_name(guess)
    pixels = read_idx_array(images_path)
    labels = read_idx_array(labels_path)
    if pixels.ndim != 3 or pixels.dtype != np.uint8:
        raise DataError(
            f"{images_path}: expected (N, H, W) unsigned bytes, got {pixels.shape} {pixels.dtype}"
        )
    if labels.ndim != 1 or labels.shape[0] != pixels.shape[0]:
        raise DataError(f"{labels_path}: {labels.shape} labels for {pixels.shape[0]} images")
    if class_names is None:
        class_names = [str(i) for i in range(int(labels.max()) + 1)]
    return LabeledImages(
        ArrayImages(pixels, images_path.name),
        labels.astype(np.int64),
        list(class_names),
        name=str(images_path),
    )


def load_labeled(
    path: str | Path,
    labels_path: str | Path | None = None,
    class_names: Sequence[str] | str | None = None,
    image_root: str | Path | None = None,
) -> LabeledImages:
    """A labelled dataset from a folder (ImageFolder), a ``.csv`` file, an idx images file, or
    RSICD's ``dataset_rsicd.json`` (its test split, classes from the file names; ``image_root``)."""
    path = Path(path)
    names = resolve_class_names(class_names)
    if path.is_dir():
        data = read_image_folder(path)
        if names is not None:  # display / prompt names for the sorted class folders
            if len(names) != len(data.class_names):
                raise DataError(
                    f"{len(names)} class names given for {len(data.class_names)} class folders in {path}"
                )
            data.class_names = names
        return data
    if not path.exists():
        raise DataError(f"dataset {path} does not exist")
    if path.suffix.lower() == ".csv":
        return read_image_csv(path, class_names=names)
    if path.suffix.lower() == ".json":
        return read_rsicd_labels(path, image_root)
    if "idx" in path.name or path.name.endswith((".ubyte", ".ubyte.gz")):
        return read_idx(path, labels_path, names)
    raise DataError(
        f"dataset {path}: unknown format (use a folder, a .csv file, dataset_rsicd.json or an idx images file)"
    )
