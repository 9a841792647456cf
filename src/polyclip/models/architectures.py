"""Named architectures (configurations only, no weights): ``create_model("ViT-B-32")``.

Released weights are separate entries in ``registry.toml``; each names one of these architectures.
Sizes follow OpenAI's ``clip/model.py`` and open_clip's ``model_configs``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from polyclip.models.config import ConfigError, DualEncoderConfig, TextConfig, VisionConfig
from polyclip.models.dual_encoder import DualEncoder

_ARCHITECTURES: dict[str, Callable[[], DualEncoderConfig]] = {}


def register_architecture(name: str):
    def wrap(fn: Callable[[], DualEncoderConfig]):
        _ARCHITECTURES[name] = fn
        return fn

    return wrap


def _clip_vit(image_size, patch, width, layers, heads, embed, text_width, text_heads, act="quick_gelu"):
    return DualEncoderConfig(
        embed_dim=embed,
        vision=VisionConfig(
            image_size=image_size,
            patch_size=patch,
            width=width,
            layers=layers,
            heads=heads,
            mlp_dim=4 * width,
            act=act,
        ),
        text=TextConfig(width=text_width, heads=text_heads, mlp_dim=4 * text_width, act=act),
    )


def _clip_resnet(image_size, stage_blocks, width, embed, text_width, text_heads):
    return DualEncoderConfig(
        embed_dim=embed,
        vision=VisionConfig(
            kind="resnet", image_size=image_size, resnet_layers=stage_blocks, resnet_width=width
        ),
        text=TextConfig(width=text_width, heads=text_heads, mlp_dim=4 * text_width),
    )


def _siglip(image_size, patch, width, layers, heads, mlp_dim, act="gelu_tanh", vocab=32000, context=64):
    return DualEncoderConfig(
        embed_dim=width,
        vision=VisionConfig(
            image_size=image_size,
            patch_size=patch,
            width=width,
            layers=layers,
            heads=heads,
            mlp_dim=mlp_dim,
            act=act,
            norm_eps=1e-6,
            pool="map",
            class_token=False,
            pre_norm=False,
            patch_bias=True,
            projection=False,
        ),
        text=TextConfig(
            vocab_size=vocab,
            context_length=context,
            width=width,
            layers=layers,
            heads=heads,
            mlp_dim=mlp_dim,
            act=act,
            norm_eps=1e-6,
            causal=False,
            pool="last",
            eos_token_id=1,
            projection=True,
            projection_bias=True,
        ),
        init_logit_scale=math.log(10.0),
        init_logit_bias=-10.0,
    )


# fmt: off
register_architecture("ViT-B-32")(lambda: _clip_vit(224, 32, 768, 12, 12, 512, 512, 8))
register_architecture("ViT-B-16")(lambda: _clip_vit(224, 16, 768, 12, 12, 512, 512, 8))
register_architecture("ViT-L-14")(lambda: _clip_vit(224, 14, 1024, 24, 16, 768, 768, 12))
register_architecture("ViT-L-14-336")(lambda: _clip_vit(336, 14, 1024, 24, 16, 768, 768, 12))
# LAION/open_clip ViT-B-32 (FashionCLIP 2.0 starts from it) and BioCLIP's ViT-B-16 use exact GELU
register_architecture("ViT-B-32-gelu")(lambda: _clip_vit(224, 32, 768, 12, 12, 512, 512, 8, act="gelu"))
register_architecture("ViT-B-16-gelu")(lambda: _clip_vit(224, 16, 768, 12, 12, 512, 512, 8, act="gelu"))
register_architecture("ViT-L-14-gelu")(lambda: _clip_vit(224, 14, 1024, 24, 16, 768, 768, 12, act="gelu"))
register_architecture("RN50")(lambda: _clip_resnet(224, (3, 4, 6, 3), 64, 1024, 512, 8))
register_architecture("RN101")(lambda: _clip_resnet(224, (3, 4, 23, 3), 64, 512, 512, 8))
register_architecture("RN50x4")(lambda: _clip_resnet(288, (4, 6, 10, 6), 80, 640, 640, 10))
register_architecture("RN50x16")(lambda: _clip_resnet(384, (6, 8, 18, 8), 96, 768, 768, 12))
register_architecture("RN50x64")(lambda: _clip_resnet(448, (3, 15, 36, 10), 128, 1024, 1024, 16))
# transformers' SigLIP uses tanh GELU; open_clip's timm trunk uses exact GELU
register_architecture("ViT-B-16-SigLIP")(lambda: _siglip(224, 16, 768, 12, 12, 3072))
register_architecture("ViT-B-16-SigLIP-gelu")(lambda: _siglip(224, 16, 768, 12, 12, 3072, act="gelu"))
register_architecture("ViT-L-16-SigLIP-256")(lambda: _siglip(256, 16, 1024, 24, 16, 4096))
# Tiny configurations for tests and the offline demo
register_architecture("tiny-vit")(lambda: DualEncoderConfig(
    embed_dim=32,
    vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_dim=128),
    text=TextConfig(context_length=77, width=48, layers=2, heads=4, mlp_dim=96),
))
register_architecture("tiny-resnet")(lambda: DualEncoderConfig(
    embed_dim=32,
    vision=VisionConfig(kind="resnet", image_size=64, resnet_layers=(1, 1, 1, 1), resnet_width=8),
    text=TextConfig(context_length=77, width=48, layers=2, heads=4, mlp_dim=96),
))
register_architecture("tiny-siglip")(lambda: _siglip(32, 8, 64, 2, 4, 128))
# fmt: on


def list_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def get_architecture(name: str) -> DualEncoderConfig:
    if name not in _ARCHITECTURES:
        raise ConfigError(f"unknown architecture {name!r}; known: {', '.join(list_architectures())}")
    return _ARCHITECTURES[name]()


def create_model(arch: str | DualEncoderConfig | dict) -> DualEncoder:
    """A randomly initialised dual encoder from an architecture name or a config."""
    if isinstance(arch, str):
        config = get_architecture(arch)
    elif isinstance(arch, dict):
        config = DualEncoderConfig.from_dict(arch)
    else:
        config = arch
    return DualEncoder(config)
