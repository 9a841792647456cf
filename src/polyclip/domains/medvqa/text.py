"""Questions as word ids: MEVF's word tokenizer and dictionary, GloVe vectors and the tf-idf
smoothed word embedding of the 600-d variant.

Matches the reference ``Dictionary`` of PubMedCLIP's MEVF/QCR code (``lib/utils/create_dictionary.py``,
inherited from ban-vqa): lower-case; the suffixes "? -yes/no", "? -open", "? - open" removed; commas,
question marks, "..." and full stops dropped; "'s" split off as its own word; "x ray" -> "x-ray";
split on whitespace. Questions are cut or padded at the end to 12 ids with the padding id
``len(dictionary)``. The reference maps an unknown word to the dictionary's last word; a dictionary
built here ends with ``<unk>``, so the same rule gives unknown words a slot of their own.

tf-idf (``tfidf_from_questions`` of the reference, from ban-vqa): for every question, every pair of
its words (i, j) adds 1 / count(j) to both (i, j) and (j, i) (count = occurrences of the word in the
questions); rows are then normalised to sum to one, and the second embedding is this matrix times the
GloVe vectors. The reference divides ``vals[col]`` (indexed by the word, not the entry), which leaves
most entries unweighted; here each entry is weighted as the comment of the reference intends.
"""

from __future__ import annotations

import gzip
import itertools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from polyclip.domains.medvqa.errors import WordVectorError

UNKNOWN_WORD = "<unk>"
QUESTION_SUFFIXES = ("? -yes/no", "? -open", "? - open")  # VQA-RAD's question-type annotations
# (old, new) in the reference's order: "..." must go before "."
REPLACEMENTS = ((",", ""), ("?", ""), ("'s", " 's"), ("...", ""), ("x ray", "x-ray"), (".", ""))


def tokenize(question: str) -> list[str]:
    """A question -> its words, with the reference's lower-casing and punctuation rules."""
    text = question.lower()
    for suffix in QUESTION_SUFFIXES:
        text = text.replace(suffix, "")
    for old, new in REPLACEMENTS:
        text = text.replace(old, new)
    return text.split()


class QuestionDictionary:
    """Word <-> id. Id ``len(self)`` is the padding id (the embedding's extra last row)."""

    def __init__(self, words: Sequence[str]):
        if not words:
            raise WordVectorError("a question dictionary needs at least one word")
        if len(set(words)) != len(words):
            raise WordVectorError("the dictionary's words must be distinct")
        self.words = list(words)
        self.word_to_id = {word: index for index, word in enumerate(self.words)}

    @classmethod
    def build(cls, questions: Iterable[str]) -> QuestionDictionary:
        """Words in order of first appearance, then ``<unk>``."""
        words: dict[str, None] = {}
        for question in questions:
            words.update(dict.fromkeys(tokenize(question)))
        words.pop(UNKNOWN_WORD, None)
        return cls([*words, UNKNOWN_WORD])

    def __len__(self) -> int:
        return len(self.words)

    @property
    def padding_id(self) -> int:
        return len(self.words)

    @property
    def unknown_id(self) -> int:
        # the reference's rule: padding_idx - 1, the last word (``<unk>`` for dictionaries built here)
        return len(self.words) - 1

    def ids(self, question: str) -> list[int]:
        return [self.word_to_id.get(word, self.unknown_id) for word in tokenize(question)]

    def encode(self, question: str, length: int) -> torch.Tensor:
        """(length,) ids: cut to ``length`` words, padded at the end with the padding id."""
        ids = self.ids(question)[:length]
        return torch.tensor(ids + [self.padding_id] * (length - len(ids)), dtype=torch.long)

    def encode_batch(self, questions: Sequence[str], length: int) -> torch.Tensor:
        """(B, length) ids."""
        if not questions:
            return torch.empty(0, length, dtype=torch.long)
        return torch.stack([self.encode(question, length) for question in questions])

    def to_json(self) -> dict:
        return {"words": self.words}

    @classmethod
    def from_json(cls, data: dict) -> QuestionDictionary:
        if not isinstance(data, dict) or not isinstance(data.get("words"), list):
            raise WordVectorError('a saved dictionary is a JSON object {"words": [...]}')
        return cls([str(word) for word in data["words"]])


def load_word_vectors(path: str | Path, dictionary: QuestionDictionary) -> tuple[np.ndarray, int]:
    """GloVe vectors for the dictionary's words: ``(len(dictionary), D)`` float32 and how many were found.

    ``path`` is GloVe's text format (``word v1 ... vD`` per line, optionally gzipped): only the
    dictionary's words are kept and missing words get zeros, as the reference's
    ``create_glove_embedding_init``. A ``.npy`` file must already be aligned with the dictionary (one row
    per word, in order), like the reference's ``glove6b_init_300d.npy``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WordVectorError(f"word vector file {path} does not exist")
    if path.suffix == ".npy":
        try:
            vectors = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as error:
            raise WordVectorError(f"cannot read {path} as a .npy array: {error}") from error
        if vectors.ndim != 2 or vectors.shape[0] != len(dictionary):
            raise WordVectorError(
                f"{path} holds an array of shape {vectors.shape}; a .npy file must have one row per "
                f"dictionary word ({len(dictionary)} rows, in the dictionary's order)"
            )
        vectors = vectors.astype(np.float32)
        return vectors, int(np.count_nonzero(np.abs(vectors).sum(1)))
    return _read_glove_text(path, dictionary)


def _read_glove_text(path: Path, dictionary: QuestionDictionary) -> tuple[np.ndarray, int]:
    opener = gzip.open if path.suffix == ".gz" else open
    vectors: np.ndarray | None = None
    found = 0
    try:
        with opener(path, "rt", encoding="utf-8") as file:
            for line_number, line in enumerate(file, start=1):
                parts = line.rstrip().split(" ")
                if vectors is None:
                    if len(parts) < 2:
                        raise WordVectorError(f"{path}:{line_number}: expected 'word v1 ... vD'")
                    vectors = np.zeros((len(dictionary), len(parts) - 1), dtype=np.float32)
                dim = vectors.shape[1]
                if len(parts) < dim + 1:
                    raise WordVectorError(
                        f"{path}:{line_number}: {len(parts) - 1} values where the first line has {dim}"
                    )
                word = " ".join(parts[:-dim])  # a few GloVe releases have words with spaces
                index = dictionary.word_to_id.get(word)
                if index is None:
                    continue
                try:
                    vectors[index] = np.asarray(parts[-dim:], dtype=np.float32)
                except ValueError as error:
                    raise WordVectorError(
                        f"{path}:{line_number}: not a vector of numbers ({error})"
                    ) from None
                found += 1
    except UnicodeDecodeError as error:
        raise WordVectorError(f"{path} is not UTF-8 text: {error}") from None
    except OSError as error:
        raise WordVectorError(f"cannot read {path}: {error}") from None
    if vectors is None:
        raise WordVectorError(f"{path} holds no word vectors")
    return vectors, found


def tfidf_matrix(questions: Iterable[str], dictionary: QuestionDictionary) -> torch.Tensor:
    """(N, N) row-stochastic word co-occurrence matrix weighted by inverse word counts."""
    size = len(dictionary)
    counts = np.zeros(size, dtype=np.float64)
    pairs: list[tuple[int, int]] = []
    for question in questions:
        ids = [i for i in dictionary.ids(question) if dictionary.words[i] != UNKNOWN_WORD]
        for i in ids:
            counts[i] += 1
        for a, b in itertools.combinations(ids, 2):
            pairs.append((a, b))
            pairs.append((b, a))
    matrix = np.zeros((size, size), dtype=np.float64)
    if pairs:
        rows, cols = np.asarray(pairs).T
        np.add.at(matrix, (rows, cols), 1.0 / counts[cols])
    totals = matrix.sum(1, keepdims=True)
    matrix = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    return torch.from_numpy(matrix.astype(np.float32))


def read_dictionary(path: str | Path) -> QuestionDictionary:
    """A dictionary saved by ``QuestionDictionary.to_json`` (or a plain JSON list of words)."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WordVectorError(f"dictionary file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise WordVectorError(f"{path} is not valid JSON: {error}") from None
    return QuestionDictionary.from_json({"words": data} if isinstance(data, list) else data)


__all__ = [
    "UNKNOWN_WORD",
    "QuestionDictionary",
    "load_word_vectors",
    "read_dictionary",
    "tfidf_matrix",
    "tokenize",
]
