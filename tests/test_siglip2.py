"""SigLIP 2: the Gemma tokenizer with lower-casing, fixed-resolution SiglipModel folders, NaFlex Siglip2Model
folders and open_clip's SigLIP 2 layout, each against its reference (transformers; open_clip's HFTokenizer)
on tiny random models saved to disk and read back by polyclip."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

import polyclip
from polyclip.checkpoints import open_clip as open_clip_format
from polyclip.checkpoints import read_checkpoint
from polyclip.encode import embed_images
from polyclip.models.naflex import pack_patches, unpack_patches
from polyclip.tokenizers import GemmaTokenizer, tokenizer_from_hf_folder
from polyclip.transforms import PreprocessConfig, build_preprocess, naflex_size

transformers = pytest.importorskip("transformers")

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
CORPUS = [
    "a photo of a cat", "une photo d'un chat à paris, très jolie", "ein foto einer straße in köln",
    "φωτογραφία μιας γάτας στην αθήνα", "фотография кошки на улице", "一张猫的照片", "猫の写真です",
    "صورة قطة في الشارع", "istanbul'da ılık bir gün, i̇yi", "the quick brown fox jumps over the lazy dog 🦊",
    "¿dónde está la biblioteca?", "zürich, genève & lugano", "सड़क पर एक बिल्ली", "고양이 사진",
]  # fmt: skip


def write_gemma_tokenizer(folder: Path) -> Path:
    """A Gemma-style tokenizer folder as the SigLIP 2 releases have: a BPE with byte fallback over text whose
    spaces become '▁' (no prefix space), special tokens <pad>=0 <eos>=1 <bos>=2 <unk>=3 <mask>=4, then the 256
    byte tokens; the post-processor appends <eos> (add_bos_token false, add_eos_token true), padding right.
    The alphabet is limited so that rarer characters (CJK, emoji) fall back to bytes."""
    trainer_tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tokenizer.normalizer = normalizers.Replace(" ", "▁")
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=SPECIALS, limit_alphabet=70, show_progress=False
    )
    trainer_tokenizer.train_from_iterator(CORPUS * 20, trainer)
    trained = json.loads(trainer_tokenizer.to_str())["model"]
    vocab = {token: index for index, token in enumerate(SPECIALS)}
    vocab |= {f"<0x{byte:02X}>": len(SPECIALS) + byte for byte in range(256)}
    for token, _ in sorted(trained["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIALS])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <eos>", pair="$A <eos> $B:1 <eos>:1", special_tokens=[("<eos>", 1)]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "GemmaTokenizer", "add_bos_token": False, "add_eos_token": True,
        "padding_side": "right", "model_max_length": 64, "pad_token": "<pad>", "eos_token": "<eos>",
        "bos_token": "<bos>", "unk_token": "<unk>", "mask_token": "<mask>", "model_input_names": ["input_ids"],
    }  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory) -> Path:
    return write_gemma_tokenizer(tmp_path_factory.mktemp("gemma"))


def varied_texts(count: int = 300) -> list[str]:
    """Multilingual strings with mixed case, accents, Turkish İ/ı, ß, Greek, Cyrillic, CJK, Arabic, emoji,
    punctuation, special tokens written out, and long strings that truncate."""
    pieces = [
        "A Photo of a CAT", "Une PHOTO d'un Chat à PARIS", "STRASSE Straße straße", "İSTANBUL ılık IŞIK İyi",
        "ΦΩΤΟΓΡΑΦΊΑ μιας ΓΆΤΑΣ", "ΟΔΟΣ", "ФОТОГРАФИЯ Кошки", "一张猫的照片", "猫の写真", "صورة قطة", "🦊🐱 Fox!!",
        "¿DÓNDE está?", "Zürich, GENÈVE & Lugano", "सड़क पर", "고양이 사진", "<eos>", "<bos> hello", "  spaced   OUT  ",
        "tab\there", "new\nline", "ÅNGSTRÖM Ǆ ǅ", "ﬁ ligature", "x" * 5, "e\u0301 café", "",
    ]  # fmt: skip
    rng = random.Random(0)
    texts = list(pieces)
    while len(texts) < count:
        words = rng.choices(pieces, k=rng.randint(1, 40))
        texts.append(rng.choice([" ", "", ", "]).join(words))
    return texts


def lower_per_character(text: str) -> str:
    """Lower-casing one character at a time: what the tokenizers library's Lowercase normaliser does (Python's
    str.lower also looks at the context of a capital sigma, giving a word-final 'ς')."""
    return "".join(character.lower() for character in text)


def test_transformers_reads_the_fixture_as_gemma(gemma_folder):
    tokenizer = transformers.AutoTokenizer.from_pretrained(gemma_folder)
    assert isinstance(tokenizer, transformers.GemmaTokenizerFast)


def test_gemma_ids_equal_transformers_after_lower_casing(gemma_folder):
    texts = varied_texts()
    ours = tokenizer_from_hf_folder(gemma_folder)
    assert isinstance(ours, GemmaTokenizer) and ours.lower_case and ours.context_length == 64
    ids = ours(texts)
    assert ids.shape == (len(texts), 64) and ids.dtype == torch.int64
    kwargs = dict(padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    gemma = transformers.GemmaTokenizerFast.from_pretrained(gemma_folder)
    assert torch.equal(ids, gemma([lower_per_character(t) for t in texts], **kwargs).input_ids)
    siglip2 = transformers.Siglip2Tokenizer.from_pretrained(gemma_folder)
    assert torch.equal(ids, siglip2(texts, **kwargs).input_ids)
    # Python's str.lower agrees everywhere but at a word-final capital sigma
    plain = [i for i, t in enumerate(texts) if "Σ" not in t]
    lowered = gemma([texts[i].lower() for i in plain], **kwargs).input_ids
    assert torch.equal(ids[plain], lowered)
    # GemmaTokenizer alone (the class the folder names) does not lower-case: different ids
    assert not torch.equal(ids, gemma(texts, **kwargs).input_ids)
    # truncation keeps room for <eos>; short text is <eos> then <pad>
    long_rows = [i for i, t in enumerate(texts) if len(ours.encode(t)) >= 64]
    assert long_rows and all(int(ids[i, -1]) == 1 for i in long_rows)
    assert ids[texts.index("A Photo of a CAT")].tolist()[-1] == 0


def test_gemma_tokenizer_round_trips_through_save(gemma_folder, tmp_path):
    tokenizer = tokenizer_from_hf_folder(gemma_folder)
    texts = varied_texts(40)
    config = tokenizer.save(tmp_path / "native")
    assert config["type"] == "gemma" and config["tokenizer_file"] == "tokenizer.json"
    rebuilt = polyclip.tokenizers.build_tokenizer(config, model_dir=tmp_path / "native")
    assert torch.equal(rebuilt(texts), tokenizer(texts))
    tokenizer.save_hf(tmp_path / "hf")  # names Siglip2Tokenizer: transformers lower-cases it too
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    reference_ids = reference(
        texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt"
    )
    assert torch.equal(reference_ids.input_ids, tokenizer(texts))
    assert tokenizer.decode(tokenizer(["A Photo of a CAT"])[0]) == "a photo of a cat"


# ---------------------------------------------------------------------------------------------------------
# models


def tiny_towers(vocab_size: int, image: dict) -> dict:
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    return dict(
        text_config=dict(vocab_size=vocab_size, max_position_embeddings=64, **tower),
        vision_config={**tower, **image},
    )


def images() -> list[Image.Image]:
    """Photos-like noise of several aspect ratios: square, wide, tall, a thin strip, a tiny one."""
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (120, 40), (40, 120), (200, 9), (5, 7), (97, 61)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for w, h in sizes]


def save_folder(model, processor, folder: Path) -> Path:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_fixed_resolution_siglip2_matches_siglip_model(gemma_folder, tmp_path):
    vocab = tokenizer_from_hf_folder(gemma_folder).vocab_size
    torch.manual_seed(0)
    config = transformers.SiglipConfig(**tiny_towers(vocab, dict(image_size=32, patch_size=8)))
    reference = transformers.SiglipModel(config).eval()
    tokenizer = transformers.Siglip2Tokenizer.from_pretrained(gemma_folder)
    image_processor = transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32})
    processor = transformers.SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    folder = save_folder(reference, processor, tmp_path / "fixres")
    # the released folders name GemmaTokenizer
    (folder / "tokenizer_config.json").write_text((gemma_folder / "tokenizer_config.json").read_text())
    checkpoint = read_checkpoint(folder)
    assert any("does not lower-case" in note for note in checkpoint.notes)
    model, preprocess, ours = polyclip.load(folder)
    assert isinstance(ours, GemmaTokenizer) and ours.lower_case
    texts = ["A Photo of a CAT", "ΦΩΤΟΓΡΑΦΊΑ", "一张猫的照片 🦊", "Zürich " * 30]
    inputs = processor(
        text=texts, images=images(), padding="max_length", max_length=64, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        expected = reference(**inputs)
        pixels = torch.stack([preprocess(image) for image in images()])
        out = model(pixels, ours(texts))
    assert torch.equal(ours(texts), inputs["input_ids"])
    torch.testing.assert_close(pixels, inputs["pixel_values"], atol=1e-6, rtol=0)
    torch.testing.assert_close(out.logits_per_image, expected.logits_per_image, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.image_embeds, expected.image_embeds, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def naflex(gemma_folder, tmp_path_factory):
    vocab = tokenizer_from_hf_folder(gemma_folder).vocab_size
    torch.manual_seed(0)
    config = transformers.Siglip2Config(**tiny_towers(vocab, dict(patch_size=4, num_patches=64)))
    reference = transformers.Siglip2Model(config).eval()
    image_processor = transformers.Siglip2ImageProcessorPil(patch_size=4, max_num_patches=48)
    tokenizer = transformers.GemmaTokenizerFast.from_pretrained(gemma_folder)
    processor = transformers.Siglip2Processor(image_processor=image_processor, tokenizer=tokenizer)
    folder = save_folder(reference, processor, tmp_path_factory.mktemp("naflex"))
    (folder / "tokenizer_config.json").write_text((gemma_folder / "tokenizer_config.json").read_text())
    return reference, processor, folder


def test_naflex_preprocessing_equals_siglip2_image_processor(naflex):
    _, processor, folder = naflex
    _, preprocess, _ = polyclip.load(folder)
    config = preprocess.config
    assert (config.resize_mode, config.patch_size, config.max_num_patches) == ("naflex", 4, 48)
    expected = processor.image_processor(images(), return_tensors="pt")
    packed = torch.stack([preprocess(image) for image in images()])
    patches, mask, shapes = unpack_patches(packed)
    assert torch.equal(shapes, expected["spatial_shapes"])
    assert torch.equal(mask, expected["pixel_attention_mask"].bool())
    torch.testing.assert_close(patches, expected["pixel_values"], atol=1e-6, rtol=0)
    for image in images():
        width, height = image.size
        grid = naflex_size(height, width, 4, 48)
        assert grid[0] % 4 == 0 and grid[1] % 4 == 0 and grid[0] * grid[1] <= 48 * 16


def test_naflex_model_matches_siglip2_model_end_to_end(naflex, tmp_path):
    reference, processor, folder = naflex
    model, preprocess, tokenizer = polyclip.load(folder)
    assert model.config.vision.kind == "naflex" and model.config.vision.grid_size == 8
    texts = ["A Photo of a CAT", "ΦΩΤΟΓΡΑΦΊΑ μιας ΓΆΤΑΣ", "猫の写真 🦊"]
    # the processor's own call would apply its class defaults (patch 16, 256 patches) over the saved ones
    inputs = {
        **processor.image_processor(images(), return_tensors="pt"),
        **processor.tokenizer(
            [lower_per_character(t) for t in texts], padding="max_length", max_length=64, truncation=True,
            return_tensors="pt",
        ),
    }  # fmt: skip
    with torch.no_grad():
        expected = reference(**inputs)
        out = model(torch.stack([preprocess(image) for image in images()]), tokenizer(texts))
        direct = model.visual.forward_patches(
            inputs["pixel_values"], inputs["pixel_attention_mask"], inputs["spatial_shapes"]
        )
    torch.testing.assert_close(out.logits_per_image, expected.logits_per_image, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.image_embeds, expected.image_embeds, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(direct, expected.image_embeds * direct.norm(dim=-1, keepdim=True))
    # batched encoding of files (images of every shape in one batch) equals one image at a time
    paths = []
    for index, image in enumerate(images()):
        paths.append(str(tmp_path / f"{index}.png"))
        image.save(paths[-1])
    batches = list(embed_images(model, preprocess, paths, batch_size=4))
    embedded = torch.cat([embeddings for _, embeddings, _ in batches])
    with torch.no_grad():
        one_by_one = torch.cat([model.encode_image(preprocess(p)[None], normalize=True) for p in paths])
    torch.testing.assert_close(embedded, one_by_one, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(embedded, expected.image_embeds, atol=1e-5, rtol=1e-4)
    classifier = polyclip.zero_shot_classifier(
        model, tokenizer, ["cat", "dog"], templates=["a photo of a {}."], preprocess=preprocess
    )
    logits = classifier.logits(images())
    text_embeds = F.normalize(
        model.encode_text(tokenizer(["a photo of a cat.", "a photo of a dog."])), dim=-1
    )
    torch.testing.assert_close(logits, model.logits(expected.image_embeds, text_embeds).detach())
    torch.testing.assert_close(
        classifier.logits(torch.stack([preprocess(p) for p in paths[:1]])[0]), logits[:1]
    )


def test_naflex_packing_is_exact_in_low_precision():
    patches = torch.randn(12, 48)
    packed = pack_patches(patches, (3, 4), 20).to(torch.bfloat16)
    unpacked, mask, shapes = unpack_patches(packed[None])
    assert shapes.tolist() == [[3, 4]] and int(mask.sum()) == 12
    wide = pack_patches(torch.zeros(1000, 48), (1, 1000), 1000).to(torch.bfloat16)
    assert unpack_patches(wide[None])[2].tolist() == [[1, 1000]]
    with pytest.raises(ValueError, match="patches for a"):
        pack_patches(patches, (3, 5), 20)
    with pytest.raises(polyclip.transforms.PreprocessConfigError, match="naflex"):
        PreprocessConfig(resize_mode="naflex", patch_size=16)
    config = PreprocessConfig(resize_mode="naflex", patch_size=16, max_num_patches=256, mean=(0.5,) * 3)
    assert PreprocessConfig.from_dict(config.to_dict()) == config
    assert "patch_size" not in PreprocessConfig().to_dict()
    assert build_preprocess(config).batch([]).shape == (0, 257, 768)


# ---------------------------------------------------------------------------------------------------------
# open_clip


def open_clip_hf_tokenizer():
    """open_clip's HFTokenizer class: its tokenizer module imported without the package's __init__ (which
    needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip is not installed")
    saved = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "open_clip"}
    package = types.ModuleType("open_clip")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["open_clip"] = package
    try:
        from open_clip.tokenizer import HFTokenizer
    finally:  # leave no stand-in package behind for other tests importing open_clip
        for name in [name for name in sys.modules if name.split(".")[0] == "open_clip"]:
            del sys.modules[name]
        sys.modules.update(saved)
    return HFTokenizer


def test_open_clip_siglip2_folder_tokenizes_as_hf_tokenizer(gemma_folder, tmp_path, monkeypatch):
    monkeypatch.setitem(
        open_clip_format.TIMM_SIGLIP_FAMILIES, "tiny", dict(width=32, layers=2, heads=4, mlp_dim=64)
    )
    tokenizer = tokenizer_from_hf_folder(gemma_folder)
    from polyclip.models import DualEncoderConfig, siglip_text, siglip_vision

    tower = dict(width=32, layers=2, heads=4, mlp_dim=64)
    config = DualEncoderConfig(
        embed_dim=32, vision=siglip_vision(image_size=32, patch_size=8, act="gelu", **tower),
        text=siglip_text(vocab_size=tokenizer.vocab_size, **tower), init_logit_scale=2.3, init_logit_bias=-10.0,
    )  # fmt: skip
    model = polyclip.create_model(config).eval()
    from polyclip.checkpoints.export import export_open_clip

    # open_clip's SigLIP 2 layout: its config as ViT-B-16-SigLIP2.json has it, the Gemma files beside it
    folder = export_open_clip(model, tmp_path / "oc", hf_tokenizer_name="timm/ViT-B-16-SigLIP2")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((gemma_folder / name).read_bytes())
    record = json.loads((folder / "open_clip_config.json").read_text())
    record["model_cfg"]["text_cfg"]["tokenizer_kwargs"] = {"clean": "canonicalize"}
    (folder / "open_clip_config.json").write_text(json.dumps(record))
    checkpoint = read_checkpoint(folder)
    assert checkpoint.tokenizer["type"] == "gemma" and checkpoint.tokenizer["clean"] == "canonicalize"
    loaded, _, ours = polyclip.load(folder)
    texts = varied_texts(200)
    reference = open_clip_hf_tokenizer()(str(folder), context_length=64, clean="canonicalize")
    assert torch.equal(ours(texts), reference(texts))
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(ours(texts[:4])), model.encode_text(ours(texts[:4])))
