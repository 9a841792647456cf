"""VQA-RAD / SLAKE question files and the dataset that feeds the model.

A question file is a JSON list of records. VQA-RAD's (``trainset.json``/``testset.json`` of the
MEVF release) have ``qid, image_name, question, answer, answer_type, question_type``; SLAKE's have
``img_name`` and ``content_type`` instead of ``image_name`` and ``question_type`` and a ``q_lang``
field (the reference keeps the English questions). ``answer_type`` is OPEN or CLOSED.

Each image feeds two inputs, as in the reference (``create_resized_images.py`` + ``base_model.py``):
the CLIP tower's pixels (here the checkpoint's own preprocessing; see ``model.py``) and a 128x128
grey image scaled to 0..1 for the autoencoder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from polyclip.domains.medvqa.answers import ANSWER_TYPES, AnswerVocabulary
from polyclip.domains.medvqa.errors import MedVQADataError
from polyclip.domains.medvqa.text import QuestionDictionary
from polyclip.images import ImageDecodeError, ImageSource, load_image

IMAGE_KEYS = ("image_name", "img_name")  # VQA-RAD, SLAKE
QUESTION_TYPE_KEYS = ("question_type", "content_type")  # VQA-RAD, SLAKE


@dataclass(frozen=True)
class VQARecord:
    qid: str
    image_name: str  # path relative to the image folder
    question: str
    answer: str
    answer_type: str  # "CLOSED" | "OPEN"
    question_type: str = ""  # VQA-RAD: PRES, ABN, MODALITY...; SLAKE: Organ, Position... (metrics per type)

    @property
    def is_open(self) -> bool:
        return self.answer_type == "OPEN"


def load_records(path: str | Path, language: str | None = "en") -> list[VQARecord]:
    """Read a VQA-RAD or SLAKE question file. ``language`` keeps SLAKE records of that ``q_lang``
    (None keeps all); records without ``q_lang`` are always kept."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MedVQADataError(f"question file {path} does not exist") from None
    except IsADirectoryError:
        raise MedVQADataError(f"{path} is a folder; expected a JSON question file") from None
    except UnicodeDecodeError as error:
        raise MedVQADataError(f"{path} is not UTF-8 text: {error}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise MedVQADataError(
            f"{path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})"
        ) from None
    if not isinstance(data, list):
        raise MedVQADataError(
            f"{path} must hold a JSON list of question records, found {type(data).__name__}"
        )
    records = []
    for position, item in enumerate(data):
        if not isinstance(item, dict):
            raise MedVQADataError(f"{path}: record {position} is a {type(item).__name__}, not an object")
        if language is not None and "q_lang" in item and item["q_lang"] != language:
            continue
        records.append(_record(item, position, path))
    if not records:
        raise MedVQADataError(
            f"{path} holds no question records" + (f" in language {language!r}" if language else "")
        )
    return records


def _record(item: dict, position: int, path: Path) -> VQARecord:
    def where() -> str:
        return f"{path}: record {position}" + (f" (qid {item['qid']})" if "qid" in item else "")

    image = next((item[key] for key in IMAGE_KEYS if key in item), None)
    missing = [key for key in ("qid", "question", "answer", "answer_type") if key not in item]
    if image is None:
        missing.append(" or ".join(IMAGE_KEYS))
    if missing:
        raise MedVQADataError(f"{where()} lacks {', '.join(missing)}")
    if not isinstance(image, str) or not image.strip():
        raise MedVQADataError(f"{where()}: the image name must be a non-empty string, got {image!r}")
    if not isinstance(item["question"], str) or not item["question"].strip():
        raise MedVQADataError(f"{where()}: the question must be a non-empty string")
    if item["answer"] is None or isinstance(item["answer"], dict | list):
        raise MedVQADataError(f"{where()}: the answer must be text or a number, got {item['answer']!r}")
    answer_type = str(item["answer_type"]).strip().upper()
    if answer_type not in ANSWER_TYPES:
        raise MedVQADataError(f"{where()}: answer_type must be OPEN or CLOSED, got {item['answer_type']!r}")
    question_type = next((item[key] for key in QUESTION_TYPE_KEYS if key in item), "")
    return VQARecord(
        qid=str(item["qid"]),
        image_name=image,
        question=item["question"],
        answer=str(item["answer"]),
        answer_type=answer_type,
        question_type=str(question_type).strip(),
    )


def autoencoder_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """(1, size, size) grey levels in 0..1: PIL's 'L' conversion and default (bicubic) resize, /255."""
    grey = image.convert("L").resize((size, size), resample=Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0).unsqueeze(0)


def image_inputs(
    image: ImageSource, clip_preprocess, autoencoder_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoded image -> (CLIP pixels (3, S, S), autoencoder pixels (1, s, s))."""
    rgb = load_image(image)
    return clip_preprocess(rgb), autoencoder_pixels(rgb, autoencoder_size)


class MedVQADataset(Dataset):
    """Records + images -> model inputs and targets. Images are decoded once and kept (``cache``)."""

    def __init__(
        self,
        records: Sequence[VQARecord],
        image_root: str | Path,
        dictionary: QuestionDictionary,
        answers: AnswerVocabulary,
        clip_preprocess,
        autoencoder_size: int = 128,
        question_length: int = 12,
        cache: bool = True,
    ):
        self.records = list(records)
        self.image_root = Path(image_root).expanduser()
        if not self.image_root.is_dir():
            raise MedVQADataError(f"image folder {self.image_root} does not exist")
        missing = sorted(
            {r.image_name for r in self.records if not (self.image_root / r.image_name).is_file()}
        )
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise MedVQADataError(f"{len(missing)} image(s) missing from {self.image_root}: {shown}")
        self.dictionary = dictionary
        self.answers = answers
        self.clip_preprocess = clip_preprocess
        self.autoencoder_size = autoencoder_size
        self.question_length = question_length
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.records)

    def images(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is not None and name in self.cache:
            return self.cache[name]
        path = self.image_root / name
        try:
            inputs = image_inputs(path, self.clip_preprocess, self.autoencoder_size)
        except ImageDecodeError as error:
            raise MedVQADataError(str(error)) from None
        if self.cache is not None:
            self.cache[name] = inputs
        return inputs

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        record = self.records[index]
        clip_pixels, ae_pixels = self.images(record.image_name)
        return {
            "clip_pixels": clip_pixels,  # (3, S, S)
            "ae_pixels": ae_pixels,  # (1, s, s)
            "question_ids": self.dictionary.encode(record.question, self.question_length),  # (L,)
            "target": self.answers.target(record.answer, record.answer_type),  # (A,)
            "is_open": torch.tensor(record.is_open),
            "index": torch.tensor(index),
        }


__all__ = ["MedVQADataset", "VQARecord", "autoencoder_pixels", "image_inputs", "load_records"]
