"""Tokenizers: id-for-id parity with the reference tokenizers, truncation, errors, construction.

References (test-only installs, skipped with the install command when absent):
- OpenAI's SimpleTokenizer as shipped in `open_clip/tokenizer.py` (``pip install --no-deps open_clip_torch``)
  and, unchanged from openai/CLIP, in `clip/simple_tokenizer.py` (``pip install --no-deps clip-anytorch``);
  only those files are loaded, because the packages' `__init__` imports torchvision.
- transformers' CLIPTokenizer (built here from the same BPE file) and SiglipTokenizer (on a SentencePiece
  unigram model trained here with SigLIP's special-token layout).
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
import pickle
import random
import re
import string
import unicodedata
import warnings
from pathlib import Path

import ftfy
import pytest
import regex
import torch

from conftest import import_reference, missing_reference
from polyclip.tokenizers import (
    ClipTokenizer,
    MissingTokenizerError,
    SiglipTokenizer,
    TokenizerError,
    build_tokenizer,
    tokenizer_from_hf_folder,
)

SOT, EOT = 49406, 49407
BPE_FILE = Path(__file__).resolve().parents[1] / "src" / "polyclip" / "data" / "bpe_simple_vocab_16e6.txt.gz"


def _load_module_file(package: str, filename: str, install_hint: str):
    """Loads one file of an installed package without running the package's __init__."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        missing_reference(f"reference tokenizer not installed: {install_hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        missing_reference(f"{package} has no {filename}: {install_hint}")
    module_spec = importlib.util.spec_from_file_location(f"_reference_{package}_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:  # any import problem of the reference means: cannot compare here
        missing_reference(f"cannot load {path} ({error!r}): {install_hint}")
    return module


# ---------------------------------------------------------------------------------------------------------
# texts

HAND_PICKED = [
    "",
    " ",
    "   \t\n  ",
    "a photo of a cat",
    "A Photo Of A CAT.",
    "a  photo\tof\na   cat  ",
    "Don't stop, I'm sure it's what we'd do; they're here, we've gone, you'll see.",
    "DON'T STOP ME NOW, IT'S FINE",
    "rock'n'roll o'clock 'quoted' ''s",
    "3.14159 is pi, 1,000,000 is a million, 2024-01-31, 10:45pm, #42, $9.99, 50%",
    "!!!???... --- ___ *** ((nested)) [brackets] {braces} <angle> \\ / | ~ ` ^",
    "&amp; &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;apos&#39; &#x41; &copy; &nbsp;x",
    "&amp;amp;amp; double &amp;lt;escaped&amp;gt;",
    "<b>html tags</b> stay <br/> as punctuation",
    "naïve café résumé Ångström Straße façade jalapeño",
    "e\u0301 (decomposed accent) vs \u00e9 (composed)",
    "ÉCOLE NORMALE SUPÉRIEURE ΑΘΗΝΑ МОСКВА",
    "日本語のテキスト 東京タワー 中文文本 한국어 텍스트",
    "emoji 😀👍🏽 family 👨\u200d👩\u200d👧 flags 🇫🇷🇯🇵 ❤️",
    "mojibake: â€œquotedâ€\x9d and Ã©tÃ© and donâ€™t",
    "ﬁne ﬂow ligatures and ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "\ufeffbyte order mark and zero\u200bwidth space",
    "control \x00\x01\x07 chars \x1b[31mred\x1b[0m and \x0b vertical \x0c feed \r\n crlf",
    "١٢٣ arabic digits ½ ¾ Ⅻ ² superscripts",
    "İstanbul ΣΊΣΥΦΟΣ ß ſ long s K kelvin",
    "'S 'ſ 'K contractions under case folding",
    "a\u0345b combining ypogegrammeni \u0558 armenian",
    "x" * 300,
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    " ".join(["word"] * 100),
    " ".join(str(i) for i in range(100)),
    "a.b.c.d e-f-g h_i_j k/l/m",
    "tab\tseparated\tvalues\tand\u3000ideographic\u00a0nbsp\u2028line sep",
]

# Literal special tokens: OpenAI turns them into their ids; open_clip spells its specials differently
# ("<start_of_text>"), and transformers matches them before any cleaning, so only OpenAI's file compares.
SPECIAL_LITERALS = [
    "<|startoftext|>",
    "<|endoftext|>",
    "a<|endoftext|>b",
    "hello <|startoftext|> world <|endoftext|>",
    "<<|endoftext|>",
    "!<|endoftext|>a",
    "<|ENDOFTEXT|> upper case",
    "<|ſtartoftext|> long s",
    "<|endoftext|><|endoftext|>",
]
_SPECIAL_PATTERN = regex.compile(r"<\|?(start|end)_?of_?text\|?>", regex.IGNORECASE)

_CHAR_POOLS = [
    range(0x20, 0x7F),  # ASCII
    range(0xA0, 0x250),  # Latin-1, Latin extended
    range(0x370, 0x3FF),  # Greek
    range(0x400, 0x4FF),  # Cyrillic
    range(0x4E00, 0x4E80),  # CJK
    range(0x3040, 0x30FF),  # kana
    range(0x1F300, 0x1F64F),  # emoji
    range(0x2000, 0x206F),  # general punctuation, spaces
]
_WORDS = (
    "photo picture image of a the an cat dog bird car street city woman man child playing sitting red "
    "blue green small large old new on in with near next to dog's isn't we'll they've"
).split()


def _random_texts(count: int, seed: int, pools=_CHAR_POOLS, extra: list[str] | None = None) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        pieces = []
        for _ in range(rng.randint(0, 30)):
            roll = rng.random()
            if roll < 0.4:
                pieces.append(rng.choice(_WORDS) + rng.choice([" ", " ", ", ", ". ", "! ", "'s "]))
            elif roll < 0.45 and extra:
                pieces.append(rng.choice(extra))
            else:
                pieces.append(chr(rng.choice(rng.choice(pools))))
        text = "".join(pieces)
        texts.append(text.upper() if rng.random() < 0.1 else text)
    return texts


CLIP_TEXTS = HAND_PICKED + _random_texts(400, seed=0, extra=HAND_PICKED[6:25])


def _openai_rows(encoded: list[list[int]], context_length: int) -> torch.Tensor:
    """OpenAI's clip.tokenize(..., truncate=True) around reference ids."""
    result = torch.zeros(len(encoded), context_length, dtype=torch.long)
    for row, ids in enumerate(encoded):
        tokens = [SOT, *ids, EOT]
        if len(tokens) > context_length:
            tokens = tokens[:context_length]
            tokens[-1] = EOT
        result[row, : len(tokens)] = torch.tensor(tokens)
    return result


# ---------------------------------------------------------------------------------------------------------
# CLIP


@pytest.fixture(scope="module")
def clip_tokenizer() -> ClipTokenizer:
    return ClipTokenizer()


@pytest.fixture(scope="module")
def open_clip_reference():
    module = _load_module_file("open_clip", "tokenizer.py", "pip install --no-deps open_clip_torch==3.3.0")
    return module.SimpleTokenizer()


@pytest.fixture(scope="module")
def openai_reference():
    module = _load_module_file("clip", "simple_tokenizer.py", "pip install --no-deps clip-anytorch==2.6.0")
    return module.SimpleTokenizer()


def test_clip_known_ids(clip_tokenizer):
    # ids of OpenAI CLIP's tokenizer, fixed so that drift shows even without the reference installed
    assert clip_tokenizer("a photo of a cat")[0, :8].tolist() == [SOT, 320, 1125, 539, 320, 2368, EOT, 0]
    assert clip_tokenizer.encode("A  Photo OF a CAT.") == [320, 1125, 539, 320, 2368, 269]
    assert clip_tokenizer.encode("a<|endoftext|>b") == clip_tokenizer.encode("a") + [
        EOT
    ] + clip_tokenizer.encode("b")
    assert clip_tokenizer.vocab_size == 49408
    assert (clip_tokenizer.sot_token_id, clip_tokenizer.eot_token_id, clip_tokenizer.pad_token_id) == (
        SOT,
        EOT,
        0,
    )


def test_clip_matches_open_clip_simple_tokenizer(clip_tokenizer, open_clip_reference):
    texts = [text for text in CLIP_TEXTS if not _SPECIAL_PATTERN.search(text)]
    assert len(texts) > 400
    expected = [open_clip_reference.encode(text) for text in texts]
    for text, ids in zip(texts, expected, strict=True):
        assert clip_tokenizer.encode(text) == ids, text
    for context_length in (77, 16):
        batch = clip_tokenizer(texts, context_length=context_length)
        assert batch.dtype == torch.long and batch.shape == (len(texts), context_length)
        assert torch.equal(batch, _openai_rows(expected, context_length))
    assert torch.equal(clip_tokenizer(texts), open_clip_reference(texts).long())


def test_clip_matches_openai_simple_tokenizer(clip_tokenizer, openai_reference):
    texts = (
        CLIP_TEXTS
        + SPECIAL_LITERALS
        + [f"{a} {b}" for a, b in zip(SPECIAL_LITERALS, HAND_PICKED, strict=False)]
    )
    expected = [openai_reference.encode(text) for text in texts]
    assert torch.equal(clip_tokenizer(texts), _openai_rows(expected, 77))
    for text, ids in zip(texts, expected, strict=True):
        assert clip_tokenizer.encode(text) == ids, text
        assert clip_tokenizer.decode(ids, skip_special_tokens=False) == openai_reference.decode(ids)


def _reference_clean(text: str) -> str:
    """OpenAI's cleaning, written out here: transformers' CLIP tokenizer does only NFC + whitespace + lower."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


def _gpt2_byte_alphabet() -> list[str]:
    """The 256 characters standing for the bytes 0..255 in byte-level BPE, in vocabulary order."""
    kept = [*range(33, 127), *range(161, 173), *range(174, 256)]  # printable Latin-1 stands for itself
    others = [byte for byte in range(256) if byte not in kept]
    return [chr(byte) for byte in kept] + [chr(256 + index) for index in range(len(others))]


@pytest.fixture(scope="module")
def hf_clip_folder(tmp_path_factory) -> Path:
    """vocab.json + merges.txt written from the BPE file as OpenAI builds its vocabulary."""
    folder = tmp_path_factory.mktemp("hf_clip")
    with gzip.open(BPE_FILE, "rt", encoding="utf-8") as handle:
        merge_lines = handle.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    alphabet = _gpt2_byte_alphabet()
    tokens = alphabet + [char + "</w>" for char in alphabet] + [line.replace(" ", "") for line in merge_lines]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(
        json.dumps({token: i for i, token in enumerate(tokens)}), encoding="utf-8"
    )
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merge_lines) + "\n", encoding="utf-8")
    tokenizer_config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    return folder


def test_clip_matches_transformers_clip_tokenizer(clip_tokenizer, hf_clip_folder):
    transformers = import_reference("transformers", "pip install transformers")
    hf_tokenizer = transformers.CLIPTokenizer.from_pretrained(hf_clip_folder)
    # transformers splits words with the Rust regex engine, case-sensitively ("'ſ" is not "'s" there) and
    # with fewer Unicode letters than the `regex` module knows: leave those characters out.
    texts = [
        text
        for text in CLIP_TEXTS
        if not _SPECIAL_PATTERN.search(text) and not any(char in text for char in "\u017f\u0345\u0558")
    ]
    # It also applies NFC after lower-casing, which OpenAI does not (ftfy's NFC runs before).
    texts = [text for text in texts if unicodedata.is_normalized("NFC", _reference_clean(text))]
    assert len(texts) > 400
    expected = hf_tokenizer([_reference_clean(text) for text in texts], add_special_tokens=False)["input_ids"]
    for text, ids in zip(texts, expected, strict=True):
        assert clip_tokenizer.encode(text) == ids, text


def test_clip_truncation_keeps_eot_last(clip_tokenizer):
    long_text = " ".join(f"word{i}" for i in range(200))
    ids = clip_tokenizer.encode(long_text)
    assert len(ids) > 77
    row = clip_tokenizer(long_text)[0]
    assert row[0] == SOT and row[-1] == EOT and (row != 0).all()
    assert row[1:-1].tolist() == ids[:75]
    short = clip_tokenizer([long_text, "a cat"], context_length=5)
    assert short.tolist() == [[SOT, *ids[:3], EOT], [SOT, 320, 2368, EOT, 0]]


def test_clip_shapes_and_input_errors(clip_tokenizer):
    assert clip_tokenizer([]).shape == (0, 77)
    assert clip_tokenizer([], context_length=12).shape == (0, 12)
    assert clip_tokenizer("one text").shape == (1, 77)
    assert clip_tokenizer(("a", "b", "c")).shape == (3, 77)
    for bad in (None, 5, b"bytes", ["fine", 3], [None], {"a": 1}):
        with pytest.raises(TokenizerError, match="str"):
            clip_tokenizer(bad)
    with pytest.raises(TokenizerError, match="str"):
        clip_tokenizer.encode(["not", "one", "string"])
    for bad_length in (1, 0, -3, 2.5, "77"):
        with pytest.raises(TokenizerError, match="context_length"):
            clip_tokenizer("a", context_length=bad_length)
    with pytest.raises(TokenizerError, match="outside"):
        clip_tokenizer.decode([49408])
    with pytest.raises(TokenizerError, match="integer"):
        clip_tokenizer.decode(torch.tensor([1.0, 2.0]))
    with pytest.raises(TokenizerError, match="1-D"):
        clip_tokenizer.decode(clip_tokenizer(["a", "b"]))
    assert issubclass(TokenizerError, ValueError)


def test_clip_decode_round_trip(clip_tokenizer):
    assert clip_tokenizer.decode(clip_tokenizer("A Photo of a CAT!")[0]) == "a photo of a cat !"
    assert clip_tokenizer.decode(clip_tokenizer.encode("naïve café")) == "naïve café"


def test_ascii_fast_path_skips_only_no_op_fixes():
    """Cleaning skips ftfy and html.unescape on printable ASCII without '&': they must leave it unchanged."""
    rng = random.Random(3)
    alphabet = [c for c in string.printable if c not in "&\r\x0b\x0c"]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert ftfy.fix_text(text) == text
        assert html.unescape(text) == text


def test_clip_config_pickle_and_save(clip_tokenizer, tmp_path):
    assert clip_tokenizer.config == {"type": "clip", "context_length": 77}
    rebuilt = build_tokenizer({"type": "clip", "context_length": 32})
    assert isinstance(rebuilt, ClipTokenizer) and rebuilt.context_length == 32
    assert torch.equal(rebuilt("a cat"), clip_tokenizer("a cat", context_length=32))
    assert torch.equal(pickle.loads(pickle.dumps(rebuilt))("a dog"), rebuilt("a dog"))
    custom = ClipTokenizer(context_length=20, bpe_path=BPE_FILE)
    saved = custom.save(tmp_path / "saved")
    assert saved == {"type": "clip", "context_length": 20, "bpe_path": BPE_FILE.name}
    reloaded = build_tokenizer(saved, model_dir=tmp_path / "saved")
    assert reloaded.config["bpe_path"] == str((tmp_path / "saved" / BPE_FILE.name).resolve())
    assert torch.equal(reloaded("a cat"), custom("a cat"))


def test_clip_rejects_bad_bpe_files(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        ClipTokenizer(bpe_path=tmp_path / "missing.txt.gz")
    (tmp_path / "not_gzip.txt.gz").write_text("plain text")
    with pytest.raises(TokenizerError, match="cannot read"):
        ClipTokenizer(bpe_path=tmp_path / "not_gzip.txt.gz")
    with gzip.open(tmp_path / "short.txt.gz", "wt") as handle:
        handle.write("#version\na b\n")
    with pytest.raises(TokenizerError, match="merges"):
        ClipTokenizer(bpe_path=tmp_path / "short.txt.gz")


def test_hf_clip_folder(hf_clip_folder, tmp_path):
    tokenizer = tokenizer_from_hf_folder(hf_clip_folder)
    assert isinstance(tokenizer, ClipTokenizer) and tokenizer.context_length == 77
    assert tokenizer_from_hf_folder(hf_clip_folder, context_length=32).context_length == 32

    only_config = tmp_path / "only_config"
    only_config.mkdir()
    (only_config / "tokenizer_config.json").write_text(
        json.dumps(
            {"tokenizer_class": "CLIPTokenizerFast", "model_max_length": 1000000000000000019884624838656}
        )
    )
    assert tokenizer_from_hf_folder(only_config).context_length == 77  # the "no limit" sentinel

    wrong_size = tmp_path / "wrong_size"
    wrong_size.mkdir()
    (wrong_size / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer"}))
    (wrong_size / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    with pytest.raises(TokenizerError, match="49408"):
        tokenizer_from_hf_folder(wrong_size)

    swapped = tmp_path / "swapped"
    swapped.mkdir()
    (swapped / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer"}))
    vocab = json.loads((hf_clip_folder / "vocab.json").read_text(encoding="utf-8"))
    vocab["cat</w>"], vocab["dog</w>"] = vocab["dog</w>"], vocab["cat</w>"]
    (swapped / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(TokenizerError, match="custom CLIP vocabulary"):
        tokenizer_from_hf_folder(swapped)

    other = tmp_path / "bert"
    other.mkdir()
    (other / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
    with pytest.raises(TokenizerError, match="BertTokenizer"):
        tokenizer_from_hf_folder(other)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingTokenizerError, match="no tokenizer found"):
        tokenizer_from_hf_folder(empty)
    with pytest.raises(TokenizerError, match="not a folder"):
        tokenizer_from_hf_folder(tmp_path / "missing")


def test_build_tokenizer_rejects_bad_configs():
    with pytest.raises(TokenizerError, match="unknown tokenizer type"):
        build_tokenizer({"type": "wordpiece"})
    with pytest.raises(TokenizerError, match="unknown keys"):
        build_tokenizer({"type": "clip", "context_lenght": 77})
    with pytest.raises(TokenizerError, match="spiece_model"):
        build_tokenizer({"type": "siglip"})
    with pytest.raises(TokenizerError, match="dict"):
        build_tokenizer(["clip"])


# ---------------------------------------------------------------------------------------------------------
# SigLIP

_SP_WORDS = (
    "photo picture image cat dog bird horse person people man woman child children car bus train bicycle "
    "street road city building house kitchen table chair window door tree flower grass field beach sea water "
    "mountain snow sky cloud sunset night light red blue green yellow black white small large old young happy "
    "running sitting standing walking eating looking holding playing riding parked near next across under "
    "over with without from into onto between behind front top bottom left right"
).split()


@pytest.fixture(scope="module", params=[True, False], ids=["collapse_spaces", "keep_spaces"])
def spiece_folder(request, tmp_path_factory) -> Path:
    """A real SentencePiece unigram model with SigLIP's layout: <pad>=0, </s>=1 (eos and padding), <unk>=2.

    SigLIP's model collapses extra whitespace; the variant that keeps it exercises transformers' handling
    of a lone leading "▁" piece before a special token.
    """
    sentencepiece = import_reference("sentencepiece")
    rng = random.Random(0)
    sentences = [
        " ".join(rng.choice(_SP_WORDS) for _ in range(rng.randint(4, 14))).capitalize() + rng.choice(".!?,")
        for _ in range(3000)
    ]
    sentences += ["naïve café résumé", "東京 タワー", "Hello, World! It's 3:45 p.m."]
    folder = tmp_path_factory.mktemp("siglip")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=str(folder / "spiece"),
        model_type="unigram",
        vocab_size=300,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        remove_extra_whitespaces=request.param,
        minloglevel=2,
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "SiglipTokenizer", "model_max_length": 64, "do_lower_case": True})
    )
    return folder


SIGLIP_LITERALS = [
    "</s>",
    "<unk>",
    " </s> ",
    "<</s>",
    "</s</s>",
    "<un<unk>",
    "a </s> b",
    "\u2581",
    "a\u2581b",
]
SIGLIP_TEXTS = (
    HAND_PICKED
    + SIGLIP_LITERALS
    + _random_texts(300, seed=1, extra=SIGLIP_LITERALS + HAND_PICKED[6:25])
    + [" ".join(_SP_WORDS) + " </s>", "</s> " + " ".join(_SP_WORDS)]
)


@pytest.fixture(scope="module")
def hf_siglip(spiece_folder):
    transformers = import_reference("transformers", "pip install transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.SiglipTokenizer.from_pretrained(spiece_folder)


def test_siglip_matches_transformers(spiece_folder, hf_siglip):
    tokenizer = SiglipTokenizer(spiece_folder / "spiece.model")
    assert (tokenizer.eot_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id) == (1, 1, 2)
    assert tokenizer.vocab_size == hf_siglip.vocab_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers warns on texts that already end with </s>
        for length in (64, 8):
            expected = hf_siglip(SIGLIP_TEXTS, padding="max_length", truncation=True, max_length=length)[
                "input_ids"
            ]
            assert tokenizer(SIGLIP_TEXTS, context_length=length).tolist() == expected
        for text in SIGLIP_TEXTS[:80]:
            assert tokenizer.encode(text) == hf_siglip(text, add_special_tokens=False)["input_ids"], text


def test_siglip_truncation_shapes_errors_and_decode(spiece_folder):
    tokenizer = SiglipTokenizer(spiece_folder / "spiece.model", context_length=16)
    long_text = " ".join(_SP_WORDS)
    ids = tokenizer.encode(long_text)
    row = tokenizer(long_text)[0]
    assert len(ids) > 16 and row.tolist() == ids[:15] + [1]
    assert tokenizer("a cat")[0, -1] == tokenizer.pad_token_id == 1
    empty_ids = tokenizer.encode("")  # [] when the model collapses whitespace, else the lone "▁" piece
    assert len(empty_ids) <= 1 and tokenizer("")[0].tolist() == empty_ids + [1] * (16 - len(empty_ids))
    assert tokenizer([]).shape == (0, 16)
    assert tokenizer.sot_token_id is None
    for bad in (None, 7, ["ok", 2.0]):
        with pytest.raises(TokenizerError, match="str"):
            tokenizer(bad)
    with pytest.raises(TokenizerError, match="context_length"):
        tokenizer("a", context_length=0)
    assert (
        tokenizer.decode(tokenizer("A red car, parked near the beach!")[0])
        == "a red car parked near the beach"
    )


def test_siglip_config_folder_and_errors(spiece_folder, tmp_path):
    tokenizer = tokenizer_from_hf_folder(spiece_folder)
    assert isinstance(tokenizer, SiglipTokenizer)
    assert tokenizer.config == {
        "type": "siglip",
        "context_length": 64,
        "spiece_model": str((spiece_folder / "spiece.model").resolve()),
    }
    saved = tokenizer.save(tmp_path / "native")
    assert saved == {"type": "siglip", "context_length": 64, "spiece_model": "spiece.model"}
    reloaded = build_tokenizer(saved, model_dir=tmp_path / "native")
    text = ["a dog running on the beach", "Two people, sitting!"]
    assert torch.equal(reloaded(text), tokenizer(text))
    assert torch.equal(pickle.loads(pickle.dumps(reloaded))(text), tokenizer(text))

    with pytest.raises(TokenizerError, match="not found"):
        SiglipTokenizer(tmp_path / "missing.model")
    (tmp_path / "broken.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        SiglipTokenizer(tmp_path / "broken.model")
    with pytest.raises(TokenizerError, match="not found"):
        build_tokenizer({"type": "siglip", "spiece_model": "spiece.model"}, model_dir=tmp_path)
    with pytest.raises(TokenizerError, match="do_lower_case"):
        build_tokenizer({**saved, "do_lower_case": "no"}, model_dir=tmp_path / "native")


def test_siglip_keeps_case_when_configured(spiece_folder):
    cased = SiglipTokenizer(spiece_folder / "spiece.model", do_lower_case=False)
    lower = SiglipTokenizer(spiece_folder / "spiece.model")
    assert cased.config["do_lower_case"] is False
    assert cased.encode("Red CAR") != lower.encode("Red CAR") == lower.encode("red car")
    assert re.fullmatch(r"[a-z ]*", lower.decode(lower.encode("Red CAR")))
