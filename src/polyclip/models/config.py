"""Typed configurations of the towers and of the dual encoder.

JSON is only how a config is saved: ``to_dict``/``from_dict`` round-trip and reject unknown keys.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration is malformed: unknown keys, wrong values."""


def _from_dict(cls, data: dict[str, Any], where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; allowed: {sorted(known)}")
    return cls(**data)


@dataclass
class VisionConfig:
    kind: str = "vit"  # "vit" (vision transformer) or "resnet" (OpenAI's ModifiedResNet)
    image_size: int = 224
    # ViT
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    act: str = "quick_gelu"  # OpenAI weights: quick_gelu; open_clip/LAION: gelu; HF SigLIP: gelu_tanh
    norm_eps: float = 1e-5  # CLIP 1e-5, SigLIP 1e-6
    pool: str = "cls"  # "cls": LN on the class token (CLIP); "map": attention-pooling head (SigLIP)
    class_token: bool = True
    pre_norm: bool = True  # CLIP's ln_pre; SigLIP has none
    patch_bias: bool = False  # CLIP's conv has no bias; SigLIP's has one
    projection: bool = True  # a bias-free projection to embed_dim (CLIP); SigLIP outputs its width
    # ModifiedResNet: blocks per stage and stem width (heads = width * 32 // 64, as OpenAI)
    resnet_layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    resnet_width: int = 64

    def __post_init__(self) -> None:
        if self.kind not in ("vit", "resnet"):
            raise ConfigError(f"vision kind must be 'vit' or 'resnet', got {self.kind!r}")
        if self.pool not in ("cls", "map"):
            raise ConfigError(f"vision pool must be 'cls' or 'map', got {self.pool!r}")
        if self.pool == "cls" and not self.class_token and self.kind == "vit":
            raise ConfigError("pool='cls' needs class_token=True")
        self.resnet_layers = tuple(self.resnet_layers)
        if self.kind == "vit" and self.image_size % self.patch_size:
            raise ConfigError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class TextConfig:
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    act: str = "quick_gelu"
    norm_eps: float = 1e-5
    causal: bool = True  # CLIP's text tower is causal; SigLIP's is bidirectional
    # "argmax": the position of the highest token id, i.e. CLIP's end token (OpenAI, open_clip);
    # "eos": the first position of eos_token_id (transformers' CLIP with a modern config);
    # "last": the last position (SigLIP pads with its end token to a fixed length)
    pool: str = "argmax"
    eos_token_id: int = 49407
    projection: bool = True
    projection_bias: bool = False  # SigLIP's text head has a bias

    def __post_init__(self) -> None:
        if self.pool not in ("argmax", "eos", "last"):
            raise ConfigError(f"text pool must be 'argmax', 'eos' or 'last', got {self.pool!r}")


@dataclass
class DualEncoderConfig:
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    init_logit_scale: float = math.log(1 / 0.07)  # CLIP; SigLIP uses log(10)
    init_logit_bias: float | None = None  # None: softmax model with no bias; SigLIP: -10
    logit_scale_max: float = math.log(100)  # the stored log value is clamped here in forward

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = _from_dict(VisionConfig, self.vision, "vision config")
        if isinstance(self.text, dict):
            self.text = _from_dict(TextConfig, self.text, "text config")
        if not self.vision.projection and self.vision.kind == "vit" and self.vision.width != self.embed_dim:
            raise ConfigError(
                f"vision tower without projection has width {self.vision.width} != embed_dim {self.embed_dim}"
            )
        if not self.text.projection and self.text.width != self.embed_dim:
            raise ConfigError(
                f"text tower without projection has width {self.text.width} != embed_dim {self.embed_dim}"
            )

    @property
    def uses_sigmoid(self) -> bool:
        return self.init_logit_bias is not None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["vision"]["resnet_layers"] = list(self.vision.resnet_layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DualEncoderConfig:
        return _from_dict(cls, dict(data), "model config")
