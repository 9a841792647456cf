"""BERT WordPiece tokenisation as ClipBERT feeds its text (bert-base-uncased, lower-cased).

ClipBERT calls transformers' ``BertTokenizer.batch_encode_plus(texts, max_length=L,
pad_to_max_length=True)`` (jayleicn/ClipBERT ``src/datasets/dataset_video_retrieval.py``):
``[CLS] wordpieces [SEP]`` truncated to L tokens, padded with ``[PAD]`` to exactly L, and a 1/0 mask.
Here the same ids come from the Rust ``tokenizers`` library (BERT normaliser: text cleaning, Chinese
character splitting, lower-casing and accent stripping; BERT pre-tokeniser; WordPiece with ``##``
continuations and at most 100 characters per word), built from the user's ``vocab.txt``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from polyclip.tokenizers import TokenizerError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass
class TextBatch:
    input_ids: torch.Tensor  # (B, L) int64
    attention_mask: torch.Tensor  # (B, L) int64, 1 = token, 0 = padding


class BertWordPieceTokenizer:
    """``tokenizer(texts) -> TextBatch`` of fixed length ``max_length`` (MSRVTT retrieval uses 20)."""

    def __init__(self, vocab_file: str | Path, max_length: int = 20, lowercase: bool = True):
        vocab_file = Path(vocab_file)
        if vocab_file.is_dir():
            vocab_file = vocab_file / "vocab.txt"
        if not vocab_file.is_file():
            raise TokenizerError(f"no WordPiece vocabulary at {vocab_file} (a vocab.txt, one token per line)")
        if max_length < 2:
            raise TokenizerError(f"max_length must leave room for [CLS] and [SEP], got {max_length}")
        lines = vocab_file.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        vocab: dict[str, int] = {}
        for index, token in enumerate(lines):
            vocab[token] = index  # a repeated token keeps its last line, as transformers' load_vocab
        missing = [t for t in SPECIAL_TOKENS[:4] if t not in vocab]
        if missing:
            raise TokenizerError(f"{vocab_file} lacks the special tokens {missing}")
        self.vocab_file = vocab_file
        self.vocab = vocab
        self.max_length = max_length
        self.lowercase = lowercase
        self.pad_id = vocab["[PAD]"]

        backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        backend.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
        )
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
        backend.post_processor = processors.BertProcessing(("[SEP]", sep_id), ("[CLS]", cls_id))
        backend.decoder = decoders.WordPiece(prefix="##")
        backend.add_special_tokens([t for t in SPECIAL_TOKENS if t in vocab])
        backend.enable_truncation(max_length=max_length)
        backend.enable_padding(length=max_length, pad_id=self.pad_id, pad_token="[PAD]")
        self.backend = backend

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __call__(self, texts: str | Sequence[str]) -> TextBatch:
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
            raise TokenizerError("the tokenizer takes a str or a sequence of str")
        if not texts:
            raise TokenizerError("nothing to tokenize: the text list is empty")
        encodings = self.backend.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
        return TextBatch(input_ids=ids, attention_mask=mask)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)
