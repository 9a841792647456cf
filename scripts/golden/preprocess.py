"""Golden outputs of the reference preprocessing pipelines, for tests/test_preprocess_golden.py.

Run in an environment with torchvision, open_clip_torch, OpenAI's ``clip`` package and transformers
installed (none of them is a polyclip dependency):

    python scripts/golden/preprocess.py            # writes tests/golden/preprocess.npz and .json
    python scripts/golden/preprocess.py --images   # first (re)draws the test photos

The photos are small generated images of odd sizes in the modes real files come in (RGB JPEG and PNG,
greyscale, greyscale + alpha, palette with a transparent colour, RGBA, 16-bit greyscale, CMYK JPEG),
sized so that the resized long side minus the crop is 3 modulo 4: there torchvision's rounded centre-crop
offset and transformers' floored one differ by a pixel. Each reference pipeline is called the way its
users call it:

- OpenAI CLIP: ``clip.clip._transform(n)`` (what ``clip.load`` returns as ``preprocess``);
- open_clip: ``image_transform`` for each ``resize_mode``, and ``create_model_and_transforms`` on a
  local folder whose ``preprocess_cfg`` overrides the defaults;
- transformers: ``CLIPImageProcessor`` / ``SiglipImageProcessor`` (torchvision backend) and their
  ``...Pil`` twins, loaded from a ``preprocessor_config.json`` with ``from_pretrained``;
- pybioclip (``src/bioclip/predict.py``): ``Compose([ToTensor(), Resize((224, 224), antialias=True),
  Normalize(OpenAI mean/std)])`` on ``Image.open(path).convert("RGB")``, rebuilt from torchvision as written
  there (at the golden's size).

Outputs are stored as the 8-bit pixels the pipelines normalise (exact for every pipeline that resizes
8-bit images) and, for pipelines that resize float tensors, as float16 normalised tensors.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "tests" / "golden" / "images"
OUT = ROOT / "tests" / "golden" / "preprocess"
SIZE = 32  # the crop of the small photos
PHOTO_SIZE = 224  # the crop of the one full-size photo
EDGE = 6  # columns kept on each side of the full-size photo's outputs

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# file name -> (mode, width, height)
PHOTOS = {
    "rgb_65x53.jpg": ("RGB", 65, 53),
    "rgb_53x79.png": ("RGB", 53, 79),
    "grey_67x49.png": ("L", 67, 49),
    "grey_alpha_49x73.png": ("LA", 49, 73),
    "palette_61x41.png": ("P", 61, 41),
    "rgba_67x45.png": ("RGBA", 67, 45),
    "grey16_45x61.png": ("I;16", 45, 61),
    "cmyk_77x57.jpg": ("CMYK", 77, 57),
    "photo_639x427.jpg": ("RGB", 639, 427),
}


def _scene(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth 'photo' (H, W, 3) in 0..1: gradients, soft blobs, a few hard edges and light noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    x, y = x / width, y / height
    image = np.stack([0.5 + 0.4 * np.sin(2 * np.pi * (x * f + y * g) + p)
                      for f, g, p in rng.uniform(0.3, 2.5, size=(3, 3))], axis=-1)  # fmt: skip
    for _ in range(4):
        cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.25)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
        image = image * (1 - blob) + rng.uniform(0, 1, 3) * blob
    for _ in range(3):  # hard-edged rectangles: where one pixel of shift shows
        x0, y0 = rng.uniform(0, 0.8, 2)
        mask = (x > x0) & (x < x0 + rng.uniform(0.05, 0.3)) & (y > y0) & (y < y0 + rng.uniform(0.05, 0.3))
        image[mask] = rng.uniform(0, 1, 3)
    image += rng.normal(0, 0.02, image.shape)
    return np.clip(image, 0, 1)


def draw_photos() -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    for seed, (name, (mode, width, height)) in enumerate(PHOTOS.items()):
        rgb = _scene(width, height, seed)
        pixels = np.round(rgb * 255).astype(np.uint8)
        image = Image.fromarray(pixels, "RGB")
        alpha = np.round(255 * np.clip(1.2 - 1.5 * np.abs(np.linspace(-1, 1, width))[None, :]
                                       * np.ones((height, 1)), 0, 1)).astype(np.uint8)  # fmt: skip
        if mode == "L":
            image = image.convert("L")
        elif mode == "LA":
            image = Image.merge("LA", (image.convert("L"), Image.fromarray(alpha, "L")))
        elif mode == "RGBA":
            image = Image.merge("RGBA", (*image.split(), Image.fromarray(alpha, "L")))
        elif mode == "P":
            image = image.quantize(colors=64, dither=Image.Dither.NONE)
            image.info["transparency"] = 3  # one palette entry is transparent, as in GIFs and PNG tRNS
        elif mode == "I;16":
            deep = (rgb.mean(axis=-1) * 65535).round().astype(np.uint16)
            image = Image.fromarray(deep)
        elif mode == "CMYK":
            image = image.convert("CMYK")
        path = IMAGES / name
        if name.endswith(".jpg"):
            image.save(path, quality=92)
        else:
            image.save(path, **({"transparency": 3} if mode == "P" else {}))
        check = Image.open(path)
        assert check.mode == mode and check.size == (width, height), (name, check.mode, check.size)


def _open_clip_folder(folder: Path, preprocess_cfg: dict) -> None:
    """A tiny open_clip model folder (random weights) whose open_clip_config.json records preprocess_cfg."""
    import open_clip
    import torch

    model_cfg = {"embed_dim": 16, "quick_gelu": True,
                 "vision_cfg": {"image_size": SIZE, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
                 "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}  # fmt: skip
    model = open_clip.model.CLIP(**{k: v for k, v in model_cfg.items() if k != "quick_gelu"}, quick_gelu=True)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    record = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (folder / "open_clip_config.json").write_text(json.dumps(record))


def reference_pipelines(work: Path, records: dict) -> dict[str, dict]:
    """name -> {"fn": image path -> (3, S, S) tensor, "mean", "std", "float": resizes float tensors}.

    ``records`` receives the configuration files the folders hold (for the tests to write the same ones).
    """
    import clip
    import open_clip
    import transformers
    from torchvision import transforms as T

    pipelines: dict[str, dict] = {}

    def add(name, fn, mean=OPENAI_MEAN, std=OPENAI_STD, float_resize=False, size=SIZE):
        pipelines[name] = {"fn": fn, "mean": mean, "std": std, "float": float_resize, "size": size}

    def pil(path):
        return Image.open(path)  # as the references' users open a file; every pipeline converts itself

    for size, suffix in ((SIZE, ""), (PHOTO_SIZE, "@224")):
        transform = clip.clip._transform(size)
        add(f"openai{suffix}", lambda p, t=transform: t(pil(p)), size=size)
        transform = open_clip.image_transform(size, is_train=False)
        add(f"open_clip_shortest{suffix}", lambda p, t=transform: t(pil(p)), size=size)
    add("open_clip_longest", lambda p, t=open_clip.image_transform(
        SIZE, is_train=False, resize_mode="longest", fill_color=127): t(pil(p)))  # fmt: skip
    add("open_clip_squash", lambda p, t=open_clip.image_transform(
        SIZE, is_train=False, resize_mode="squash", interpolation="bilinear"): t(pil(p)))  # fmt: skip
    folder_cfg = {"size": SIZE, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear",
                  "resize_mode": "shortest"}  # fmt: skip
    _open_clip_folder(work / "open_clip_folder", folder_cfg)
    records["open_clip_folder"] = folder_cfg
    _, _, folder_transform = open_clip.create_model_and_transforms(f"local-dir:{work / 'open_clip_folder'}")
    add("open_clip_folder", lambda p: folder_transform(pil(p)), mean=(0.5,) * 3, std=(0.5,) * 3)

    # transformers: a preprocessor_config.json as checkpoints record it, loaded with from_pretrained
    hf_configs = {
        "hf_clip": (transformers.CLIPImageProcessor, transformers.CLIPImageProcessorPil,
                    {"size": {"shortest_edge": SIZE}, "crop_size": {"height": SIZE, "width": SIZE}}),
        "hf_clip_crop_pct": (transformers.CLIPImageProcessor, transformers.CLIPImageProcessorPil,
                             {"size": {"shortest_edge": 37}, "crop_size": {"height": SIZE, "width": SIZE},
                              "resample": 2}),
        "hf_siglip": (transformers.SiglipImageProcessor, transformers.SiglipImageProcessorPil,
                      {"size": {"height": SIZE, "width": SIZE}}),
    }  # fmt: skip
    for name, (tv_class, pil_class, overrides) in hf_configs.items():
        folder = work / name
        tv_class(**overrides).save_pretrained(folder)
        records[name] = json.loads((folder / "preprocessor_config.json").read_text())
        for suffix, cls in (("", tv_class), ("_pil", pil_class)):
            processor = cls.from_pretrained(folder)
            add(f"{name}{suffix}", lambda p, pr=processor: pr(images=pil(p), return_tensors="pt")["pixel_values"][0],
                mean=tuple(processor.image_mean), std=tuple(processor.image_std))  # fmt: skip
    folder = work / "hf_clip_224"
    transformers.CLIPImageProcessor().save_pretrained(folder)
    records["hf_clip@224"] = json.loads((folder / "preprocessor_config.json").read_text())
    for suffix, cls in (("", transformers.CLIPImageProcessor), ("_pil", transformers.CLIPImageProcessorPil)):
        processor = cls.from_pretrained(folder)
        add(f"hf_clip{suffix}@224", lambda p, pr=processor: pr(images=pil(p), return_tensors="pt")["pixel_values"][0],
            size=PHOTO_SIZE)  # fmt: skip

    # pybioclip's preprocess_img (src/bioclip/predict.py), at the golden's size
    bioclip = T.Compose(
        [T.ToTensor(), T.Resize((SIZE, SIZE), antialias=True), T.Normalize(OPENAI_MEAN, OPENAI_STD)]
    )
    add("pybioclip", lambda p: bioclip(Image.open(p).convert("RGB")), float_resize=True)
    return pipelines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", action="store_true", help="redraw the test photos first")
    args = parser.parse_args()
    if args.images:
        draw_photos()
    arrays: dict[str, np.ndarray] = {}
    index: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        records: dict[str, dict] = {}
        pipelines = reference_pipelines(Path(tmp), records)
        for name, spec in pipelines.items():
            mean = np.array(spec["mean"], dtype=np.float64).reshape(3, 1, 1)
            std = np.array(spec["std"], dtype=np.float64).reshape(3, 1, 1)
            for photo in PHOTOS:
                is_photo = photo.startswith("photo_")
                if is_photo != (spec["size"] == PHOTO_SIZE):
                    continue
                out = spec["fn"](IMAGES / photo).numpy().astype(np.float64)  # (3, S, S) normalised
                assert out.shape == (3, spec["size"], spec["size"]), (name, photo, out.shape)
                key = f"{name}/{photo}"
                entry = {
                    "pipeline": name,
                    "image": photo,
                    "mean": list(spec["mean"]),
                    "std": list(spec["std"]),
                }
                if spec["float"]:
                    arrays[key] = out.astype(np.float16)
                    entry["stored"] = "normalised_float16"
                else:
                    pixels = (out * std + mean) * 255  # back to the 8-bit values the pipeline normalised
                    rounded = np.round(pixels)
                    assert np.abs(pixels - rounded).max() < 1e-3, (
                        name,
                        photo,
                        np.abs(pixels - rounded).max(),
                    )
                    rounded = rounded.astype(np.uint8)
                    entry["stored"] = "uint8_pixels"
                    if is_photo:
                        # the full-size photo: a checksum of all pixels, and the outer columns, where a
                        # one-pixel shift of the crop shows (keeps the file small)
                        entry["sha256"] = hashlib.sha256(np.ascontiguousarray(rounded).tobytes()).hexdigest()
                        entry["stored"] = "uint8_edge_columns"
                        rounded = np.concatenate([rounded[..., :EDGE], rounded[..., -EDGE:]], axis=-1)
                    arrays[key] = rounded
                index[key] = entry
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT.with_suffix(".npz"), **arrays)
    import open_clip
    import torchvision
    import transformers

    versions = {"open_clip": open_clip.__version__, "transformers": transformers.__version__,
                "torchvision": torchvision.__version__, "pillow": Image.__version__}  # fmt: skip
    (OUT.with_suffix(".json")).write_text(
        json.dumps({"versions": versions, "folders": records, "entries": index}, indent=1) + "\n"
    )
    print(f"wrote {len(arrays)} reference outputs to {OUT.with_suffix('.npz')}")


if __name__ == "__main__":
    main()
