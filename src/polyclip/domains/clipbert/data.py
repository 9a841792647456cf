"""User data for ClipBERT tasks: a folder of videos, a file of queries, a file of questions.

- videos: every video file of a folder (by extension) and every sub-folder of frame images, sorted
  by name; a video's name is its file name without the extension (or the sub-folder's name);
- queries: ``.txt`` (one query per line) or ``.jsonl`` (``{"text": ..., "video": name}``; ``video`` is
  the ground truth, optional, and enables R@K / median rank);
- questions: ``.txt`` (one question per line) or ``.jsonl`` (``{"question": ..., "video": name,
  "options": [...], "answer": ...}``; ``options`` makes it multiple choice, ``answer`` enables accuracy;
  for multiple choice ``answer`` is the option's index or its text).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from polyclip.images import is_image_file
from polyclip.records import read_json_records

VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".mkv", ".avi", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".gif", ".flv"}
)


class VideoDataError(ValueError):
    """A videos folder, queries file or questions file that cannot be used."""


def video_name(path: Path) -> str:
    return path.name if path.is_dir() else path.stem


def list_videos(directory: str | Path) -> list[Path]:
    """Video files and frame folders of ``directory``, sorted by name; names must be unique."""
    directory = Path(directory)
    if not directory.is_dir():
        raise NotADirectoryError(f"no videos folder at {directory}")
    videos = []
    for entry in sorted(directory.iterdir()):
        if entry.is_file() and entry.suffix.lower() in VIDEO_EXTENSIONS:
            videos.append(entry)
        elif entry.is_dir() and any(is_image_file(p) for p in entry.iterdir()):
            videos.append(entry)
    if not videos:
        raise VideoDataError(
            f"{directory} holds no videos (files ending in {', '.join(sorted(VIDEO_EXTENSIONS))}, "
            "or sub-folders of frame images)"
        )
    names = [video_name(v) for v in videos]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise VideoDataError(f"{directory}: several videos share the names {duplicates}")
    return videos


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    records = read_json_records(path, VideoDataError)
    if not records:
        raise VideoDataError(f"{path} holds no records")
    return records


def _read_lines(path: Path) -> list[str]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise VideoDataError(f"{path} holds no lines")
    return lines


def _text_field(origin: str, record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise VideoDataError(f"{origin}: needs a non-empty string {key!r}")
    return value


@dataclass
class Queries:
    texts: list[str]
    videos: list[str] | None  # ground-truth video name of each query, when given for all


def read_queries(path: str | Path) -> Queries:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no queries file at {path}")
    if path.suffix.lower() != ".jsonl":
        return Queries(texts=_read_lines(path), videos=None)
    records = _read_jsonl(path)
    texts = [_text_field(origin, r, "text") for origin, r in records]
    with_video = [r for _, r in records if "video" in r]
    if with_video and len(with_video) != len(records):
        raise VideoDataError(f"{path}: either every query names its 'video' or none does")
    videos = [str(r["video"]) for _, r in records] if with_video else None
    return Queries(texts=texts, videos=videos)


@dataclass
class Questions:
    questions: list[str]
    videos: list[str] | None  # video name of each question (None: all about one video)
    options: list[list[str]] | None  # multiple choice
    answers: list[str | int] | None  # ground truth


def read_questions(path: str | Path) -> Questions:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no questions file at {path}")
    if path.suffix.lower() != ".jsonl":
        return Questions(questions=_read_lines(path), videos=None, options=None, answers=None)
    records = _read_jsonl(path)
    questions = [_text_field(origin, r, "question") for origin, r in records]

    def column(key: str) -> list | None:
        present = [key in r for _, r in records]
        if any(present) and not all(present):
            raise VideoDataError(f"{path}: either every question has {key!r} or none does")
        return [r[key] for _, r in records] if all(present) else None

    options = column("options")
    if options is not None and not all(
        isinstance(o, list) and o and all(isinstance(x, str) for x in o) for o in options
    ):
        raise VideoDataError(f"{path}: 'options' must be non-empty lists of strings")
    videos = column("video")
    return Questions(
        questions=questions,
        videos=[str(v) for v in videos] if videos is not None else None,
        options=options,
        answers=column("answer"),
    )
