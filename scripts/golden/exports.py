"""Golden outputs of open_clip reading polyclip's open_clip exports, for tests/test_exports.py.

Run from the repository root in an environment with torchvision, timm and open_clip_torch installed, with
polyclip importable (``PYTHONPATH=src``):

    PYTHONPATH=src python scripts/golden/exports.py            # writes tests/golden/exports/golden.npz, .json
    PYTHONPATH=src python scripts/golden/exports.py --spiece   # first (re)trains the tiny SentencePiece model

For a CLIP model (tiny ViT, CLIP's BPE) and a SigLIP model (``ViT-B-16-SigLIP`` sizes with a timm trunk,
as open_clip builds them, and a small SentencePiece vocabulary), polyclip writes an open_clip folder with
weights drawn by `fill_weights` (NumPy's seeded generator, identical in any torch version), and open_clip
reads it as its users do: ``create_model_and_transforms("local-dir:FOLDER")`` and
``get_tokenizer("local-dir:FOLDER")``. The token ids, image and text embeddings open_clip computes are
stored, with a checksum of the ``open_clip_config.json`` written.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "golden" / "exports"
PHOTOS = ROOT / "tests" / "golden" / "images"
TEXTS = [
    "a photo of a cat",
    "A DOG, on the street!",
    "red car near the sea",
    "Hello, World! It's 3:45 p.m.",
    "</s> <unk> done",  # open_clip's cleaning strips the punctuation of literal special tokens first
    "snake_case &amp; caf\u00e9",
]
IMAGES = ["photo_639x427.jpg", "rgba_67x45.png"]
SIGLIP_TOKENIZER_NAME = "polyclip-tests/tiny-spiece"  # hf-hub name recorded; local-dir loading ignores it
_WORDS = (
    "photo picture image cat dog bird horse person car bus train street road city house tree flower sea "
    "water sky red blue green small large old young near on the a of with"
).split()


def fill_weights(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every tensor of the state dict, in key order, from NumPy's PCG64 generator (scale 0.05; norm weights
    around 1): the same weights under any torch version. tests/test_exports.py draws the same."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            values = rng.standard_normal(tuple(tensor.shape)) * 0.05
            if "norm" in name and name.endswith("weight"):
                values += 1.0
            if name == "logit_scale":
                values = np.full(tuple(tensor.shape), np.log(10.0))
            tensor.copy_(torch.from_numpy(np.asarray(values)).to(tensor.dtype))
    return model


def train_spiece(folder: Path) -> None:
    import sentencepiece

    rng = random.Random(0)
    sentences = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 10))) for _ in range(2000)]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(folder / "spiece"), model_type="unigram",
        vocab_size=64, hard_vocab_limit=False, character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2,
        bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", minloglevel=2,
        normalization_rule_name="identity",  # no Unicode normalisation table: keeps the file small
    )  # fmt: skip
    (folder / "spiece.vocab").unlink()


def cases() -> dict:
    """name -> (polyclip config, tokenizer, export keyword arguments). Also used by tests/test_exports.py."""
    import polyclip
    from polyclip.models import DualEncoderConfig, TextConfig, VisionConfig
    from polyclip.tokenizers import ClipTokenizer, SiglipTokenizer

    clip = DualEncoderConfig(
        embed_dim=16,
        vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_dim=256),
        text=TextConfig(width=32, layers=2, heads=2, mlp_dim=128),
    )
    spiece = SiglipTokenizer(OUT / "spiece.model")
    siglip = polyclip.models.get_architecture("ViT-B-16-SigLIP-gelu")
    siglip.text = dataclasses.replace(siglip.text, vocab_size=spiece.vocab_size)
    return {
        "clip": (clip, ClipTokenizer(), {}),
        "siglip": (siglip, spiece, {"hf_tokenizer_name": SIGLIP_TOKENIZER_NAME}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spiece", action="store_true", help="retrain the tiny SentencePiece model first")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.spiece or not (OUT / "spiece.model").is_file():
        train_spiece(OUT)

    import open_clip

    import polyclip
    from polyclip.checkpoints.export import export_open_clip

    arrays: dict[str, np.ndarray] = {}
    index: dict[str, dict] = {"texts": TEXTS, "images": IMAGES, "open_clip": open_clip.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        for seed, (name, (config, tokenizer, kwargs)) in enumerate(cases().items()):
            model = fill_weights(polyclip.create_model(config), seed).eval()
            folder = export_open_clip(model, Path(tmp) / name, tokenizer=tokenizer, **kwargs)
            reference, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
            reference_tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
            ids = reference_tokenizer(TEXTS)
            pixels = torch.stack([preprocess(Image.open(PHOTOS / image)) for image in IMAGES])
            with torch.no_grad():
                arrays[f"{name}/ids"] = ids.numpy()
                arrays[f"{name}/text"] = reference.eval().encode_text(ids).numpy()
                arrays[f"{name}/image"] = reference.encode_image(pixels).numpy()
                arrays[f"{name}/pixels_checksum"] = pixels.double().sum((1, 2, 3)).numpy()
            config_text = (folder / "open_clip_config.json").read_text()
            index[name] = {
                "tokenizer": type(reference_tokenizer).__name__,
                "config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
                "seed": seed,
            }
    np.savez_compressed(OUT / "golden.npz", **arrays)
    (OUT / "golden.json").write_text(json.dumps(index, indent=1) + "\n")
    print(f"wrote {len(arrays)} arrays to {OUT / 'golden.npz'}")


if __name__ == "__main__":
    main()
