"""A synthetic image-caption dataset: rendered shapes with a colour, size, position and texture.

Each image shows one shape on a noisy light background and is captioned from its attributes
("a small striped red circle on the left"); training images get several captions that name the
colour, the shape and a random subset of the other attributes. Some colour x shape combinations are held
out of training entirely, so that zero-shot classification of those combinations tests whether
the model composes what it learnt about colours and shapes separately.

The held-out combinations form two "diagonals" of the colour x shape grid: every colour and every
shape appears in exactly two held-out combinations, so among the held-out classes neither the
colour alone nor the shape alone identifies the class (each gives at most 50%).

Rendering is Pillow at 4x supersampling, downsampled with a box filter (anti-aliased edges); every
image is drawn from its own seeded generator, so the dataset is a pure function of the seed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "yellow": (230, 200, 30),
    "purple": (135, 50, 185),
    "orange": (240, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
SIZES = ("small", "large")
POSITIONS = {  # caption phrase -> centre offset from the middle, as fractions of the image side
    "on the left": (-1.0, 0.0),
    "on the right": (1.0, 0.0),
    "at the top": (0.0, -1.0),
    "at the bottom": (0.0, 1.0),
    "in the middle": (0.0, 0.0),
}
TEXTURES = ("solid", "striped", "outlined")
SUPERSAMPLE = 4


def held_out_combinations() -> list[tuple[str, str]]:
    """(colour, shape) pairs never shown in training: shapes i + 1 and i + 3 for colour i."""
    colours = list(COLOURS)
    return [(colours[i], SHAPES[(i + shift) % len(SHAPES)]) for i in range(len(colours)) for shift in (1, 3)]


def seen_combinations() -> list[tuple[str, str]]:
    held = set(held_out_combinations())
    return [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in held]


@dataclass(frozen=True)
class ShapeSpec:
    colour: str
    shape: str
    size: str
    position: str
    texture: str

    def caption(self, parts: tuple[str, ...] = ("size", "texture", "colour", "shape", "position")) -> str:
        """A caption naming ``parts`` of the attributes (without the shape, the noun is "shape")."""
        words = ["a"]
        for part in ("size", "texture", "colour"):
            if part in parts:
                words.append(getattr(self, part))
        words.append(self.shape if "shape" in parts else "shape")
        if "position" in parts:
            words.append(self.position)
        return " ".join(words)

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"


def random_spec(rng: np.random.Generator, combinations: list[tuple[str, str]]) -> ShapeSpec:
    colour, shape = combinations[int(rng.integers(len(combinations)))]
    return ShapeSpec(
        colour,
        shape,
        SIZES[int(rng.integers(len(SIZES)))],
        list(POSITIONS)[int(rng.integers(len(POSITIONS)))],
        TEXTURES[int(rng.integers(len(TEXTURES)))],
    )


def _outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]] | None:
    """Polygon vertices of ``shape`` centred at (cx, cy) with outer radius r (None for the circle)."""

    def ring(points: int, radii: tuple[float, ...], start: float) -> list[tuple[float, float]]:
        vertices = []
        for k in range(points * len(radii)):
            theta = start + angle + 2 * math.pi * k / (points * len(radii))
            radius = radii[k % len(radii)]
            vertices.append((cx + radius * math.cos(theta), cy + radius * math.sin(theta)))
        return vertices

    if shape == "circle":
        return None
    if shape == "square":
        return ring(4, (r,), math.pi / 4)
    if shape == "diamond":  # a rhombus taller than wide, so it is not a turned square
        points = [(0.0, -r), (0.62 * r, 0.0), (0.0, r), (-0.62 * r, 0.0)]
        cos, sin = math.cos(angle), math.sin(angle)
        return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in points]
    if shape == "triangle":
        return ring(3, (r,), -math.pi / 2)
    if shape == "star":
        return ring(5, (r, r * 0.42), -math.pi / 2)
    if shape == "cross":
        arm = r * 0.36
        corners = [(arm, r), (arm, arm), (r, arm), (r, -arm), (arm, -arm), (arm, -r)]
        right = [(cx + x, cy + y) for x, y in corners]
        left = [(cx - x, cy - y) for x, y in corners]
        return right + left
    raise ValueError(f"unknown shape {shape!r}")


def render(
    spec: ShapeSpec,
    size: int,
    rng: np.random.Generator,
    rgb: tuple[int, int, int] | None = None,
    background: tuple[int, int, int] | None = None,
) -> Image.Image:
    """One RGB image of ``size`` x ``size`` pixels showing ``spec``; ``rgb`` overrides the colour's value
    (for shades the captions do not name) and ``background`` the light grey (for distribution shifts)."""
    big = size * SUPERSAMPLE
    grey = int(rng.integers(205, 246))
    canvas = Image.new("RGB", (big, big), background if background is not None else (grey,) * 3)
    radius = big * (0.2 if spec.size == "small" else 0.3) * float(rng.uniform(0.9, 1.1))
    reach = big * 0.5 - radius - big * 0.04  # how far the centre may move while the shape stays inside
    dx, dy = POSITIONS[spec.position]
    cx = big / 2 + dx * reach + float(rng.uniform(-0.03, 0.03)) * big
    cy = big / 2 + dy * reach + float(rng.uniform(-0.03, 0.03)) * big
    angle = float(rng.uniform(-0.2, 0.2))  # a slight rotation
    base = rgb if rgb is not None else COLOURS[spec.colour]
    spread = 21 if rgb is None else 7  # a named colour varies widely, a shade barely
    colour = tuple(int(np.clip(c + rng.integers(-spread, spread), 0, 255)) for c in base)
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    vertices = _outline(spec.shape, cx, cy, radius, angle)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if spec.texture == "outlined":
        width = max(2, int(radius * 0.22))
        if vertices is None:
            draw.ellipse(box, outline=255, width=width)
        else:
            draw.line([*vertices, vertices[0], vertices[1]], fill=255, width=width, joint="curve")
    else:
        if vertices is None:
            draw.ellipse(box, fill=255)
        else:
            draw.polygon(vertices, fill=255)
        if spec.texture == "striped":
            period = max(4, int(radius * 0.45))
            stripes = np.zeros((big, big), dtype=np.uint8)
            rows = (np.arange(big) // (period // 2)) % 2 == 0
            stripes[rows, :] = 255
            mask = Image.fromarray(np.minimum(np.asarray(mask), stripes))
    canvas.paste(Image.new("RGB", (big, big), colour), (0, 0), mask)
    image = canvas.resize((size, size), Image.Resampling.BOX)
    noise = rng.normal(0.0, 6.0, (size, size, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _caption_variants(spec: ShapeSpec, rng: np.random.Generator, count: int) -> list[str]:
    """The full caption, then ``count - 1`` captions that name the colour, the shape and a random
    subset of size, texture and position ("a red circle", "a striped red circle at the top")."""
    captions = [spec.caption()]
    for _ in range(count - 1):
        parts = [p for p in ("size", "texture", "position") if rng.random() < 0.5]
        captions.append(spec.caption((*parts, "colour", "shape")))
    return captions


@dataclass
class ShapesDataset:
    root: Path
    train: Path  # JSONL of {"image", "captions"}
    validation: Path  # JSONL of {"image", "caption"}: unique full captions, seen combinations
    zero_shot: Path  # ImageFolder of the held-out combinations: root/<colour>_<shape>/<image>
    held_out: list[tuple[str, str]]
    seen: list[tuple[str, str]]


def write_dataset(
    root: str | Path, seed: int = 0, image_size: int = 32, train_images: int = 4000,
    validation_images: int = 200, zero_shot_per_class: int = 20, captions_per_image: int = 3,
) -> ShapesDataset:  # fmt: skip
    """Render the three splits as PNG files plus JSONL captions under ``root``."""
    root = Path(root)
    held, seen = held_out_combinations(), seen_combinations()
    rng = np.random.default_rng([seed, 1])

    def save(spec: ShapeSpec, folder: Path, name: str, image_seed: int) -> str:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.png"
        render(spec, image_size, np.random.default_rng([seed, 2, image_seed])).save(path, compress_level=1)
        return str(path.relative_to(root))

    root.mkdir(parents=True, exist_ok=True)
    with (root / "train.jsonl").open("w") as handle:
        for n in range(train_images):
            spec = random_spec(rng, seen)
            image = save(spec, root / "train", f"{n:06d}", n)
            handle.write(
                json.dumps({"image": image, "captions": _caption_variants(spec, rng, captions_per_image)})
                + "\n"
            )

    # Validation pairs: distinct full captions, so that each caption has exactly one correct image.
    used: set[str] = set()
    with (root / "validation.jsonl").open("w") as handle:
        n = 0
        while n < validation_images:
            spec = random_spec(rng, seen)
            if spec.caption() in used:
                continue
            used.add(spec.caption())
            image = save(spec, root / "validation", f"{n:06d}", 1_000_000 + n)
            handle.write(json.dumps({"image": image, "caption": spec.caption()}) + "\n")
            n += 1

    # Zero-shot images of the held-out combinations; their full captions are kept for the search example.
    with (root / "zero_shot.jsonl").open("w") as handle:
        for index, (colour, shape) in enumerate(held):
            for n in range(zero_shot_per_class):
                spec = random_spec(rng, [(colour, shape)])
                folder = root / "zero_shot" / f"{colour}_{shape}"
                image = save(spec, folder, f"{n:04d}", 2_000_000 + index * 1000 + n)
                handle.write(json.dumps({"image": image, "caption": spec.caption()}) + "\n")
    return ShapesDataset(
        root, root / "train.jsonl", root / "validation.jsonl", root / "zero_shot", held, seen
    )
