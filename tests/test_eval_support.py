"""Fakes shared by the evaluation tests: a model obeying the dual-encoder contract whose embeddings
make the right answers known, a byte tokenizer, a preprocess callable and solid-colour images.

The fake image tower embeds an image as its mean colour minus grey; the fake text tower embeds a
text as the colour of the first colour word in it. So "a photo of a red." and a red square have
cosine 1, and every zero-shot / retrieval answer is known in advance.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
CONTEXT = 96


class FakeTokenizer:
    """Texts -> (B, CONTEXT) byte ids, zero padded."""

    config = {"kind": "bytes", "context_length": CONTEXT}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), CONTEXT, dtype=torch.long)
        for row, text in enumerate(texts):
            data = text.encode()[:CONTEXT]
            out[row, : len(data)] = torch.tensor(list(data), dtype=torch.long)
        return out


class FakePreprocess:
    """PIL image -> (3, 4, 4) float tensor in [0, 1]."""

    config = {"size": 4}

    def __call__(self, image: Image.Image) -> torch.Tensor:
        array = np.asarray(image.convert("RGB").resize((4, 4)), dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def colour_vector(rgb: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32) / 255.0 - 0.5


class FakeColourModel(nn.Module):
    """Dual encoder whose image and text embeddings are colours seen through one shared projection."""

    def __init__(self, embed_dim: int = 3, seed: int = 0, text_noise: float = 0.0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        projection = (
            torch.eye(3, embed_dim) if embed_dim >= 3 else torch.randn(3, embed_dim, generator=generator)
        )
        if seed:
            projection = projection + 0.05 * torch.randn(3, embed_dim, generator=generator)
        self.projection = nn.Parameter(projection)  # (3, E)
        self.config = SimpleNamespace(embed_dim=embed_dim, logit_scale_max=math.log(100.0))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(100.0)))
        self.logit_bias = None
        self.text_noise = text_noise
        self.image_calls = 0
        self.text_calls = 0

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        self.image_calls += 1
        colour = pixels.float().mean(dim=(2, 3)) - 0.5  # (B, 3)
        out = colour @ self.projection
        return nn.functional.normalize(out, dim=-1) if normalize else out

    def encode_text(self, token_ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        self.text_calls += 1
        rows = []
        for ids in token_ids.tolist():
            text = bytes(i for i in ids if i).decode()
            found = [
                (text.find(word), word) for word in COLOURS if word in text.split() or f"{word}." in text
            ]
            found = [(position, word) for position, word in found if position >= 0]
            if found:
                rows.append(colour_vector(COLOURS[min(found)[1]]))
            else:  # no colour word: a fixed grey-ish direction
                rows.append(torch.tensor([0.1, 0.1, 0.1]))
        out = torch.stack(rows) @ self.projection
        if self.text_noise:
            generator = torch.Generator().manual_seed(len(token_ids))
            out = out + self.text_noise * torch.randn(out.shape, generator=generator)
        return nn.functional.normalize(out, dim=-1) if normalize else out


def fake_triple(seed: int = 0, embed_dim: int = 3):
    return FakeColourModel(embed_dim, seed), FakePreprocess(), FakeTokenizer()


def save_square(path: Path, rgb: tuple[int, int, int], size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), rgb).save(path)
    return path


def colour_folder(root: Path, colours: list[str], per_class: int = 3) -> Path:
    """ImageFolder of solid squares: root/<colour>/<i>.png, with slight shade changes per image."""
    for colour in colours:
        r, g, b = COLOURS[colour]
        for i in range(per_class):
            shade = (max(r - 8 * i, 0), max(g - 8 * i, 0), max(b - 8 * i, 0))
            save_square(root / colour / f"{i}.png", shade)
    return root


def test_fake_model_obeys_the_contract_and_matches_colours():
    model, preprocess, tokenizer = fake_triple()
    pixels = torch.stack([preprocess(Image.new("RGB", (8, 8), COLOURS[c])) for c in ("red", "blue")])
    images = model.encode_image(pixels, normalize=True)  # (2, E)
    texts = model.encode_text(tokenizer(["a photo of a red.", "a photo of a blue."]), normalize=True)
    assert images.shape == texts.shape == (2, 3)
    similarity = images @ texts.T  # red/blue: cosine -1/3 off the diagonal
    assert torch.allclose(similarity, torch.tensor([[1.0, -1 / 3], [-1 / 3, 1.0]]), atol=1e-6)
    assert model.logit_bias is None and float(model.logit_scale.detach().exp()) == pytest.approx(100.0)
