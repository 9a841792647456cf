"""On-disk feature cache keyed by model identity and data content.

A cache key is a hash of: what was encoded (images, texts, zero-shot class weights), the model's
identity (its name and a hash of every state-dict tensor, so two checkpoints under one name never
collide), the preprocessing or tokenizer configuration, and the data (for image files: each path
with its size and modification time, or its bytes with ``content_fingerprint=True``; for texts:
the texts). Changing any of them changes the key, so stale features are never returned.

Entries are safetensors files written atomically (temporary file, then rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from polyclip.eval.data import ImageSet
from polyclip.eval.errors import EvalError
from polyclip.eval.features import EncodeConfig, EncodedImages, encode_images, evaluation_mode
from polyclip.eval.zero_shot import build_zero_shot_weights
from polyclip.zero_shot import encode_texts

CACHE_FORMAT_VERSION = "1"


def state_dict_fingerprint(model: torch.nn.Module) -> str:
    """Hash of every state-dict entry's name, dtype, shape and bytes."""
    digest = hashlib.blake2b(digest_size=20)
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def component_fingerprint(component) -> str:
    """Identity of a preprocess or tokenizer callable: its ``config`` if it has one, else its type.

    The model contract gives both a ``config``; a callable without one is identified by its class
    name only, so two differently configured instances of such a class would share cache entries.
    """
    config = getattr(component, "config", None)
    if config is None:
        return f"{type(component).__module__}.{type(component).__qualname__}"
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return json.dumps(config, sort_keys=True, default=repr)


def texts_fingerprint(texts: list[str]) -> str:
    digest = hashlib.blake2b(digest_size=20)
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\x00")
    return digest.hexdigest()


class FeatureCache:
    """A directory of safetensors entries named by their key."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise EvalError(f"cannot create the feature cache directory {self.directory}: {error}") from error

    @staticmethod
    def key(**parts: str) -> str:
        text = json.dumps({"version": CACHE_FORMAT_VERSION, **parts}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def load(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        from safetensors import SafetensorError, safe_open

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                return {name: handle.get_tensor(name) for name in handle.keys()}, dict(
                    handle.metadata() or {}
                )
        except (OSError, SafetensorError):
            return None  # a damaged entry is a miss; it is overwritten on save

    def save(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        from safetensors.torch import save_file

        descriptor, temporary = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        os.close(descriptor)
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, temporary, metadata=metadata)
            os.replace(temporary, self.path(key))
        except OSError as error:
            raise EvalError(f"cannot write to the feature cache {self.directory}: {error}") from error
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)


@dataclass
class ModelFeatures:
    """One model's image features, text features and zero-shot weights, cached when ``cache`` is set."""

    name: str
    model: torch.nn.Module
    preprocess: object
    tokenizer: object
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    cache: FeatureCache | None = None
    content_fingerprint: bool = False  # hash image bytes instead of path + size + mtime
    hits: int = 0  # entries read from the cache
    misses: int = 0  # entries computed (and stored when caching)
    _identity: str | None = None

    @property
    def identity(self) -> str:
        if self._identity is None:
            self._identity = f"{self.name}@{state_dict_fingerprint(self.model)}"
        return self._identity

    def _cached(self, parts: dict[str, str], compute):
        key = self.cache.key(model=self.identity, **parts) if self.cache else None
        if key is not None and (entry := self.cache.load(key)) is not None:
            self.hits += 1
            return entry
        self.misses += 1
        tensors, metadata = compute()
        if key is not None:
            self.cache.save(key, tensors, metadata)
        return tensors, metadata

    def images(self, images: ImageSet) -> EncodedImages:
        def compute():
            encoded = encode_images(self.model, self.preprocess, images, self.encode)
            tensors = {"features": encoded.features, "indices": torch.from_numpy(encoded.indices)}
            return tensors, {"skipped": json.dumps(encoded.skipped)}

        parts = {
            "kind": "images",
            "preprocess": component_fingerprint(self.preprocess),
            "data": images.fingerprint(content=self.content_fingerprint),
        }
        tensors, metadata = self._cached(parts, compute)
        skipped = [(int(i), str(reason)) for i, reason in json.loads(metadata.get("skipped", "[]"))]
        return EncodedImages(tensors["features"], tensors["indices"].numpy().astype(np.int64), skipped)

    def texts(self, texts: list[str]) -> torch.Tensor:
        """(N, E) float32 unnormalised text embeddings (the core's length-sorted batching)."""
        if not texts:
            raise EvalError("no texts to encode")

        def compute():
            with evaluation_mode(self.model):
                features = encode_texts(
                    self.model, self.tokenizer, texts, self.encode.text_batch_size, normalize=False,
                    progress=self.encode.progress,
                )  # fmt: skip
            return {"features": features.float().clone()}, {}

        parts = {
            "kind": "texts",
            "tokenizer": component_fingerprint(self.tokenizer),
            "data": texts_fingerprint(texts),
        }
        return self._cached(parts, compute)[0]["features"]

    def class_weights(self, class_names: list[str], templates: list[str]) -> torch.Tensor:
        """(C, E) template-ensembled zero-shot weights (see ``zero_shot.build_zero_shot_weights``)."""

        def compute():
            weights = build_zero_shot_weights(
                self.model, self.tokenizer, class_names, templates, self.encode.text_batch_size
            )
            return {"weights": weights}, {}

        parts = {
            "kind": "zero_shot_weights",
            "tokenizer": component_fingerprint(self.tokenizer),
            "data": texts_fingerprint([*class_names, "\x01", *templates]),
        }
        return self._cached(parts, compute)[0]["weights"]
