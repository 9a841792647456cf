"""Video question answering with ClipBERT: open-ended classification and multiple choice.

Reference: jayleicn/ClipBERT ``src/tasks/run_video_qa.py`` and ``src/datasets/dataset_video_qa.py``.

- Open-ended (TGIF-QA FrameQA, MSRVTT-QA): the question alone is the text; the MLP head outputs one
  logit per answer of the training answer vocabulary (``train_ans2label.json``: answer -> label);
  clip logits are aggregated and the argmax is the prediction.
- Multiple choice (TGIF-QA Action, Transition): each option is appended to the question
  (``question + " " + option``), the 1-output MLP head scores each pair, and the argmax over options
  (after clip aggregation) is the prediction.

Accuracy is the share of questions answered exactly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from polyclip.domains.clipbert.aggregate import aggregate_clip_logits
from polyclip.domains.clipbert.model import ClipBert
from polyclip.domains.clipbert.retrieval import clip_logits_for_texts, video_tokens
from polyclip.domains.clipbert.tokenizer import BertWordPieceTokenizer


class QAError(ValueError):
    """Questions, options or answer vocabularies that a QA model cannot use."""


@dataclass
class QAConfig:
    aggregation: str = "lse"  # the MSRVTT-QA config's score_agg_func
    pair_batch_size: int = 64  # (text, clip) pairs per cross-encoder pass
    frame_batch_size: int = 32
    bf16: bool = False  # bfloat16 autocast (see VideoRetrievalConfig)


def load_answer_vocabulary(path: str | Path) -> list[str]:
    """``ans2label.json`` ({answer: label}) -> answers ordered by label; labels must be 0..K-1."""
    path = Path(path)
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise QAError(f"cannot read the answer vocabulary {path}: {error}") from error
    if isinstance(mapping, list):
        return [str(a) for a in mapping]
    if not isinstance(mapping, dict) or not all(isinstance(v, int) for v in mapping.values()):
        raise QAError(f"{path} must map each answer to an integer label (or list the answers in order)")
    labels = sorted(mapping.values())
    if labels != list(range(len(labels))):
        raise QAError(f"{path}: labels must be exactly 0..{len(labels) - 1}")
    answers = [""] * len(labels)
    for answer, label in mapping.items():
        answers[label] = answer
    return answers


@dataclass
class QAPrediction:
    logits: torch.Tensor  # (M, K) aggregated logits: K answers (open-ended) or K options (multiple choice)
    predicted: list[int]  # (M,) argmax labels
    answers: list[str] | None = None  # predicted answer strings when an answer vocabulary is known


@torch.no_grad()
def answer_open_ended(
    model: ClipBert,
    tokenizer: BertWordPieceTokenizer,
    pixels: torch.Tensor,
    questions: Sequence[str],
    answers: Sequence[str] | None = None,
    config: QAConfig | None = None,
) -> QAPrediction:
    """Questions about one video, clips ``(C, T, 3, S, S)`` -> the most likely answer of each."""
    config = config or QAConfig()
    K = model.config.head.num_outputs
    if answers is not None and len(answers) != K:
        raise QAError(f"the answer vocabulary has {len(answers)} answers; the model's head has {K} outputs")
    model.eval()
    tokens = video_tokens(model, pixels, config.frame_batch_size, config.bf16)
    logits = aggregate_clip_logits(
        clip_logits_for_texts(model, tokens, tokenizer(list(questions)), config.pair_batch_size, config.bf16),
        config.aggregation,
    ).cpu()  # (M, K)
    predicted = logits.argmax(dim=1).tolist()
    return QAPrediction(logits, predicted, [answers[i] for i in predicted] if answers is not None else None)


@torch.no_grad()
def answer_multiple_choice(
    model: ClipBert,
    tokenizer: BertWordPieceTokenizer,
    pixels: torch.Tensor,
    questions: Sequence[str],
    options: Sequence[Sequence[str]],
    config: QAConfig | None = None,
) -> QAPrediction:
    """Each question with its options (the same number for every question) -> the best option's index."""
    config = config or QAConfig()
    if model.config.head.num_outputs != 1:
        raise QAError(
            f"multiple choice needs a 1-output head; this model has {model.config.head.num_outputs}"
        )
    if len(questions) != len(options) or not questions:
        raise QAError(f"{len(questions)} questions but {len(options)} option lists")
    num_options = {len(o) for o in options}
    if len(num_options) != 1 or 0 in num_options:
        raise QAError(f"every question needs the same, non-zero number of options; got {sorted(num_options)}")
    num_choices = num_options.pop()
    texts = [f"{q} {option}" for q, opts in zip(questions, options) for option in opts]
    model.eval()
    tokens = video_tokens(model, pixels, config.frame_batch_size, config.bf16)
    clip_logits = clip_logits_for_texts(
        model, tokens, tokenizer(texts), config.pair_batch_size, config.bf16
    )  # (C, M*num_choices, 1)
    clip_logits = clip_logits.view(clip_logits.shape[0], len(questions), num_choices)  # (C, M, num_choices)
    logits = aggregate_clip_logits(clip_logits, config.aggregation).cpu()  # (M, num_choices)
    predicted = logits.argmax(dim=1).tolist()
    return QAPrediction(logits, predicted, [options[m][i] for m, i in enumerate(predicted)])


def qa_accuracy(predicted: Sequence[int | str], truth: Sequence[int | str]) -> float:
    if len(predicted) != len(truth) or not truth:
        raise QAError(f"{len(predicted)} predictions for {len(truth)} answers")
    return sum(p == t for p, t in zip(predicted, truth)) / len(truth)
