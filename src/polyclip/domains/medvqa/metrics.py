"""Medical VQA accuracy on closed, open and all questions (and per question type).

A question's score is the target value of the predicted answer (the reference's
``compute_score_with_logits``: argmax of the logits, then its entry of the target): 1 for the right
answer, 0 otherwise with VQA-RAD/SLAKE's single answers. Accuracy is the mean score over the
questions of each kind, as ``MEVF_PubMedCLIP/test.py`` reports it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from polyclip.domains.medvqa.answers import normalize_answer
from polyclip.domains.medvqa.errors import MedVQAError


def answer_scores(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, A) logits, (B, A) targets -> (B,) target score of each argmax answer."""
    predicted = logits.argmax(dim=1, keepdim=True)  # (B, 1)
    return targets.gather(1, predicted).squeeze(1)


@dataclass
class AccuracyReport:
    overall: float
    closed: float | None  # None when there is no question of the kind
    open: float | None
    counts: dict[str, int]  # "overall", "closed", "open"
    by_question_type: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "overall": self.overall,
            "closed": self.closed,
            "open": self.open,
            "counts": dict(self.counts),
            "by_question_type": dict(self.by_question_type),
        }


def accuracy_by_type(
    scores: Sequence[float] | torch.Tensor,
    answer_types: Sequence[str],
    question_types: Sequence[str] | None = None,
) -> AccuracyReport:
    """Mean score over all questions, over CLOSED and over OPEN ones, and per question type."""
    scores = [float(s) for s in scores]
    if len(scores) != len(answer_types):
        raise MedVQAError(f"{len(scores)} scores for {len(answer_types)} answer types")
    if not scores:
        raise MedVQAError("accuracy of no questions is undefined")
    kinds = [kind.upper() for kind in answer_types]
    unknown = sorted(set(kinds) - {"OPEN", "CLOSED"})
    if unknown:
        raise MedVQAError(f"answer types must be OPEN or CLOSED, got {unknown}")

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    closed = [s for s, kind in zip(scores, kinds) if kind == "CLOSED"]
    opened = [s for s, kind in zip(scores, kinds) if kind == "OPEN"]
    per_type: dict[str, list[float]] = defaultdict(list)
    for score, question_type in zip(scores, question_types or []):
        if question_type:
            per_type[question_type].append(score)
    return AccuracyReport(
        overall=sum(scores) / len(scores),
        closed=mean(closed),
        open=mean(opened),
        counts={"overall": len(scores), "closed": len(closed), "open": len(opened)},
        by_question_type={name: sum(v) / len(v) for name, v in sorted(per_type.items())},
    )


def score_answers(predicted: Sequence[str], expected: Sequence[str]) -> list[float]:
    """Exact match after the answer normalisation (lower case, single spaces): 1.0 or 0.0 each."""
    if len(predicted) != len(expected):
        raise MedVQAError(f"{len(predicted)} predictions for {len(expected)} questions")
    return [float(normalize_answer(p) == normalize_answer(e)) for p, e in zip(predicted, expected)]


__all__ = ["AccuracyReport", "accuracy_by_type", "answer_scores", "score_answers"]
