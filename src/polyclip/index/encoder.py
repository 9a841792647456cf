"""An encoder bound to its identity: embeddings it produces carry the fingerprint of the model that made them.

An index refuses `QueryEmbeddings` whose fingerprint is not its own, so vectors of two models are never
compared by accident.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from polyclip.index.errors import ModelMismatchError
from polyclip.index.identity import ModelIdentity, weights_fingerprint


@dataclass(frozen=True)
class QueryEmbeddings:
    """L2-normalised query vectors (Q, E) float32 and the fingerprint of the encoder that produced them."""

    vectors: np.ndarray  # (Q, E)
    model_fingerprint: str

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2:
            raise ModelMismatchError(f"query vectors must be (Q, E), got shape {self.vectors.shape}")


def _source_name(name_or_path: str | os.PathLike) -> str:
    """Local paths are recorded absolute (so a later `index add` from another folder finds the model)."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else str(name_or_path)


class Encoder:
    """``polyclip.load`` output plus identity; the only way the index and the service embed anything."""

    def __init__(self, model, preprocess, tokenizer, source: str) -> None:
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        dtype = str(model.dtype).removeprefix("torch.")
        self.identity = ModelIdentity(
            source=source,
            weights_sha256=weights_fingerprint(model),
            embed_dim=int(model.config.embed_dim),
            preprocess=preprocess.config.to_dict(),
            tokenizer=dict(getattr(tokenizer, "config", {}) or {}),
            dtype=dtype,
        )

    @classmethod
    def load(
        cls,
        name_or_path: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> Encoder:
        import polyclip

        model, preprocess, tokenizer = polyclip.load(name_or_path, device=device, dtype=dtype)
        return cls(model, preprocess, tokenizer, _source_name(name_or_path))

    @property
    def fingerprint(self) -> str:
        return self.identity.fingerprint

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @torch.inference_mode()
    def text_vectors(self, texts: Sequence[str]) -> np.ndarray:
        """(N, E) float32, L2-normalised; one forward pass for the whole list."""
        if not texts:
            return np.zeros((0, self.identity.embed_dim), np.float32)
        tokens = self.tokenizer(list(texts))  # (N, L)
        return self.model.encode_text(tokens, normalize=True).float().cpu().numpy()

    @torch.inference_mode()
    def image_vectors(self, pixels: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) preprocessed pixels -> (B, E) float32, L2-normalised."""
        if len(pixels) == 0:
            return np.zeros((0, self.identity.embed_dim), np.float32)
        return self.model.encode_image(pixels, normalize=True).float().cpu().numpy()

    def encode_texts(self, texts: Sequence[str]) -> QueryEmbeddings:
        return QueryEmbeddings(self.text_vectors(texts), self.fingerprint)

    def encode_images(self, images: Sequence) -> QueryEmbeddings:
        """Images as paths, bytes or PIL images (decoded with the model's preprocessing)."""
        pixels = torch.stack([self.preprocess(image) for image in images])  # (B, 3, H, W)
        return QueryEmbeddings(self.image_vectors(pixels), self.fingerprint)
