"""Text tokenizers of the CLIP family: CLIP's byte-level BPE, SigLIP's SentencePiece, SigLIP 2's Gemma BPE.

``ClipTokenizer`` reproduces the tokenizer of OpenAI CLIP (Radford et al. 2021, "Learning Transferable
Visual Models From Natural Language Supervision"; reference: openai/CLIP ``clip/simple_tokenizer.py`` and
``clip.tokenize(..., truncate=True)``) id for id. The byte-pair merges run in the Rust ``tokenizers``
library; only the text cleaning and the word split run in Python.

``SiglipTokenizer`` reproduces the SentencePiece tokenizer of SigLIP (Zhai et al. 2023, "Sigmoid Loss for
Language Image Pre-Training"; reference: transformers ``models/siglip/tokenization_siglip.py`` called with
``padding="max_length", truncation=True, max_length=64``) id for id.

``GemmaTokenizer`` is SigLIP 2's (Tschannen et al. 2025): the folder's Gemma ``tokenizer.json`` run by the
``tokenizers`` library on lower-cased text (transformers ``Siglip2Tokenizer``), see its docstring.

Every tokenizer maps ``str | Sequence[str]`` to a ``torch.LongTensor`` of shape ``(B, context_length)``
and describes itself with a JSON-able ``config`` that ``build_tokenizer`` turns back into a tokenizer.
"""

from __future__ import annotations

import functools
import gzip
import html
import json
import re
import shutil
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ftfy
import numpy as np
import regex
import sentencepiece
import torch
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors

__all__ = [
    "ClipTokenizer",
    "GemmaTokenizer",
    "MissingTokenizerError",
    "SiglipTokenizer",
    "TokenizerError",
    "UnavailableTokenizer",
    "build_tokenizer",
    "canonicalize_siglip_text",
    "clean_clip_text",
    "tokenizer_from_hf_folder",
]


class TokenizerError(ValueError):
    """A tokenizer cannot be built from the given files or settings, or was given invalid input."""


class MissingTokenizerError(TokenizerError):
    """A checkpoint folder holds no tokenizer files at all (as opposed to files that are wrong)."""


# ---------------------------------------------------------------------------------------------------------
# shared helpers


def _as_text_list(texts: str | Sequence[str]) -> list[str]:
    """Accepts one string or a sequence of strings; anything else is a TokenizerError."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Sequence):
        raise TokenizerError(
            f"tokenizer input must be a str or a sequence of str, got {type(texts).__name__}"
        )
    text_list = list(texts)
    for index, text in enumerate(text_list):
        if not isinstance(text, str):
            raise TokenizerError(
                f"tokenizer input must be a str or a sequence of str; item {index} is "
                f"{type(text).__name__} ({text!r:.60})"
            )
    return text_list


def _single_text(text: Any) -> str:
    if not isinstance(text, str):
        raise TokenizerError(f"encode takes one str, got {type(text).__name__} ({text!r:.60})")
    return text


def _checked_context_length(context_length: Any, minimum: int) -> int:
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < minimum:
        raise TokenizerError(
            f"context_length must be an integer >= {minimum} (room for the special tokens), got {context_length!r}"
        )
    return context_length


def _pack_rows(rows: list[list[int]], length: int, pad_id: int) -> torch.Tensor:
    """Right-pads rows of ids (each at most ``length`` long) into a (B, length) int64 tensor."""
    packed = np.full((len(rows), length), pad_id, dtype=np.int64)  # (B, L)
    for row_index, row in enumerate(rows):
        packed[row_index, : len(row)] = row
    return torch.from_numpy(packed)


def _ids_as_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
            raise TokenizerError(
                f"decode takes one sequence of integer ids (1-D), got a {ids.dtype} tensor of shape {tuple(ids.shape)}"
            )
        return [int(i) for i in ids.tolist()]
    id_list = list(ids)
    for value in id_list:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TokenizerError(
                f"decode takes integer token ids, got {type(value).__name__} ({value!r:.60})"
            )
    return [int(value) for value in id_list]


# ---------------------------------------------------------------------------------------------------------
# CLIP byte-level BPE

DEFAULT_CLIP_BPE_PATH = Path(__file__).with_name("data") / "bpe_simple_vocab_16e6.txt.gz"
CLIP_START_TOKEN = "<|startoftext|>"
CLIP_END_TOKEN = "<|endoftext|>"
# OpenAI keeps the first 49152 - 256 - 2 merges of the file: with the 2 * 256 byte tokens and the two
# special tokens this gives the 49408-token vocabulary of every released CLIP text tower.
CLIP_NUM_MERGES = 49152 - 256 - 2
_END_OF_WORD = "</w>"

# CLIP's word split. The `regex` module (not the Rust one inside `tokenizers`) runs it: the two engines
# disagree on some 17k code points (letters added in recent Unicode versions, case folding of combining
# marks under IGNORECASE), and the reference runs exactly this pattern with `regex`.
_CLIP_WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_CLIP_WHITESPACE = regex.compile(r"\s+")  # the reference's `\s` is the `regex` module's, not `re`'s
# Text made only of printable ASCII, tabs and newlines and without "&" passes ftfy.fix_text and
# html.unescape unchanged, so those (slow) fixes run only on text that holds anything else.
_CLIP_NEEDS_FIXING = re.compile(r"[^\t\n\x20-\x7e]|&")


def clean_clip_text(text: str) -> str:
    """OpenAI CLIP's cleaning: ftfy, HTML unescaped twice, whitespace collapsed and stripped, lower case."""
    if _CLIP_NEEDS_FIXING.search(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return _CLIP_WHITESPACE.sub(" ", text.strip()).strip().lower()


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (byte-level BPE alphabet).

    Printable Latin-1 bytes map to themselves; the remaining 68 bytes (controls, space, a few others) map,
    in byte order, to the characters from U+0100 upwards. Dict order is the vocabulary order.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    code_points = {byte: byte for byte in printable}
    next_free = 256
    for byte in range(256):
        if byte not in code_points:
            code_points[byte] = next_free
            next_free += 1
    return {byte: chr(code_point) for byte, code_point in code_points.items()}


@functools.lru_cache(maxsize=4)
def _read_clip_merges(bpe_path: str) -> tuple[tuple[str, str], ...]:
    path = Path(bpe_path)
    try:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            lines = handle.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise TokenizerError(f"cannot read the CLIP BPE merges file {path}: {error}") from error
    merge_lines = lines[1 : 1 + CLIP_NUM_MERGES]  # line 0 is a version header
    if len(merge_lines) < CLIP_NUM_MERGES:
        raise TokenizerError(
            f"{path} holds {len(merge_lines)} merges after its header; a CLIP BPE file holds at least {CLIP_NUM_MERGES}"
        )
    merges = []
    for line_number, line in enumerate(merge_lines, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerError(f"{path} line {line_number} is not a BPE merge ('left right'): {line!r:.80}")
        merges.append((parts[0], parts[1]))
    return tuple(merges)


@functools.lru_cache(maxsize=4)
def _clip_vocabulary(bpe_path: str) -> tuple[str, ...]:
    """Token strings in id order: 256 byte characters, the same with ``</w>``, the merges, then specials."""
    byte_chars = list(_bytes_to_unicode().values())
    merged = ["".join(pair) for pair in _read_clip_merges(bpe_path)]
    return (
        *byte_chars,
        *(char + _END_OF_WORD for char in byte_chars),
        *merged,
        CLIP_START_TOKEN,
        CLIP_END_TOKEN,
    )


@functools.lru_cache(maxsize=4)
def _clip_backend(bpe_path: str) -> Tokenizer:
    """The Rust BPE pipeline, built once per process and merges file.

    Input: the words of a cleaned text joined by single spaces. Pipeline: the two special tokens are
    matched whole (only a word equal to one of them can contain them), then the text is split at the
    spaces, each word is mapped byte-wise to the GPT-2 alphabet (no prefix space, no second regex split),
    and BPE runs per word with ``</w>`` glued to its last symbol, as in OpenAI's ``bpe()``.
    """
    vocabulary = _clip_vocabulary(bpe_path)
    token_to_id = {token: index for index, token in enumerate(vocabulary)}
    bpe = models.BPE(
        vocab=token_to_id,
        merges=list(_read_clip_merges(bpe_path)),
        end_of_word_suffix=_END_OF_WORD,
        continuing_subword_prefix="",
    )
    backend = Tokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(" ", behavior="removed"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in (CLIP_START_TOKEN, CLIP_END_TOKEN)]
    )
    return backend


class ClipTokenizer:
    """OpenAI CLIP's tokenizer: ``[sot] + BPE ids + [eot]``, zero padded to ``context_length``.

    Text longer than ``context_length`` is cut so that the last position still holds ``eot`` (OpenAI's
    ``truncate=True``), because CLIP text towers pool at the ``eot`` position.
    """

    def __init__(self, context_length: int = 77, bpe_path: str | Path | None = None) -> None:
        self._context_length = _checked_context_length(context_length, minimum=2)
        self._custom_bpe_path = None if bpe_path is None else Path(bpe_path).resolve()
        self._bpe_path = str(self._custom_bpe_path or DEFAULT_CLIP_BPE_PATH)
        if not Path(self._bpe_path).is_file():
            raise TokenizerError(f"CLIP BPE merges file not found: {self._bpe_path}")
        self._vocabulary = _clip_vocabulary(self._bpe_path)
        self._backend = _clip_backend(self._bpe_path)
        self._byte_decoder = {char: byte for byte, char in _bytes_to_unicode().items()}
        self._encode_texts = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)

    # -- pickling: workers rebuild the Rust pipeline from the (process-cached) merges file
    def __getstate__(self) -> dict[str, Any]:
        return {"context_length": self._context_length, "bpe_path": self._custom_bpe_path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["context_length"], state["bpe_path"])

    def __repr__(self) -> str:
        return f"ClipTokenizer(context_length={self._context_length}, vocab_size={self.vocab_size})"

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def vocab_size(self) -> int:
        return len(self._vocabulary)

    @property
    def sot_token_id(self) -> int:
        return len(self._vocabulary) - 2

    @property
    def eot_token_id(self) -> int:
        return len(self._vocabulary) - 1

    @property
    def pad_token_id(self) -> int:
        return 0  # OpenAI pads with zeros ("!"); the towers never look past eot

    @property
    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"type": "clip", "context_length": self._context_length}
        if self._custom_bpe_path is not None:
            config["bpe_path"] = str(self._custom_bpe_path)
        return config

    def save(self, directory: str | Path) -> dict[str, Any]:
        """Copies the files this tokenizer needs into ``directory``; returns the config to store there."""
        config = {"type": "clip", "context_length": self._context_length}
        if self._custom_bpe_path is not None:
            directory = Path(directory)
            directory.mkdir(parents=True, exist_ok=True)
            target = directory / self._custom_bpe_path.name
            if target.resolve() != self._custom_bpe_path:
                shutil.copyfile(self._custom_bpe_path, target)
            config["bpe_path"] = target.name
        return config

    def save_hf(self, directory: str | Path) -> None:
        """Write transformers' CLIPTokenizer files (vocab.json, merges.txt, tokenizer_config.json)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        vocabulary = _clip_vocabulary(str(self._bpe_path))
        (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocabulary)}))
        merges = _read_clip_merges(str(self._bpe_path))
        (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        specials = {"bos_token": CLIP_START_TOKEN, "eos_token": CLIP_END_TOKEN, "unk_token": CLIP_END_TOKEN,
                    "pad_token": CLIP_END_TOKEN}
        (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self._context_length, **specials}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        joined_words = [" ".join(_CLIP_WORD_PATTERN.findall(clean_clip_text(text))) for text in texts]
        return [encoding.ids for encoding in self._encode_texts(joined_words, add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without special tokens and without truncation."""
        return self._encode_many([_single_text(text)])[0]

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Token ids, (B, context_length) int64; a single string gives B = 1."""
        text_list = _as_text_list(texts)
        length = (
            self._context_length if context_length is None else _checked_context_length(context_length, 2)
        )
        sot, eot = self.sot_token_id, self.eot_token_id
        rows = [[sot, *ids[: length - 2], eot] for ids in self._encode_many(text_list)]
        return _pack_rows(rows, length, self.pad_token_id)  # (B, L)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of a sequence of ids.

        With ``skip_special_tokens`` the ids after the first ``eot`` (the padding) and every ``sot`` are
        dropped and the result is stripped; without it this is OpenAI's ``decode`` exactly.
        """
        id_list = _ids_as_list(ids)
        if skip_special_tokens:
            if self.eot_token_id in id_list:
                id_list = id_list[: id_list.index(self.eot_token_id)]
            id_list = [token_id for token_id in id_list if token_id != self.sot_token_id]
        for token_id in id_list:
            if not 0 <= token_id < self.vocab_size:
                raise TokenizerError(
                    f"token id {token_id} is outside the CLIP vocabulary (0..{self.vocab_size - 1})"
                )
        symbols = "".join(self._vocabulary[token_id] for token_id in id_list)
        text = bytes(self._byte_decoder[char] for char in symbols).decode("utf-8", errors="replace")
        text = text.replace(_END_OF_WORD, " ")
        return text.strip() if skip_special_tokens else text


# ---------------------------------------------------------------------------------------------------------
# SigLIP SentencePiece

_SIGLIP_EOS_TOKEN = "</s>"  # also the padding token
_SIGLIP_UNK_TOKEN = "<unk>"
_SPIECE_UNDERLINE = "\u2581"
# transformers splits the text at its special tokens before anything else (the whitespace they swallow on
# both sides would be stripped by the canonicalisation anyway).
_SIGLIP_SPECIAL_SPLIT = re.compile(f"({re.escape(_SIGLIP_EOS_TOKEN)}|{re.escape(_SIGLIP_UNK_TOKEN)})")
_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)
_ASCII_WHITESPACE_RUNS = re.compile(r"\s+")


def canonicalize_siglip_text(text: str, lower_case: bool = True) -> str:
    """big_vision's text canonicalisation: lower case, ASCII punctuation removed, whitespace collapsed."""
    if lower_case:
        text = text.lower()
    text = text.translate(_PUNCTUATION_TABLE)
    return _ASCII_WHITESPACE_RUNS.sub(" ", text).strip()


def _basic_clean(text: str) -> str:
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def _open_clip_canonicalize(text: str) -> str:
    """open_clip's ``canonicalize_text`` (from big_vision): "_" to a space, ASCII punctuation removed, lower
    case, whitespace collapsed."""
    text = text.replace("_", " ").translate(_PUNCTUATION_TABLE).lower()
    return " ".join(text.split()).strip()


# open_clip's HFTokenizer cleans text before the Hugging Face tokenizer sees it (tokenizer.py, get_clean_fn)
OPEN_CLIP_CLEANERS = {
    "canonicalize": lambda text: _open_clip_canonicalize(_basic_clean(text)),
    "lower": lambda text: " ".join(_basic_clean(text).split()).strip().lower(),
    "whitespace": lambda text: " ".join(_basic_clean(text).split()).strip(),
}


class SiglipTokenizer:
    """SigLIP's tokenizer: SentencePiece ids of the canonicalised text + ``</s>``, padded with ``</s>``.

    ``clean`` names open_clip's cleaning of the text before the tokenizer proper (a key of
    OPEN_CLIP_CLEANERS), as open_clip folders record it (``text_cfg.tokenizer_kwargs.clean``); with
    "canonicalize" a literal ``</s>`` loses its punctuation before it could be read as the token.

    Text longer than ``context_length`` keeps its first ``context_length - 1`` pieces and then ``</s>``.
    As in transformers' slow tokenizer, literal ``</s>`` and ``<unk>`` in the text become their ids.
    (transformers appends no second ``</s>`` after a literal one; padding with ``</s>`` makes that
    invisible in the padded rows.)
    """

    def __init__(
        self,
        spiece_model_path: str | Path,
        context_length: int = 64,
        do_lower_case: bool = True,  # every released SigLIP checkpoint lower-cases
        clean: str | None = None,
    ) -> None:
        self._context_length = _checked_context_length(context_length, minimum=1)
        if clean is not None and clean not in OPEN_CLIP_CLEANERS:
            raise TokenizerError(f"clean must be one of {sorted(OPEN_CLIP_CLEANERS)} or absent, got {clean!r}")
        self._clean = clean
        if not isinstance(do_lower_case, bool):
            raise TokenizerError(f"do_lower_case must be true or false, got {do_lower_case!r}")
        self._do_lower_case = do_lower_case
        self._spiece_model_path = Path(spiece_model_path).resolve()
        if not self._spiece_model_path.is_file():
            raise TokenizerError(f"SentencePiece model not found: {self._spiece_model_path}")
        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.Load(str(self._spiece_model_path))
        except (OSError, RuntimeError) as error:
            raise TokenizerError(
                f"{self._spiece_model_path} is not a SentencePiece model: {error}"
            ) from error
        self._processor = processor
        self._special_ids = {
            token: self._required_piece_id(token) for token in (_SIGLIP_EOS_TOKEN, _SIGLIP_UNK_TOKEN)
        }
        # transformers encodes "<unk>" + text and drops the pieces of "<unk>", so that the text's first
        # piece is read as following other text (see SiglipTokenizer._tokenize).
        self._unk_piece_count = len(processor.encode(_SIGLIP_UNK_TOKEN, out_type=str))

    def _required_piece_id(self, piece: str) -> int:
        piece_id = self._processor.piece_to_id(piece)
        if self._processor.id_to_piece(piece_id) != piece:
            raise TokenizerError(
                f"{self._spiece_model_path} has no {piece!r} piece; SigLIP models need '</s>' and '<unk>'"
            )
        return piece_id

    def __getstate__(self) -> dict[str, Any]:
        return {
            "spiece_model_path": self._spiece_model_path,
            "context_length": self._context_length,
            "do_lower_case": self._do_lower_case,
            "clean": self._clean,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(
            state["spiece_model_path"], state["context_length"], state["do_lower_case"], state.get("clean")
        )

    def __repr__(self) -> str:
        return (
            f"SiglipTokenizer(spiece_model={str(self._spiece_model_path)!r}, "
            f"context_length={self._context_length}, vocab_size={self.vocab_size})"
        )

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    @property
    def sot_token_id(self) -> None:
        return None  # SigLIP has no start token

    @property
    def eot_token_id(self) -> int:
        return self._special_ids[_SIGLIP_EOS_TOKEN]

    @property
    def pad_token_id(self) -> int:
        return self._special_ids[_SIGLIP_EOS_TOKEN]

    @property
    def unk_token_id(self) -> int:
        return self._special_ids[_SIGLIP_UNK_TOKEN]

    @property
    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "type": "siglip",
            "context_length": self._context_length,
            "spiece_model": str(self._spiece_model_path),
        }
        if not self._do_lower_case:
            config["do_lower_case"] = False
        if self._clean is not None:
            config["clean"] = self._clean
        return config

    def save(self, directory: str | Path) -> dict[str, Any]:
        """Copies ``spiece.model`` into ``directory``; returns the config (with a relative path) to store."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / "spiece.model"
        if target.resolve() != self._spiece_model_path:
            shutil.copyfile(self._spiece_model_path, target)
        return {**self.config, "spiece_model": target.name}

    def save_hf(self, directory: str | Path) -> None:
        """Write transformers' SiglipTokenizer files (spiece.model, tokenizer_config.json)."""
        directory = Path(directory)
        self.save(directory)
        # SigLIP is trained and evaluated without an attention mask (big_vision; polyclip too): listing only
        # input_ids makes transformers' tokenizer and processor return none, so SiglipModel(**inputs)
        # attends to the padding as the model was trained to.
        config = {"tokenizer_class": "SiglipTokenizer", "model_max_length": self._context_length,
                  "do_lower_case": self.config.get("do_lower_case", True), "eos_token": "</s>",
                  "pad_token": "</s>", "unk_token": "<unk>", "model_input_names": ["input_ids"]}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        if self._clean is not None:
            texts = [OPEN_CLIP_CLEANERS[self._clean](text) for text in texts]
        # transformers marks the start of the text with "▁" (and turns any "▁" inside it into a space).
        marked = [_SPIECE_UNDERLINE + text.replace(_SPIECE_UNDERLINE, " ") for text in texts]
        chunked = [[chunk for chunk in _SIGLIP_SPECIAL_SPLIT.split(text) if chunk] for text in marked]
        plain_chunks = [
            _SIGLIP_UNK_TOKEN + canonicalize_siglip_text(chunk, self._do_lower_case)
            for chunks in chunked
            for chunk in chunks
            if chunk not in self._special_ids
        ]
        plain_pieces = iter(self._processor.encode(plain_chunks, out_type=str))
        skip = self._unk_piece_count
        encoded = []
        for chunks in chunked:
            pieces: list[str] = []
            for chunk in chunks:
                if chunk in self._special_ids:
                    pieces.append(chunk)
                else:
                    chunk_pieces = next(plain_pieces)
                    pieces.extend(chunk_pieces[skip:] if len(chunk_pieces) >= skip else chunk_pieces)
            if len(pieces) > 1 and pieces[0] == _SPIECE_UNDERLINE and pieces[1] in self._special_ids:
                pieces = pieces[1:]
            encoded.append(
                [
                    self._special_ids[piece]
                    if piece in self._special_ids
                    else self._processor.piece_to_id(piece)
                    for piece in pieces
                ]
            )
        return encoded

    def encode(self, text: str) -> list[int]:
        """SentencePiece ids of one text, without ``</s>`` and without truncation."""
        return self._encode_many([_single_text(text)])[0]

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Token ids, (B, context_length) int64; a single string gives B = 1."""
        text_list = _as_text_list(texts)
        length = (
            self._context_length if context_length is None else _checked_context_length(context_length, 1)
        )
        eos = self.eot_token_id
        rows = [[*ids[: length - 1], eos] for ids in self._encode_many(text_list)]
        return _pack_rows(rows, length, self.pad_token_id)  # (B, L)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of a sequence of ids; ``skip_special_tokens`` drops ``</s>`` (end and padding)."""
        id_list = _ids_as_list(ids)
        for token_id in id_list:
            if not 0 <= token_id < self.vocab_size:
                raise TokenizerError(
                    f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})"
                )
        if skip_special_tokens:
            id_list = [token_id for token_id in id_list if token_id != self.eot_token_id]
        return self._processor.decode(id_list)


# ---------------------------------------------------------------------------------------------------------
# SigLIP 2: Gemma's BPE with lower-casing

GEMMA_TOKENIZER_FILE = "tokenizer.json"
# Gemma's special tokens and ids (tokenizer.json of google/gemma-*, and so of every SigLIP 2 folder)
_GEMMA_DEFAULT_TOKENS = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>"}
_PADDING_SIDES = ("right", "left")


def _token_content(value: Any, key: str) -> str:
    """A special token as tokenizer_config.json records it: a string or an AddedToken object."""
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str) or not value:
        raise TokenizerError(f"tokenizer setting {key} must name a token, got {value!r}")
    return value


def gemma_settings(tokenizer_config: dict[str, Any]) -> dict[str, Any]:
    """The settings of `GemmaTokenizer` that a ``tokenizer_config.json`` records (only those it records).

    transformers' GemmaTokenizer rebuilds the tokenizer.json's post-processor from ``add_bos_token`` /
    ``add_eos_token`` when either is given (a missing one counting as false) and pads on ``padding_side``;
    the special tokens may be renamed.
    """
    settings: dict[str, Any] = {}
    for key in ("add_bos_token", "add_eos_token"):
        if key in tokenizer_config and tokenizer_config[key] is not None:
            settings[key] = tokenizer_config[key]
    if tokenizer_config.get("padding_side") is not None:
        settings["padding_side"] = tokenizer_config["padding_side"]
    for key in _GEMMA_DEFAULT_TOKENS:
        if tokenizer_config.get(key) is not None:
            token = _token_content(tokenizer_config[key], key)
            if token != _GEMMA_DEFAULT_TOKENS[key]:
                settings[key] = token
    return settings


class GemmaTokenizer:
    """SigLIP 2's tokenizer: Gemma's 256k-token BPE (byte fallback), on lower-cased text, padded to 64.

    SigLIP 2 (Tschannen et al. 2025) is trained with the multilingual Gemma tokenizer on text "transformed to
    lower case before tokenization". The released transformers folders name ``GemmaTokenizer``, which does not
    lower-case; transformers' own ``Siglip2Tokenizer`` is that tokenizer with a ``Lowercase`` normaliser in
    front, and so is this one with ``lower_case=True`` (the default). The pipeline is the folder's
    ``tokenizer.json`` run by the ``tokenizers`` library: its normaliser (behind the lower-casing), its
    pre-tokeniser, BPE model and special tokens; its post-processor, unless ``add_bos_token`` /
    ``add_eos_token`` are given (as tokenizer_config.json records them), in which case the template is
    ``[<bos>] text [<eos>]`` as transformers rebuilds it. Text longer than ``context_length`` is truncated
    with room kept for the special tokens; rows are padded with ``<pad>`` on ``padding_side``.

    ``clean`` names open_clip's cleaning (a key of OPEN_CLIP_CLEANERS) applied before, as open_clip's
    HFTokenizer does for its SigLIP 2 models (``canonicalize``, which lower-cases in Python itself).
    Reference: transformers ``GemmaTokenizer`` and ``Siglip2Tokenizer`` called with
    ``padding="max_length", truncation=True, max_length=64``; open_clip ``HFTokenizer``.
    """

    def __init__(
        self,
        tokenizer_file: str | Path,
        context_length: int = 64,
        lower_case: bool = True,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        padding_side: str = "right",  # SigLIP 2 pools the last position: text first, then padding
        clean: str | None = None,
        pad_token: str = "<pad>",
        eos_token: str = "<eos>",
        bos_token: str = "<bos>",
    ) -> None:
        self._context_length = _checked_context_length(context_length, minimum=1)
        flags = {"lower_case": lower_case, "add_bos_token": add_bos_token, "add_eos_token": add_eos_token}
        for name, flag in flags.items():
            if flag is not None and not isinstance(flag, bool):
                raise TokenizerError(f"{name} must be true or false, got {flag!r}")
        if padding_side not in _PADDING_SIDES:
            raise TokenizerError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if clean is not None and clean not in OPEN_CLIP_CLEANERS:
            raise TokenizerError(f"clean must be one of {sorted(OPEN_CLIP_CLEANERS)} or absent: {clean!r}")
        self._file = Path(tokenizer_file).resolve()
        if not self._file.is_file():
            raise TokenizerError(f"tokenizer file not found: {self._file}")
        self._settings = {
            "lower_case": lower_case, "add_bos_token": add_bos_token, "add_eos_token": add_eos_token,
            "padding_side": padding_side, "clean": clean, "pad_token": _token_content(pad_token, "pad_token"),
            "eos_token": _token_content(eos_token, "eos_token"), "bos_token": _token_content(bos_token, "bos_token"),
        }  # fmt: skip
        try:
            backend = Tokenizer.from_file(str(self._file))
        except Exception as error:  # the Rust library raises a plain Exception for a malformed file
            raise TokenizerError(f"{self._file} is not a tokenizers JSON file: {error}") from error
        self._ids = {key: self._token_id(backend, self._settings[key]) for key in _GEMMA_DEFAULT_TOKENS}
        if lower_case:
            backend.normalizer = (
                normalizers.Sequence([normalizers.Lowercase(), backend.normalizer])
                if backend.normalizer is not None
                else normalizers.Lowercase()
            )
        if add_bos_token is not None or add_eos_token is not None:
            backend.post_processor = self._template(bool(add_bos_token), bool(add_eos_token))
        backend.no_truncation()
        backend.no_padding()
        self._plain = backend  # no truncation, no padding: `encode`, `decode`, and the base of each length
        self._padded: dict[int, Tokenizer] = {}
        self._clean_fn = OPEN_CLIP_CLEANERS[clean] if clean is not None else None

    def _template(self, bos: bool, eos: bool) -> processors.TemplateProcessing:
        """``[<bos>] $A [<eos>]``, as transformers' ``update_post_processor`` builds it from the two flags."""
        bos_token, eos_token = self._settings["bos_token"], self._settings["eos_token"]

        def sequence(name: str, type_id: int) -> str:
            parts = [f"{bos_token}:{type_id}"] * bos + [f"{name}:{type_id}"] + [f"{eos_token}:{type_id}"] * eos
            return " ".join(parts)

        specials = [(bos_token, self._ids["bos_token"])] * bos + [(eos_token, self._ids["eos_token"])] * eos
        return processors.TemplateProcessing(
            single=sequence("$A", 0), pair=f"{sequence('$A', 0)} {sequence('$B', 1)}", special_tokens=specials
        )

    def _token_id(self, backend: Tokenizer, token: str) -> int:
        token_id = backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{self._file} has no {token!r} token")
        return token_id

    def _backend_for(self, length: int) -> Tokenizer:
        """The pipeline truncating and padding to ``length`` (one per length, built once)."""
        if length not in self._padded:
            backend = Tokenizer.from_str(self._plain.to_str())
            backend.enable_truncation(max_length=length, direction="right")
            backend.enable_padding(
                direction=self._settings["padding_side"], pad_id=self.pad_token_id,
                pad_token=self._settings["pad_token"], length=length,
            )  # fmt: skip
            self._padded[length] = backend
        return self._padded[length]

    def __getstate__(self) -> dict[str, Any]:
        return {"tokenizer_file": self._file, "context_length": self._context_length, **self._settings}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def __repr__(self) -> str:
        return (
            f"GemmaTokenizer(tokenizer_file={str(self._file)!r}, context_length={self._context_length}, "
            f"lower_case={self._settings['lower_case']}, vocab_size={self.vocab_size})"
        )

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def vocab_size(self) -> int:
        return self._plain.get_vocab_size(with_added_tokens=True)

    @property
    def sot_token_id(self) -> int | None:
        return self._ids["bos_token"] if self._settings["add_bos_token"] else None

    @property
    def eot_token_id(self) -> int:
        return self._ids["eos_token"]

    @property
    def pad_token_id(self) -> int:
        return self._ids["pad_token"]

    @property
    def lower_case(self) -> bool:
        return self._settings["lower_case"]

    @property
    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "type": "gemma", "context_length": self._context_length, "tokenizer_file": str(self._file),
        }  # fmt: skip
        for key, value in self._settings.items():
            default = {"lower_case": True, "padding_side": "right", **_GEMMA_DEFAULT_TOKENS}.get(key)
            if value is not None and value != default:
                config[key] = value
        if not self._settings["lower_case"]:
            config["lower_case"] = False
        return config

    def save(self, directory: str | Path) -> dict[str, Any]:
        """Copies tokenizer.json into ``directory``; returns the config (with a relative path) to store."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / GEMMA_TOKENIZER_FILE
        if target.resolve() != self._file:
            shutil.copyfile(self._file, target)
        return {**self.config, "tokenizer_file": target.name}

    def save_hf(self, directory: str | Path) -> None:
        """Write transformers' tokenizer files: tokenizer.json and a tokenizer_config.json naming
        ``Siglip2Tokenizer`` (which lower-cases) or, without lower-casing, ``GemmaTokenizer``."""
        directory = Path(directory)
        self.save(directory)
        settings = self._settings
        config: dict[str, Any] = {
            "tokenizer_class": "Siglip2Tokenizer" if settings["lower_case"] else "GemmaTokenizer",
            "model_max_length": self._context_length, "padding_side": settings["padding_side"],
            "pad_token": settings["pad_token"], "eos_token": settings["eos_token"], "bos_token": settings["bos_token"],
            # trained without an attention mask, like SigLIP (see SiglipTokenizer.save_hf)
            "model_input_names": ["input_ids"],
        }  # fmt: skip
        for key in ("add_bos_token", "add_eos_token"):
            if settings[key] is not None:
                config[key] = settings[key]
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

    def _prepare(self, texts: list[str]) -> list[str]:
        return [self._clean_fn(text) for text in texts] if self._clean_fn is not None else texts

    def encode(self, text: str) -> list[int]:
        """Ids of one text (cleaned and lower-cased as configured), without special tokens or truncation."""
        return self._plain.encode(self._prepare([_single_text(text)])[0], add_special_tokens=False).ids

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Token ids, (B, context_length) int64; a single string gives B = 1."""
        text_list = _as_text_list(texts)
        length = (
            self._context_length if context_length is None else _checked_context_length(context_length, 1)
        )
        if not text_list:
            return torch.zeros(0, length, dtype=torch.int64)
        encodings = self._backend_for(length).encode_batch(self._prepare(text_list))
        return torch.tensor([encoding.ids for encoding in encodings], dtype=torch.int64)  # (B, L)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of a sequence of ids (lower-cased, as the model saw it); special tokens dropped by default."""
        id_list = _ids_as_list(ids)
        for token_id in id_list:
            if not 0 <= token_id < self.vocab_size:
                raise TokenizerError(f"token id {token_id} is outside the vocabulary 0..{self.vocab_size - 1}")
        return self._plain.decode(id_list, skip_special_tokens=skip_special_tokens)


class UnavailableTokenizer:
    """Stands in for a checkpoint's tokenizer whose files cannot be had (offline, not cached): the model
    and its image tower load; tokenizing, saving or asking for the config raises with the reason."""

    sot_token_id = None

    def __init__(self, reason: str, context_length: int | None = None) -> None:
        self.reason = reason
        self.context_length = context_length

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise TokenizerError(self.reason)

    __call__ = encode = decode = save = save_hf = _fail

    @property
    def config(self) -> dict[str, Any]:
        raise TokenizerError(self.reason)

    def __repr__(self) -> str:
        return f"UnavailableTokenizer({self.reason.splitlines()[0]!r})"


# ---------------------------------------------------------------------------------------------------------
# construction from a config dict or a Hugging Face folder

_CONFIG_KEYS = {
    "clip": {"type", "context_length", "bpe_path"},
    "siglip": {"type", "context_length", "spiece_model", "do_lower_case", "clean"},
    "gemma": {"type", "context_length", "tokenizer_file", "tokenizer_config", "lower_case", "add_bos_token",
              "add_eos_token", "padding_side", "clean", "pad_token", "eos_token", "bos_token"},
}  # fmt: skip


def _resolve(path_value: Any, model_dir: str | Path | None, key: str) -> Path:
    if not isinstance(path_value, (str, Path)) or not str(path_value):
        raise TokenizerError(f"tokenizer config field {key!r} must be a path, got {path_value!r}")
    path = Path(path_value)
    if not path.is_absolute() and model_dir is not None:
        path = Path(model_dir) / path
    return path


def build_tokenizer(
    config: dict[str, Any], model_dir: str | Path | None = None
) -> ClipTokenizer | SiglipTokenizer | GemmaTokenizer:
    """A tokenizer from its ``config`` dict; relative file paths are read against ``model_dir``.

    A "gemma" config may name a ``tokenizer_config`` (transformers' tokenizer_config.json) whose settings
    (`gemma_settings`) apply where the config gives none.
    """
    if not isinstance(config, dict):
        raise TokenizerError(f"tokenizer config must be a dict, got {type(config).__name__}")
    kind = config.get("type")
    if kind not in _CONFIG_KEYS:
        raise TokenizerError(f"unknown tokenizer type {kind!r}; known types: {sorted(_CONFIG_KEYS)}")
    unknown = set(config) - _CONFIG_KEYS[kind]
    if unknown:
        raise TokenizerError(f"unknown keys in {kind} tokenizer config: {sorted(unknown)}")
    if kind == "clip":
        bpe_path = config.get("bpe_path")
        return ClipTokenizer(
            context_length=config.get("context_length", 77),
            bpe_path=None if bpe_path is None else _resolve(bpe_path, model_dir, "bpe_path"),
        )
    if kind == "gemma":
        if "tokenizer_file" not in config:
            raise TokenizerError("gemma tokenizer config needs 'tokenizer_file' (path of tokenizer.json)")
        settings: dict[str, Any] = {}
        if config.get("tokenizer_config") is not None:
            recorded = _read_json(_resolve(config["tokenizer_config"], model_dir, "tokenizer_config"))
            if not isinstance(recorded, dict):
                raise TokenizerError(f"{config['tokenizer_config']} must hold a JSON object")
            settings = gemma_settings(recorded)
        paths = ("type", "tokenizer_file", "tokenizer_config")
        settings |= {key: value for key, value in config.items() if key not in paths}
        return GemmaTokenizer(_resolve(config["tokenizer_file"], model_dir, "tokenizer_file"), **settings)
    if "spiece_model" not in config:
        raise TokenizerError("siglip tokenizer config needs 'spiece_model' (path of the SentencePiece model)")
    return SiglipTokenizer(
        _resolve(config["spiece_model"], model_dir, "spiece_model"),
        context_length=config.get("context_length", 64),
        do_lower_case=config.get("do_lower_case", True),
        clean=config.get("clean"),
    )


_HF_CLIP_CLASSES = {"CLIPTokenizer", "CLIPTokenizerFast"}
_HF_SIGLIP_CLASSES = {"SiglipTokenizer"}
# SigLIP 2 folders name Gemma's tokenizer (and a tokenizer.json); transformers' Siglip2Tokenizer is the same
# with lower-casing. polyclip lower-cases for every one of them: the model was trained so.
HF_GEMMA_CLASSES = {"GemmaTokenizer", "GemmaTokenizerFast", "Siglip2Tokenizer"}
# transformers writes this huge number as model_max_length when a checkpoint sets none
_UNSET_MAX_LENGTH = 10**9


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerError(f"cannot read {path}: {error}") from error


def _context_length_from(tokenizer_config: dict[str, Any], requested: int | None, default: int) -> int:
    if requested is not None:
        return requested
    max_length = tokenizer_config.get("model_max_length")
    if (
        isinstance(max_length, (int, float))
        and not isinstance(max_length, bool)
        and 0 < max_length < _UNSET_MAX_LENGTH
    ):
        return int(max_length)
    return default


def _check_hf_clip_vocabulary(folder: Path) -> None:
    """CLIP's vocabulary is fixed: a folder's vocab.json / merges.txt, where present, must be that one."""
    vocabulary = _clip_vocabulary(str(DEFAULT_CLIP_BPE_PATH))
    vocab_path = folder / "vocab.json"
    if vocab_path.is_file():
        vocab = _read_json(vocab_path)
        if not isinstance(vocab, dict) or len(vocab) != len(vocabulary):
            size = len(vocab) if isinstance(vocab, dict) else type(vocab).__name__
            raise TokenizerError(
                f"{vocab_path} has {size} entries; the CLIP BPE vocabulary has {len(vocabulary)}, "
                "so this folder uses a different tokenizer than CLIP's"
            )
        for token_id, token in enumerate(vocabulary):
            if vocab.get(token) != token_id:
                raise TokenizerError(
                    f"{vocab_path} maps {token!r} to {vocab.get(token)!r}, CLIP's vocabulary to {token_id}: "
                    "a custom CLIP vocabulary is not supported"
                )
    merges_path = folder / "merges.txt"
    if merges_path.is_file():
        try:
            lines = merges_path.read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as error:
            raise TokenizerError(f"cannot read {merges_path}: {error}") from error
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        if merges != list(_read_clip_merges(str(DEFAULT_CLIP_BPE_PATH))):
            raise TokenizerError(
                f"{merges_path} differs from CLIP's BPE merges ({len(merges)} merges, CLIP has {CLIP_NUM_MERGES}): "
                "a custom CLIP vocabulary is not supported"
            )


def tokenizer_from_hf_folder(
    path: str | Path, context_length: int | None = None
) -> ClipTokenizer | SiglipTokenizer | GemmaTokenizer:
    """The tokenizer of a Hugging Face checkpoint folder (``tokenizer_config.json`` and vocabulary files).

    A folder whose ``tokenizer_config.json`` names a CLIP tokenizer gives a ``ClipTokenizer`` (after checking
    that its vocabulary files, if any, are CLIP's); a folder with ``spiece.model`` gives a ``SiglipTokenizer``;
    one naming a Gemma tokenizer (SigLIP 2) gives a lower-casing ``GemmaTokenizer`` over its tokenizer.json,
    with the folder's add_bos_token / add_eos_token / padding_side. ``context_length`` defaults to the
    folder's ``model_max_length``.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise TokenizerError(f"not a folder: {folder}")
    config_path = folder / "tokenizer_config.json"
    tokenizer_config = _read_json(config_path) if config_path.is_file() else {}
    if not isinstance(tokenizer_config, dict):
        raise TokenizerError(f"{config_path} must hold a JSON object")
    tokenizer_class = tokenizer_config.get("tokenizer_class")
    spiece_path = folder / "spiece.model"

    if tokenizer_class in _HF_CLIP_CLASSES:
        _check_hf_clip_vocabulary(folder)
        return ClipTokenizer(context_length=_context_length_from(tokenizer_config, context_length, 77))
    if tokenizer_class in HF_GEMMA_CLASSES:
        tokenizer_file = folder / GEMMA_TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise MissingTokenizerError(
                f"{folder}: tokenizer_config.json names {tokenizer_class} but the folder has no {GEMMA_TOKENIZER_FILE}"
            )
        return GemmaTokenizer(
            tokenizer_file,
            context_length=_context_length_from(tokenizer_config, context_length, 64),
            **gemma_settings(tokenizer_config),
        )
    if spiece_path.is_file() and tokenizer_class in _HF_SIGLIP_CLASSES | {None}:
        return SiglipTokenizer(
            spiece_path,
            context_length=_context_length_from(tokenizer_config, context_length, 64),
            do_lower_case=tokenizer_config.get("do_lower_case", True),
        )
    if tokenizer_class is not None:
        raise TokenizerError(
            f"{folder}: tokenizer class {tokenizer_class!r} is not supported; supported: "
            f"{sorted(_HF_CLIP_CLASSES | _HF_SIGLIP_CLASSES | HF_GEMMA_CLASSES)}"
        )
    raise MissingTokenizerError(
        f"{folder}: no tokenizer found (expected tokenizer_config.json naming a CLIP tokenizer, or spiece.model)"
    )
