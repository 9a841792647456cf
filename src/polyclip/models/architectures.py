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


def _clip_vit(
    *,
    image_size: int,
    patch_size: int,
    width: int,
    layers: int,
    heads: int,
    embed_dim: int,
    text_width: int,
    text_heads: int,
    act: str = "quick_gelu",
) -> DualEncoderConfig:
    """OpenAI CLIP's ViT (clip/model.py): MLP 4x wide, a 12-layer causal text tower."""
    return DualEncoderConfig(
        embed_dim=embed_dim,
        vision=VisionConfig(
            image_size=image_size, patch_size=patch_size, width=width, layers=layers, heads=heads,
            mlp_dim=4 * width, act=act,
        ),
        text=TextConfig(width=text_width, heads=text_heads, mlp_dim=4 * text_width, act=act),
    )  # fmt: skip


def _clip_resnet(
    *,
    image_size: int,
    stage_blocks: tuple[int, ...],
    width: int,
    embed_dim: int,
    text_width: int,
    text_heads: int,
) -> DualEncoderConfig:
    """OpenAI CLIP's ModifiedResNet image tower with its causal text tower."""
    return DualEncoderConfig(
        embed_dim=embed_dim,
        vision=VisionConfig(
            kind="resnet", image_size=image_size, resnet_layers=stage_blocks, resnet_width=width
        ),
        text=TextConfig(width=text_width, heads=text_heads, mlp_dim=4 * text_width),
    )


def siglip_vision(
    *,
    kind: str = "vit",
    image_size: int,
    patch_size: int,
    width: int,
    layers: int,
    heads: int,
    mlp_dim: int,
    act: str = "gelu_tanh",
    norm_eps: float = 1e-6,
    projection: bool = False,
) -> VisionConfig:
    """SigLIP's image tower (big_vision; transformers' SiglipVisionModel; timm's ``vit_*_siglip_*``): no class
    token, no pre-norm, a patch-embedding bias, LayerNorm eps 1e-6, a MAP head (attention-pool) and, except
    for open_clip's ``timm_proj="linear"``, no projection after it. The one home of these settings.
    ``kind="naflex"``: SigLIP 2's NaFlex tower (image_size is then the side of its position grid in pixels)."""
    return VisionConfig(
        kind=kind, image_size=image_size, patch_size=patch_size, width=width, layers=layers, heads=heads,
        mlp_dim=mlp_dim, act=act, norm_eps=norm_eps, pool="map", class_token=False, pre_norm=False,
        patch_bias=True, projection=projection,
    )  # fmt: skip


def siglip_text(
    *,
    vocab_size: int = 32000,
    context_length: int = 64,
    width: int,
    layers: int,
    heads: int,
    mlp_dim: int,
    act: str = "gelu_tanh",
    norm_eps: float = 1e-6,
    eos_token_id: int = 1,
) -> TextConfig:
    """SigLIP's text tower: bidirectional, pooled at the last position (text padded with its end token to
    a fixed length), a linear head with bias, LayerNorm eps 1e-6."""
    return TextConfig(
        vocab_size=vocab_size, context_length=context_length, width=width, layers=layers, heads=heads,
        mlp_dim=mlp_dim, act=act, norm_eps=norm_eps, causal=False, pool="last", eos_token_id=eos_token_id,
        projection=True, projection_bias=True,
    )  # fmt: skip


def _siglip(
    *,
    image_size: int,
    patch_size: int,
    width: int,
    layers: int,
    heads: int,
    mlp_dim: int,
    act: str = "gelu_tanh",
) -> DualEncoderConfig:
    tower = dict(width=width, layers=layers, heads=heads, mlp_dim=mlp_dim, act=act)
    return DualEncoderConfig(
        embed_dim=width,
        vision=siglip_vision(image_size=image_size, patch_size=patch_size, **tower),
        text=siglip_text(**tower),
        init_logit_scale=math.log(10.0),
        init_logit_bias=-10.0,
    )


# SigLIP 2 (Tschannen et al. 2025; transformers' google/siglip2-* configs, open_clip's *-SigLIP2 configs):
# SigLIP's towers with Gemma's 256k vocabulary; the text tower has the image tower's sizes, except for the
# giant-opt model, whose so400m-sized text tower projects to the image width.
SIGLIP2_VOCAB_SIZE = 256_000
_SIGLIP2_TOWERS = {
    "B": dict(width=768, layers=12, heads=12, mlp_dim=3072),
    "L": dict(width=1024, layers=24, heads=16, mlp_dim=4096),
    "SO400M": dict(width=1152, layers=27, heads=16, mlp_dim=4304),
    "gopt": dict(width=1536, layers=40, heads=16, mlp_dim=6144),
}


def _siglip2(size: str, *, image_size: int, patch_size: int, kind: str = "vit") -> DualEncoderConfig:
    vision = _SIGLIP2_TOWERS[size]
    text = _SIGLIP2_TOWERS["SO400M" if size == "gopt" else size]
    return DualEncoderConfig(
        embed_dim=vision["width"],
        vision=siglip_vision(kind=kind, image_size=image_size, patch_size=patch_size, **vision),
        text=siglip_text(vocab_size=SIGLIP2_VOCAB_SIZE, **text),
        init_logit_scale=math.log(10.0),
        init_logit_bias=-10.0,
    )


# name -> (tower size, patch, image size); the NaFlex ones: the position grid (16 x 16 patches)
SIGLIP2_ARCHITECTURES = {
    "ViT-B-16-SigLIP2": ("B", 16, 224), "ViT-B-16-SigLIP2-256": ("B", 16, 256),
    "ViT-B-16-SigLIP2-384": ("B", 16, 384), "ViT-B-16-SigLIP2-512": ("B", 16, 512),
    "ViT-L-16-SigLIP2-256": ("L", 16, 256), "ViT-L-16-SigLIP2-384": ("L", 16, 384),
    "ViT-L-16-SigLIP2-512": ("L", 16, 512), "ViT-SO400M-14-SigLIP2": ("SO400M", 14, 224),
    "ViT-SO400M-16-SigLIP2-256": ("SO400M", 16, 256), "ViT-SO400M-16-SigLIP2-384": ("SO400M", 16, 384),
    "ViT-SO400M-16-SigLIP2-512": ("SO400M", 16, 512), "ViT-gopt-16-SigLIP2-256": ("gopt", 16, 256),
    "ViT-gopt-16-SigLIP2-384": ("gopt", 16, 384), "ViT-SO400M-14-SigLIP2-384": ("SO400M", 14, 384),
    "ViT-SO400M-14-SigLIP2-378": ("SO400M", 14, 378),
}  # fmt: skip
SIGLIP2_NAFLEX_ARCHITECTURES = {"ViT-B-16-SigLIP2-naflex": "B", "ViT-SO400M-16-SigLIP2-naflex": "SO400M"}
for _name, (_size, _patch, _image) in SIGLIP2_ARCHITECTURES.items():
    register_architecture(_name)(
        lambda size=_size, patch=_patch, image=_image: _siglip2(size, image_size=image, patch_size=patch)
    )
for _name, _size in SIGLIP2_NAFLEX_ARCHITECTURES.items():
    register_architecture(_name)(
        lambda size=_size: _siglip2(size, image_size=256, patch_size=16, kind="naflex")
    )

# fmt: off
_B = dict(width=768, layers=12, heads=12, embed_dim=512, text_width=512, text_heads=8)
_L = dict(width=1024, layers=24, heads=16, embed_dim=768, text_width=768, text_heads=12)
register_architecture("ViT-B-32")(lambda: _clip_vit(image_size=224, patch_size=32, **_B))
register_architecture("ViT-B-16")(lambda: _clip_vit(image_size=224, patch_size=16, **_B))
register_architecture("ViT-L-14")(lambda: _clip_vit(image_size=224, patch_size=14, **_L))
register_architecture("ViT-L-14-336")(lambda: _clip_vit(image_size=336, patch_size=14, **_L))
# LAION/open_clip ViT-B-32 (FashionCLIP 2.0 starts from it) and BioCLIP's ViT-B-16 use exact GELU
register_architecture("ViT-B-32-gelu")(lambda: _clip_vit(image_size=224, patch_size=32, **_B, act="gelu"))
register_architecture("ViT-B-16-gelu")(lambda: _clip_vit(image_size=224, patch_size=16, **_B, act="gelu"))
register_architecture("ViT-L-14-gelu")(lambda: _clip_vit(image_size=224, patch_size=14, **_L, act="gelu"))
register_architecture("RN50")(lambda: _clip_resnet(
    image_size=224, stage_blocks=(3, 4, 6, 3), width=64, embed_dim=1024, text_width=512, text_heads=8))
register_architecture("RN101")(lambda: _clip_resnet(
    image_size=224, stage_blocks=(3, 4, 23, 3), width=64, embed_dim=512, text_width=512, text_heads=8))
register_architecture("RN50x4")(lambda: _clip_resnet(
    image_size=288, stage_blocks=(4, 6, 10, 6), width=80, embed_dim=640, text_width=640, text_heads=10))
register_architecture("RN50x16")(lambda: _clip_resnet(
    image_size=384, stage_blocks=(6, 8, 18, 8), width=96, embed_dim=768, text_width=768, text_heads=12))
register_architecture("RN50x64")(lambda: _clip_resnet(
    image_size=448, stage_blocks=(3, 15, 36, 10), width=128, embed_dim=1024, text_width=1024, text_heads=16))
# transformers' SigLIP uses tanh GELU; open_clip's timm trunk uses exact GELU
_SIGLIP_B = dict(patch_size=16, width=768, layers=12, heads=12, mlp_dim=3072)
register_architecture("ViT-B-16-SigLIP")(lambda: _siglip(image_size=224, **_SIGLIP_B))
register_architecture("ViT-B-16-SigLIP-gelu")(lambda: _siglip(image_size=224, **_SIGLIP_B, act="gelu"))
register_architecture("ViT-L-16-SigLIP-256")(lambda: _siglip(
    image_size=256, patch_size=16, width=1024, layers=24, heads=16, mlp_dim=4096))
# the shape-optimised 400M tower (Alabdulmohsin et al. 2023); patches of 14 over 384 px: a 27 x 27 grid
register_architecture("ViT-SO400M-14-SigLIP-384")(lambda: _siglip(
    image_size=384, patch_size=14, width=1152, layers=27, heads=16, mlp_dim=4304))
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
register_architecture("tiny-siglip")(lambda: _siglip(image_size=32, patch_size=8, width=64, layers=2, heads=4,
                                                     mlp_dim=128))
# fmt: on


# open_clip's model_configs name OpenAI's QuickGELU models "<name>-quickgelu" and use "<name>" for the same
# sizes with exact GELU (open_clip's own LAION/DataComp training). polyclip's own names above follow
# OpenAI's meaning ("ViT-B-32" is QuickGELU); `open_clip_architecture` reads open_clip's.
OPEN_CLIP_GELU_OF = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "RN50", "RN101", "RN50x4", "RN50x16",
                      "RN50x64")  # fmt: skip
_OPEN_CLIP_SIGLIP = {"ViT-B-16-SigLIP": "ViT-B-16-SigLIP-gelu"}  # open_clip's timm trunk: exact GELU
# open_clip families polyclip has no implementation of, by a pattern of their model names
UNSUPPORTED_OPEN_CLIP_FAMILIES = {
    r"eva": "EVA01/EVA02 trunks",
    r"coca": "CoCa (a captioning decoder on top of CLIP)",
    r"convnext": "ConvNeXt image towers",
    r"vitamin": "ViTamin image towers",
    r"mobileclip|fastvit|mci": "MobileCLIP (FastViT / MCi) towers",
    r"roberta|xlm|mt5|nllb|bert": "Hugging Face text towers",
}


def open_clip_architecture(name: str) -> DualEncoderConfig:
    """The config open_clip's architecture ``name`` describes (``ViT-B-32`` is GELU there, ``ViT-B-32-quickgelu``
    OpenAI's QuickGELU); polyclip's own names (``ViT-B-32-gelu``, ``tiny-vit``...) are accepted too."""
    import re

    base = name.removesuffix("-quickgelu")
    if name.endswith("-quickgelu") and base in OPEN_CLIP_GELU_OF:
        return get_architecture(base)
    if name in OPEN_CLIP_GELU_OF:
        config = get_architecture(name)
        config.text.act = "gelu"
        if config.vision.kind == "vit":
            config.vision.act = "gelu"
        return config
    if name in _OPEN_CLIP_SIGLIP:
        return get_architecture(_OPEN_CLIP_SIGLIP[name])
    if name in SIGLIP2_ARCHITECTURES:  # open_clip's timm trunk: exact GELU (its text tower: tanh GELU)
        config = get_architecture(name)
        config.vision.act = "gelu"
        return config
    if name in _ARCHITECTURES:
        return get_architecture(name)
    for pattern, family in UNSUPPORTED_OPEN_CLIP_FAMILIES.items():
        if re.search(pattern, name.lower()):
            raise ConfigError(f"open_clip architecture {name!r}: {family} are not supported by polyclip")
    known = [*OPEN_CLIP_GELU_OF, *(f"{n}-quickgelu" for n in OPEN_CLIP_GELU_OF), *_OPEN_CLIP_SIGLIP,
             *SIGLIP2_ARCHITECTURES]  # fmt: skip
    raise ConfigError(f"unknown architecture {name!r}; open_clip names polyclip reads: {', '.join(known)}")


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
