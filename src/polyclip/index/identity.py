"""What an index records about the encoder it was built with, and how two encoders are compared.

The weights fingerprint is a SHA-256 over the state dict (sorted names, shapes, values). Floating
tensors are rounded to bfloat16 before hashing, so the same checkpoint loaded in float32 or bfloat16
gives the same fingerprint while any real change of weights (another checkpoint, a fine-tune) gives
another one. Loading in float16 rounds twice and may give a different fingerprint: build and serve in
the same dtype (the index records it, and the service loads that dtype by default).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from polyclip.index.errors import ModelMismatchError


@torch.inference_mode()
def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 hex digest of the model's tensors, independent of fp32/bf16 loading and of the device."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not isinstance(tensor, torch.Tensor):
            continue
        if tensor.is_quantized:
            tensor = tensor.dequantize()
        if tensor.is_floating_point():
            tensor = tensor.to(torch.bfloat16).view(torch.int16)  # hash the bf16 bit patterns
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\n".encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelIdentity:
    """The encoder an index belongs to. ``fingerprint`` decides compatibility; ``source`` is for loading."""

    source: str  # registry name, hf-hub:org/repo, or the absolute path the model was loaded from
    weights_sha256: str
    embed_dim: int
    preprocess: dict[str, Any] = field(default_factory=dict)  # PreprocessConfig.to_dict()
    tokenizer: dict[str, Any] = field(default_factory=dict)  # tokenizer.config
    dtype: str = "float32"  # what the index was built with; the service loads the same by default

    @property
    def fingerprint(self) -> str:
        """Hash of everything that changes the vectors: weights, dimension, preprocessing, tokenizer.

        The one model identity shown everywhere: ``index info``, the service's /health, and the
        refusal of another model by ``index build`` / ``add`` / search.
        """
        payload = {
            "weights": self.weights_sha256,
            "embed_dim": self.embed_dim,
            "preprocess": self.preprocess,
            "tokenizer": self.tokenizer,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelIdentity:
        known = {"source", "weights_sha256", "embed_dim", "preprocess", "tokenizer", "dtype"}
        return cls(**{key: value for key, value in data.items() if key in known})

    def differences(self, other: ModelIdentity) -> list[str]:
        """Human-readable list of what differs in ``other`` (empty when the fingerprints agree)."""
        diffs = []
        if self.weights_sha256 != other.weights_sha256:
            diffs.append("weights differ")
        if self.embed_dim != other.embed_dim:
            diffs.append(f"embedding size differs (index: {self.embed_dim}, model: {other.embed_dim})")
        if self.preprocess != other.preprocess:
            diffs.append(f"preprocessing differs ({_changed(self.preprocess, other.preprocess)})")
        if self.tokenizer != other.tokenizer:
            diffs.append(f"tokenizer differs ({_changed(self.tokenizer, other.tokenizer)})")
        return diffs

    def check_compatible(self, other: ModelIdentity, what: str = "this model") -> None:
        diffs = self.differences(other)
        if diffs:
            raise ModelMismatchError(
                f"the index was built with {self.source!r} (fingerprint {self.fingerprint}) and refuses "
                f"{what} ({other.source!r}, fingerprint {other.fingerprint}): "
                + "; ".join(diffs)
                + ". Use the index's own model, or build a new index with this one."
            )


def _changed(index: dict[str, Any], model: dict[str, Any]) -> str:
    """'image_size: index 32, model 224; mean: ...' for the keys whose values differ."""
    keys = sorted(set(index) | set(model), key=str)
    parts = [
        f"{key}: index {json.dumps(index.get(key), default=str)}, model {json.dumps(model.get(key), default=str)}"
        for key in keys
        if index.get(key) != model.get(key)
    ]
    return "; ".join(parts)
