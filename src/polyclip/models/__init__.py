"""Architectures only: towers and the dual encoder, configured by dataclasses."""

from polyclip.models.architectures import (
    create_model,
    get_architecture,
    list_architectures,
    open_clip_architecture,
    siglip_text,
    siglip_vision,
)
from polyclip.models.config import (
    CLIP_EOT_ID,
    CLIP_SOT_ID,
    CLIP_VOCAB_SIZE,
    ConfigError,
    DualEncoderConfig,
    TextConfig,
    VisionConfig,
)
from polyclip.models.dual_encoder import DualEncoder, DualEncoderOutput

__all__ = [
    "CLIP_EOT_ID",
    "CLIP_SOT_ID",
    "CLIP_VOCAB_SIZE",
    "ConfigError",
    "DualEncoder",
    "DualEncoderConfig",
    "DualEncoderOutput",
    "TextConfig",
    "VisionConfig",
    "create_model",
    "get_architecture",
    "list_architectures",
    "open_clip_architecture",
    "siglip_text",
    "siglip_vision",
]
