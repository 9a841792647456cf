"""ClipBERT's tasks end to end on a user's files: what ``polyclip video retrieve`` and ``qa`` run.

- `load_task_model`: a checkpoint (reference ``.pt`` with the task's head, or a polyclip folder) and
  its WordPiece tokenizer;
- `retrieve_videos`: rank a folder of videos for each text query (``.txt`` or ``.jsonl``); queries
  that name their video also give R@K and median rank, as the paper's MSRVTT / DiDeMo tables;
- `plan_questions` + `answer_questions`: resolve each question's video and the answer vocabulary (an
  open-ended model) or the options (multiple choice), decode each video once for all of its
  questions, answer, and score the accuracy when the file gives answers.

File formats are those of `polyclip.domains.clipbert.data`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from polyclip.domains.clipbert.checkpoint import LoadReport, load_clipbert
from polyclip.domains.clipbert.config import clipbert_config
from polyclip.domains.clipbert.data import (
    Questions,
    VideoDataError,
    list_videos,
    read_queries,
    read_questions,
    video_name,
)
from polyclip.domains.clipbert.model import ClipBert
from polyclip.domains.clipbert.qa import (
    QAConfig,
    answer_multiple_choice,
    answer_open_ended,
    load_answer_vocabulary,
    qa_accuracy,
)
from polyclip.domains.clipbert.retrieval import VideoRetrievalConfig, retrieval_metrics, score_videos
from polyclip.domains.clipbert.tokenizer import BertWordPieceTokenizer
from polyclip.domains.clipbert.video import SparseSamplingConfig, VideoPreprocessConfig, load_video_clips
from polyclip.progress import progress_bar

RETRIEVAL_TASKS = ("pretrained", "retrieval")


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or CUDA when there is one, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_task_model(
    checkpoint: str | Path,
    vocab: str | Path | None,
    task: str,
    num_outputs: int | None = None,
    max_text_length: int = 20,
    device: str | torch.device | None = None,
) -> tuple[ClipBert, BertWordPieceTokenizer, LoadReport]:
    """A ClipBERT model for ``task`` and its tokenizer; ``vocab`` defaults to the folder's vocab.txt.

    A reference ``.pt`` carries no configuration: ``task`` (pretrained, retrieval, qa,
    multiple_choice) and ``num_outputs`` (the answer count of an open-ended QA head) choose its head.
    """
    checkpoint = Path(checkpoint)
    config = None if checkpoint.is_dir() else clipbert_config(task, num_outputs)
    model, report = load_clipbert(checkpoint, config)
    if vocab is None:
        if not (checkpoint.is_dir() and (checkpoint / "vocab.txt").is_file()):
            raise FileNotFoundError(
                "a vocabulary is needed: the checkpoint carries no vocab.txt (use bert-base-uncased's)"
            )
        vocab = checkpoint / "vocab.txt"
    tokenizer = BertWordPieceTokenizer(vocab, max_length=max_text_length)
    if tokenizer.vocab_size > model.config.text.vocab_size:
        raise ValueError(
            f"the vocabulary has {tokenizer.vocab_size} tokens, the model {model.config.text.vocab_size} embeddings"
        )
    return model.to(default_device(device)), tokenizer, report


@dataclass
class VideoRanking:
    videos: list[str]  # video names, the columns of ``scores``
    queries: list[str]
    scores: torch.Tensor  # (queries, videos) match probabilities
    top: list[list[tuple[str, float]]]  # per query: the best (video, score) pairs, best first
    metrics: dict[str, float] | None = None  # R@K, median / mean rank when the queries name videos

    def to_dict(self) -> dict[str, Any]:
        report: dict[str, Any] = {
            "videos": self.videos,
            "queries": [
                {"query": q, "top": [{"video": v, "score": round(s, 6)} for v, s in top]}
                for q, top in zip(self.queries, self.top)
            ],
            "scores": self.scores.tolist(),
        }
        if self.metrics is not None:
            report["metrics"] = self.metrics
        return report


def retrieve_videos(
    model: ClipBert,
    tokenizer: BertWordPieceTokenizer,
    videos: str | Path,
    queries: str | Path,
    sampling: SparseSamplingConfig | None = None,
    preprocess: VideoPreprocessConfig | None = None,
    config: VideoRetrievalConfig | None = None,
    top_k: int = 5,
    frames_fps: float | None = None,
    progress: bool = False,
) -> VideoRanking:
    """Every video of the folder ``videos`` ranked for each query of the file ``queries``."""
    if top_k < 1:
        raise ValueError("top_k must be positive")
    sampling, preprocess = sampling or SparseSamplingConfig(), preprocess or VideoPreprocessConfig()
    video_paths = list_videos(videos)
    names = [video_name(p) for p in video_paths]
    query_file = read_queries(queries)
    truth = None
    if query_file.videos is not None:
        unknown = sorted(set(query_file.videos) - set(names))
        if unknown:
            raise VideoDataError(f"queries name videos that are not in {videos}: {unknown[:10]}")
        truth = [names.index(v) for v in query_file.videos]
    texts = tokenizer(query_file.texts)
    clips = (  # one video's pixels in memory at a time
        load_video_clips(path, sampling, preprocess, frames_fps=frames_fps).pixels
        for path in progress_bar(video_paths, desc="scoring videos", unit="video", enabled=progress)
    )
    scores = score_videos(model, clips, texts, config)  # (queries, videos)
    ranked = scores.topk(min(top_k, len(names)), dim=1)
    top = [
        [(names[i], float(s)) for s, i in zip(values.tolist(), indices.tolist())]
        for values, indices in zip(ranked.values, ranked.indices)
    ]
    metrics = retrieval_metrics(scores, truth, recall_ks=(1, 5, 10)).summary() if truth is not None else None
    return VideoRanking(names, query_file.texts, scores, top, metrics)


@dataclass
class QuestionPlan:
    """The questions of a file, each with its video, and what the model must be to answer them."""

    questions: Questions
    targets: list[Path]  # the video of each question
    answer_list: list[str] | None  # open-ended: the model's answers, by label; None for multiple choice

    @property
    def multiple_choice(self) -> bool:
        return self.questions.options is not None

    @property
    def task(self) -> str:
        return "multiple_choice" if self.multiple_choice else "qa"

    @property
    def num_outputs(self) -> int | None:
        return None if self.answer_list is None else len(self.answer_list)


def plan_questions(
    questions: str | Path,
    video: str | Path | None = None,
    videos: str | Path | None = None,
    answers: str | Path | None = None,
) -> QuestionPlan:
    """Read a questions file; every question is about ``video``, or names its own in the folder ``videos``."""
    question_file = read_questions(questions)
    if (video is None) == (videos is None):
        raise ValueError("give exactly one video, or a videos folder (with .jsonl 'video' fields)")
    if videos is not None:
        if question_file.videos is None:
            raise VideoDataError(
                "a videos folder needs a .jsonl questions file whose records name their 'video'"
            )
        by_name = {video_name(p): p for p in list_videos(videos)}
        unknown = sorted(set(question_file.videos) - set(by_name))
        if unknown:
            raise VideoDataError(f"questions name videos that are not in {videos}: {unknown[:10]}")
        targets = [by_name[name] for name in question_file.videos]
    else:
        targets = [Path(video)] * len(question_file.questions)
    answer_list = None
    if question_file.options is None:
        if answers is None:
            raise ValueError("open-ended questions need the model's answer vocabulary (ans2label.json)")
        answer_list = load_answer_vocabulary(answers)
    return QuestionPlan(question_file, targets, answer_list)


@dataclass
class VideoAnswers:
    questions: list[str]
    answers: list[str]  # the predicted answer (open-ended) or option text (multiple choice)
    options: list[int] | None = None  # the chosen option's index, for multiple choice
    accuracy: float | None = None  # when the file gives the answers
    truth: list[str] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        report: dict[str, Any] = {
            "questions": [{"question": q, "answer": a} for q, a in zip(self.questions, self.answers)]
        }
        if self.accuracy is not None:
            report["accuracy"] = self.accuracy
        return report


def answer_questions(
    model: ClipBert,
    tokenizer: BertWordPieceTokenizer,
    plan: QuestionPlan,
    sampling: SparseSamplingConfig | None = None,
    preprocess: VideoPreprocessConfig | None = None,
    config: QAConfig | None = None,
    frames_fps: float | None = None,
    progress: bool = False,
) -> VideoAnswers:
    """Answer every question of ``plan``; each video is decoded once, for all of its questions."""
    sampling, preprocess = sampling or SparseSamplingConfig(), preprocess or VideoPreprocessConfig()
    questions = plan.questions
    predictions: list[str] = [""] * len(plan.targets)
    chosen: list[int] = [-1] * len(plan.targets)
    unique = list(dict.fromkeys(plan.targets))
    for target in progress_bar(unique, desc="answering", unit="video", enabled=progress):
        rows = [i for i, t in enumerate(plan.targets) if t == target]
        pixels = load_video_clips(target, sampling, preprocess, frames_fps=frames_fps).pixels
        asked = [questions.questions[i] for i in rows]
        if plan.multiple_choice:
            options = [questions.options[i] for i in rows]
            result = answer_multiple_choice(model, tokenizer, pixels, asked, options, config)
        else:
            result = answer_open_ended(model, tokenizer, pixels, asked, plan.answer_list, config)
        for row, answer, index in zip(rows, result.answers, result.predicted):
            predictions[row], chosen[row] = answer, index
    result = VideoAnswers(questions.questions, predictions, chosen if plan.multiple_choice else None)
    if questions.answers is not None:
        truth = questions.answers
        if plan.multiple_choice:  # an option's index or its text
            truth = [
                o[t] if isinstance(t, int) and 0 <= t < len(o) else t
                for t, o in zip(truth, questions.options)
            ]
        result.truth = [str(t) for t in truth]
        result.accuracy = qa_accuracy(predictions, result.truth)
    return result
