"""The answer vocabulary: one classifier output per (answer, answer type) seen in training.

As the reference (``lib/utils/create_label.py`` of PubMedCLIP's QCR/MEVF code): answers are
lower-cased with runs of whitespace collapsed; closed-question answers come first, then open ones,
and an answer given to both kinds of question has two entries (the reference appends "#" to the
open one). The target of a question is 1.0 on its answer's entry and 0 elsewhere; an answer absent
from the vocabulary gives an all-zero target (the question can only be scored wrong).

The reference builds the vocabulary from train and test together (the paper's protocol: a test answer
never seen in training still has an output); polyclip's default is the training records only, and
``build(train + test)`` is the reference's choice (``medvqa train --answers trainval``). A published
``trainval_ans2label.pkl`` is read with ``from_ans2label``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from polyclip.domains.medvqa.errors import MedVQAConfigError

ANSWER_TYPES = ("CLOSED", "OPEN")


def normalize_answer(answer: object) -> str:
    return " ".join(str(answer).lower().split())


class AnswerVocabulary:
    def __init__(self, entries: Sequence[tuple[str, str]]):
        """``entries``: (normalised answer, "CLOSED" | "OPEN") per classifier output, in order."""
        if not entries:
            raise MedVQAConfigError("the answer vocabulary is empty: no training record has an answer")
        self.entries = [(normalize_answer(answer), kind) for answer, kind in entries]
        for _, kind in self.entries:
            if kind not in ANSWER_TYPES:
                raise MedVQAConfigError(f"answer type must be one of {ANSWER_TYPES}, got {kind!r}")
        self.index = {entry: position for position, entry in enumerate(self.entries)}
        if len(self.index) != len(self.entries):
            raise MedVQAConfigError("the answer vocabulary has repeated (answer, type) entries")

    @classmethod
    def build(cls, records: Iterable) -> AnswerVocabulary:
        """From records with ``answer`` and ``answer_type``: closed answers first, then open ones."""
        seen: dict[str, dict[str, None]] = {kind: {} for kind in ANSWER_TYPES}
        for record in records:
            seen[record.answer_type][normalize_answer(record.answer)] = None
        return cls([(answer, kind) for kind in ANSWER_TYPES for answer in seen[kind]])

    @classmethod
    def from_ans2label(cls, ans2label: dict[str, int], records: Iterable = ()) -> AnswerVocabulary:
        """The reference's ``{answer: label}``, in label order. A key ending in "#" is an open answer that is
        also a closed one; any other key is closed when some record gives it to a closed question, or,
        without records, when it precedes the first "#" key (closed answers come first)."""
        closed = {normalize_answer(r.answer) for r in records if r.answer_type == "CLOSED"}
        ordered = sorted(ans2label.items(), key=lambda item: item[1])
        first_hash = next((label for key, label in ordered if key.endswith("#")), len(ordered))
        entries = []
        for key, label in ordered:
            if key.endswith("#"):
                entries.append((key[:-1], "OPEN"))
            elif closed:
                entries.append((key, "CLOSED" if normalize_answer(key) in closed else "OPEN"))
            else:
                entries.append((key, "CLOSED" if label < first_hash else "OPEN"))
        return cls(entries)

    def __len__(self) -> int:
        return len(self.entries)

    def label(self, answer: object, answer_type: str) -> int | None:
        return self.index.get((normalize_answer(answer), answer_type))

    def answer(self, label: int) -> str:
        return self.entries[label][0]

    def target(self, answer: object, answer_type: str) -> torch.Tensor:
        """(A,) soft target: 1.0 on the answer's entry, zeros if the answer is not in the vocabulary."""
        target = torch.zeros(len(self.entries))
        label = self.label(answer, answer_type)
        if label is not None:
            target[label] = 1.0
        return target

    @property
    def num_closed(self) -> int:
        return sum(kind == "CLOSED" for _, kind in self.entries)

    def to_json(self) -> dict:
        return {"entries": [list(entry) for entry in self.entries]}

    @classmethod
    def from_json(cls, data: dict) -> AnswerVocabulary:
        try:
            return cls([(str(answer), str(kind)) for answer, kind in data["entries"]])
        except (KeyError, TypeError, ValueError) as error:
            raise MedVQAConfigError(
                'a saved answer vocabulary is {"entries": [[answer, "CLOSED" | "OPEN"], ...]}'
            ) from error


__all__ = ["ANSWER_TYPES", "AnswerVocabulary", "normalize_answer"]
