"""Exports read by the real clients as their users call them.

- open_clip: tests/golden/exports holds what open_clip 3.3's ``create_model_and_transforms("local-dir:F")``
  and ``get_tokenizer("local-dir:F")`` compute on polyclip's open_clip exports of a CLIP and a SigLIP model
  (scripts/golden/exports.py; open_clip needs torchvision, which stays out of this environment). Here the
  same folders are written again and polyclip's outputs compared with open_clip's.
- transformers: ``AutoProcessor`` + ``CLIPModel(**inputs)`` / ``SiglipModel(**inputs)`` (with
  ``padding="max_length"``, as SigLIP's model card says) and ``pipeline("zero-shot-image-classification")``
  on ``export_hf`` folders, against polyclip's own embeddings of the same model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import polyclip
from conftest import import_reference
from polyclip.checkpoints.export import ExportError, export_hf, export_open_clip, open_clip_record
from polyclip.checkpoints.open_clip import tokenizer_from_open_clip
from polyclip.tokenizers import SiglipTokenizer, build_tokenizer

GOLDEN = Path(__file__).parent / "golden"
_spec = importlib.util.spec_from_file_location(
    "_golden_exports", Path(__file__).parents[1] / "scripts" / "golden" / "exports.py"
)
golden_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden_script)  # its weights, cases and texts: one definition for both sides
INDEX = json.loads((GOLDEN / "exports" / "golden.json").read_text())
ARRAYS = np.load(GOLDEN / "exports" / "golden.npz")
TEXTS = INDEX["texts"]
IMAGES = [GOLDEN / "images" / name for name in INDEX["images"]]
TOLERANCE = 2e-5


def _export(name: str, folder: Path):
    config, tokenizer, kwargs = golden_script.cases()[name]
    model = golden_script.fill_weights(polyclip.create_model(config), INDEX[name]["seed"]).eval()
    return model, export_open_clip(model, folder, tokenizer=tokenizer, **kwargs)


def _config_digest(folder: Path) -> str:
    return hashlib.sha256((folder / "open_clip_config.json").read_bytes()).hexdigest()


def _embeddings(folder: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    model, preprocess, tokenizer = polyclip.load(folder)
    ids = tokenizer(TEXTS)
    with torch.no_grad():
        return ids, model.encode_text(ids), model.encode_image(preprocess.batch(IMAGES))


def test_open_clip_reads_the_clip_export_as_polyclip(tmp_path: Path) -> None:
    _, folder = _export("clip", tmp_path / "clip")
    assert _config_digest(folder) == INDEX["clip"]["config_sha256"], "the export differs from the golden's"
    assert INDEX["clip"]["tokenizer"] == "SimpleTokenizer"
    ids, text, image = _embeddings(folder)
    np.testing.assert_array_equal(ids.numpy(), ARRAYS["clip/ids"])
    torch.testing.assert_close(text, torch.from_numpy(ARRAYS["clip/text"]), atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(image, torch.from_numpy(ARRAYS["clip/image"]), atol=TOLERANCE, rtol=0)


def test_open_clip_rebuilds_the_siglip_tokenizer_of_the_export(tmp_path: Path) -> None:
    """open_clip's get_tokenizer("local-dir:OUT") gives its HFTokenizer over the exported SentencePiece
    files (not CLIP's BPE) and the ids polyclip gives; the record written is the golden's, byte for byte."""
    config, tokenizer, kwargs = golden_script.cases()["siglip"]
    record, layout, _ = open_clip_record(config, tokenizer=tokenizer, **kwargs)
    text = json.dumps(record, indent=2) + "\n"
    assert hashlib.sha256(text.encode()).hexdigest() == INDEX["siglip"]["config_sha256"]
    assert layout == "timm" and INDEX["siglip"]["tokenizer"] == "HFTokenizer"
    text_cfg = record["model_cfg"]["text_cfg"]
    assert text_cfg["hf_tokenizer_name"] and text_cfg["eos_id"] == 1
    tokenizer.save_hf(tmp_path)
    ours = build_tokenizer(tokenizer_from_open_clip(text_cfg, [], tmp_path), model_dir=tmp_path)
    np.testing.assert_array_equal(ours(TEXTS).numpy(), ARRAYS["siglip/ids"])


@pytest.mark.slow
def test_open_clip_reads_the_siglip_export_as_polyclip(tmp_path: Path) -> None:
    """A full ViT-B-16-SigLIP-sized model (open_clip names its image tower by timm model, so no tiny one
    exists): open_clip's encode_text / encode_image of the export equal polyclip's."""
    _, folder = _export("siglip", tmp_path / "siglip")
    assert _config_digest(folder) == INDEX["siglip"]["config_sha256"]
    ids, text, image = _embeddings(folder)
    np.testing.assert_array_equal(ids.numpy(), ARRAYS["siglip/ids"])
    torch.testing.assert_close(text, torch.from_numpy(ARRAYS["siglip/text"]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(image, torch.from_numpy(ARRAYS["siglip/image"]), atol=1e-4, rtol=1e-4)


def test_a_siglip_export_without_its_tokenizer_is_refused() -> None:
    config, _, _ = golden_script.cases()["siglip"]
    with pytest.raises(ExportError, match="SentencePiece tokenizer"):
        open_clip_record(config)
    with pytest.raises(ExportError, match="SentencePiece"):
        open_clip_record(config, tokenizer=polyclip.tokenizers.ClipTokenizer())


# ---------------------------------------------------------------------------------------------------------
# transformers, as users call it

transformers = import_reference("transformers", "pip install transformers")
# transformers' CLIP tokenizer does not undo HTML entities ("&amp;") as OpenAI's and polyclip's do
HF_TEXTS = [text for text in TEXTS if "&" not in text]


def _tiny(name: str):
    """(model, tokenizer) with the golden's tiny SentencePiece vocabulary for SigLIP."""
    if name == "clip":
        return polyclip.create_model("tiny-vit").eval(), polyclip.tokenizers.ClipTokenizer()
    import dataclasses

    tokenizer = SiglipTokenizer(GOLDEN / "exports" / "spiece.model")
    config = polyclip.models.get_architecture("tiny-siglip")
    config.text = dataclasses.replace(config.text, vocab_size=tokenizer.vocab_size)
    return golden_script.fill_weights(polyclip.create_model(config), 3).eval(), tokenizer


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_transformers_reads_the_export_as_polyclip(tmp_path: Path, name: str) -> None:
    torch.manual_seed(0)
    model, tokenizer = _tiny(name)
    folder = export_hf(model, tmp_path, tokenizer=tokenizer)
    _, preprocess, ours_tokenizer = polyclip.load(folder)
    processor = transformers.AutoProcessor.from_pretrained(folder)
    images = [Image.open(path) for path in IMAGES]
    padding = "max_length" if name == "siglip" else True  # as each model's card calls its processor
    inputs = processor(text=HF_TEXTS, images=images, padding=padding, return_tensors="pt")
    if name == "siglip":
        assert "attention_mask" not in inputs  # SigLIP was trained and is evaluated without one
    cls = transformers.SiglipModel if name == "siglip" else transformers.CLIPModel
    reference = cls.from_pretrained(folder).eval()
    with torch.no_grad():
        out = reference(**inputs)
        text = model.encode_text(ours_tokenizer(HF_TEXTS), normalize=True)
        image = model.encode_image(preprocess.batch(IMAGES), normalize=True)
    torch.testing.assert_close(out.text_embeds, text, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.image_embeds, image, atol=1e-5, rtol=0)


def test_transformers_zero_shot_pipeline_scores_as_polyclip(tmp_path: Path) -> None:
    model, tokenizer = _tiny("siglip")
    folder = export_hf(model, tmp_path, tokenizer=tokenizer)
    labels = ["cat", "dog on the street", "red car"]
    classifier = transformers.pipeline("zero-shot-image-classification", model=str(folder))
    result = classifier(Image.open(IMAGES[0]), candidate_labels=labels)
    scores = {entry["label"]: entry["score"] for entry in result}
    _, preprocess, ours_tokenizer = polyclip.load(folder)
    prompts = [f"This is a photo of {label}." for label in labels]  # the pipeline's default template
    with torch.no_grad():
        out = model(preprocess.batch(IMAGES[:1]), ours_tokenizer(prompts))
    ours = torch.sigmoid(out.logits_per_image[0])  # SigLIP's pipeline scores each label by its sigmoid
    torch.testing.assert_close(torch.tensor([scores[label] for label in labels]), ours, atol=1e-5, rtol=1e-4)


def test_cli_convert_writes_the_siglip_tokenizer_transformers_reads(tmp_path: Path) -> None:
    """``polyclip convert --to hf`` of a SigLIP model: the processor returns no attention mask and the
    text embeddings of ``SiglipModel(**inputs)`` are polyclip's."""
    from typer.testing import CliRunner

    from polyclip.cli import app

    model, tokenizer = _tiny("siglip")
    source = polyclip.save(
        model, polyclip.transforms.build_preprocess("siglip"), tokenizer, tmp_path / "native"
    )
    out = tmp_path / "hf"
    result = CliRunner().invoke(app, ["convert", str(source), "--out", str(out), "--to", "hf"])
    assert result.exit_code == 0, result.output
    processor = transformers.AutoProcessor.from_pretrained(out)
    inputs = processor(text=HF_TEXTS, padding="max_length", return_tensors="pt")
    assert set(inputs) == {"input_ids"}
    reference = transformers.SiglipModel.from_pretrained(out).eval()
    with torch.no_grad():
        expected = reference.get_text_features(**inputs)
        expected = getattr(expected, "pooler_output", expected)
        ours = model.encode_text(tokenizer(HF_TEXTS))
    torch.testing.assert_close(expected, ours, atol=1e-5, rtol=0)
