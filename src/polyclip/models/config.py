"""Typed configurations of the towers and of the dual encoder, validated where they are made.

JSON is only how a config is saved: ``to_dict``/``from_dict`` round-trip and reject unknown keys.
Every reader of a checkpoint's config (transformers ``config.json``, ``open_clip_config.json``,
``polyclip_config.json``, the shapes of an OpenAI state dict) ends in these constructors, so their
checks are the one place where a config is judged: types, ranges, divisibility, and a parameter count
computed from the config alone, before any module is built, so that an absurd config (a width of -5,
ten million layers) is refused at once instead of building for minutes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from polyclip.layers import ACTIVATIONS


class ConfigError(ValueError):
    """A configuration is malformed: unknown keys, wrong values."""


# Bounds of the validation. Generous: the largest released CLIP-family models (ViT-bigG: 1,664 wide,
# 48 layers, 2.5B parameters; EVA-CLIP-18B; SigLIP's 256k vocabulary) sit far inside them. They exist so
# that a hostile or corrupt config fails with a message instead of exhausting memory or time.
MAX_PARAMETERS = 50_000_000_000  # 200 GB in fp32
MAX_WIDTH = 65_536
MAX_LAYERS = 1_024
MAX_MLP_DIM = 262_144
MAX_IMAGE_SIZE = 16_384
MAX_IMAGE_TOKENS = 262_144  # patches per image (a 8192 px image in 16 px patches)
MAX_VOCAB = 16_777_216
MAX_CONTEXT = 65_536
MAX_RESNET_BLOCKS = 256  # per stage
MAX_RESNET_WIDTH = 4_096


def _from_dict(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known, key=str)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; allowed: {sorted(known)}")
    return cls(**data)


def _int(value: Any, name: str, low: int, high: int) -> int:
    # bool is an int in Python, but `"layers": true` is a mistake, not 1
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low:,} and {high:,}, got {value:,}")
    return value


def _float(value: Any, name: str, low: float = -math.inf, high: float = math.inf, open_low=False) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or value > high or value < low or (open_low and value == low):
        bound = f"> {low}" if open_low else f">= {low}"
        raise ConfigError(f"{name} must be a finite number {bound} and <= {high}, got {value!r}")
    return float(value)


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r} ({type(value).__name__})")
    return value


def _choice(value: Any, name: str, choices) -> Any:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value


def _check_transformer(config, where: str) -> None:
    """The fields a ViT image tower and a text tower share."""
    _int(config.width, f"{where}.width", 1, MAX_WIDTH)
    _int(config.layers, f"{where}.layers", 0, MAX_LAYERS)
    _int(config.heads, f"{where}.heads", 1, config.width)
    if config.width % config.heads:
        raise ConfigError(f"{where}.width {config.width} is not divisible by its {config.heads} heads")
    _int(config.mlp_dim, f"{where}.mlp_dim", 1, MAX_MLP_DIM)
    _choice(config.act, f"{where}.act", ACTIVATIONS)
    _float(config.norm_eps, f"{where}.norm_eps", 0.0, 1.0, open_low=True)


def _block_parameters(width: int, mlp_dim: int) -> int:
    """One pre-norm transformer block: two LayerNorms, fused qkv + out projection, a two-layer MLP."""
    return (
        4 * width
        + (3 * width * width + 3 * width)
        + (width * width + width)
        + 2 * width * mlp_dim
        + mlp_dim
        + width
    )


@dataclass
class VisionConfig:
    # "vit" (vision transformer), "resnet" (OpenAI's ModifiedResNet) or "naflex" (SigLIP 2's NaFlex ViT:
    # patches of any grid up to the preprocessing's max_num_patches; image_size is then the side of the
    # learned position grid in pixels, grid_size**2 positions resized to each image's grid)
    kind: str = "vit"
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
        _choice(self.kind, "vision.kind", ("vit", "resnet", "naflex"))
        _choice(self.pool, "vision.pool", ("cls", "map"))
        for name in ("class_token", "pre_norm", "patch_bias", "projection"):
            _bool(getattr(self, name), f"vision.{name}")
        if self.pool == "cls" and not self.class_token and self.kind == "vit":
            raise ConfigError("pool='cls' needs class_token=True")
        _int(self.image_size, "vision.image_size", 1, MAX_IMAGE_SIZE)
        _int(self.patch_size, "vision.patch_size", 1, MAX_IMAGE_SIZE)
        if not isinstance(self.resnet_layers, list | tuple) or len(self.resnet_layers) != 4:
            raise ConfigError(f"vision.resnet_layers must be 4 block counts, got {self.resnet_layers!r}")
        self.resnet_layers = tuple(self.resnet_layers)
        for stage, blocks in enumerate(self.resnet_layers):
            _int(blocks, f"vision.resnet_layers[{stage}]", 1, MAX_RESNET_BLOCKS)
        _int(self.resnet_width, "vision.resnet_width", 2, MAX_RESNET_WIDTH)
        if self.kind == "naflex" and (self.pool != "map" or self.class_token or self.pre_norm):
            raise ConfigError("a NaFlex image tower is SigLIP 2's: pool='map', no class token, no pre-norm")
        if self.kind in ("vit", "naflex"):
            _check_transformer(self, "vision")
            # A ViT's strided patch convolution leaves out the last image_size % patch_size rows and
            # columns, as transformers' and timm's do: SigLIP's so400m-patch14-384 sees 27 x 27 patches
            # (378 of its 384 px). NaFlex images are resized to whole patches by their preprocessing.
            if self.image_size < self.patch_size:
                raise ConfigError(f"image_size {self.image_size} is smaller than patch_size {self.patch_size}")
            if self.kind == "naflex" and self.image_size % self.patch_size:
                raise ConfigError(
                    f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
                )
            if self.grid_size**2 > MAX_IMAGE_TOKENS:
                raise ConfigError(
                    f"image_size {self.image_size} in patches of {self.patch_size} makes {self.grid_size**2:,} "
                    f"tokens per image; the limit is {MAX_IMAGE_TOKENS:,}"
                )
        else:
            # the stem halves the width; the stride-32 trunk ends in a grid the attention pool embeds
            if self.resnet_width % 2:
                raise ConfigError(f"vision.resnet_width must be even, got {self.resnet_width}")
            if self.image_size % 32:
                raise ConfigError(f"a ResNet image_size must be a multiple of 32, got {self.image_size}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    def parameter_count(self, embed_dim: int) -> int:
        """Parameters of the tower (BatchNorm statistics not counted), from the config alone."""
        if self.kind == "resnet":
            return _resnet_parameters(self, embed_dim)
        width, tokens = self.width, self.grid_size**2 + int(self.class_token)
        count = 3 * self.patch_size**2 * width + width * int(self.patch_bias) + tokens * width
        count += width * int(self.class_token) + 2 * width * int(self.pre_norm) + 2 * width
        count += self.layers * _block_parameters(width, self.mlp_dim)
        if self.pool == "map":  # probe, q, kv, proj, norm, MLP
            count += (
                width
                + 4 * width * width
                + 4 * width
                + 2 * width
                + 2 * width * self.mlp_dim
                + self.mlp_dim
                + width
            )
        return count + width * embed_dim * int(self.projection)


def _resnet_parameters(config: VisionConfig, embed_dim: int) -> int:
    width = config.resnet_width
    half = width // 2
    count = 9 * (3 * half + half * half + half * width) + 2 * (half + half + width)  # stem convs + BNs
    in_planes = width
    for index, blocks in enumerate(config.resnet_layers):
        planes = width * 2**index
        for block in range(blocks):
            source = in_planes if block == 0 else 4 * planes
            count += (
                source * planes + 9 * planes * planes + 4 * planes * planes + 2 * 6 * planes
            )  # convs + BNs
            if block == 0:
                count += in_planes * 4 * planes + 2 * 4 * planes  # downsample conv + BN
        in_planes = 4 * planes
    features = 32 * width
    grid = config.image_size // 32
    count += (grid * grid + 1) * features + 3 * (features * features + features)  # attention pool
    return count + features * embed_dim + embed_dim


# OpenAI CLIP's byte-level BPE (clip/simple_tokenizer.py): 49408 tokens, the last two being the start
# and end tokens. The one home of these ids; tokenizers and checkpoint readers import them.
CLIP_VOCAB_SIZE = 49408
CLIP_SOT_ID = 49406
CLIP_EOT_ID = 49407


@dataclass
class TextConfig:
    vocab_size: int = CLIP_VOCAB_SIZE
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
    eos_token_id: int = CLIP_EOT_ID
    projection: bool = True
    projection_bias: bool = False  # SigLIP's text head has a bias

    def __post_init__(self) -> None:
        _choice(self.pool, "text.pool", ("argmax", "eos", "last"))
        _int(self.vocab_size, "text.vocab_size", 1, MAX_VOCAB)
        _int(self.context_length, "text.context_length", 1, MAX_CONTEXT)
        _check_transformer(self, "text")
        for name in ("causal", "projection", "projection_bias"):
            _bool(getattr(self, name), f"text.{name}")
        # the end token matters only where it is looked for; otherwise any id (legacy configs say 2)
        _int(self.eos_token_id, "text.eos_token_id", 0, self.vocab_size - 1 if self.pool == "eos" else 2**31)

    def parameter_count(self, embed_dim: int) -> int:
        width = self.width
        count = (self.vocab_size + self.context_length) * width + self.layers * _block_parameters(
            width, self.mlp_dim
        )
        count += 2 * width
        if self.projection:
            count += width * embed_dim + embed_dim * int(self.projection_bias)
        return count


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
        if not isinstance(self.vision, VisionConfig):
            raise ConfigError(f"vision config must be an object, got {type(self.vision).__name__}")
        if not isinstance(self.text, TextConfig):
            raise ConfigError(f"text config must be an object, got {type(self.text).__name__}")
        _int(self.embed_dim, "embed_dim", 1, MAX_WIDTH)
        _float(self.init_logit_scale, "init_logit_scale", -100.0, 100.0)
        _float(self.logit_scale_max, "logit_scale_max", -100.0, 100.0)
        if self.init_logit_bias is not None:
            _float(self.init_logit_bias, "init_logit_bias", -1e4, 1e4)
        if not self.vision.projection and self.vision.kind == "vit" and self.vision.width != self.embed_dim:
            raise ConfigError(
                f"vision tower without projection has width {self.vision.width} != embed_dim {self.embed_dim}"
            )
        if not self.text.projection and self.text.width != self.embed_dim:
            raise ConfigError(
                f"text tower without projection has width {self.text.width} != embed_dim {self.embed_dim}"
            )
        count = self.parameter_count()
        if count > MAX_PARAMETERS:
            raise ConfigError(
                f"this config describes a model of {count:,} parameters, above polyclip's limit of "
                f"{MAX_PARAMETERS:,}; it is refused before anything is built"
            )

    def parameter_count(self) -> int:
        """Parameters of the model this config builds, computed without building it."""
        return (
            self.vision.parameter_count(self.embed_dim)
            + self.text.parameter_count(self.embed_dim)
            + 1
            + int(self.uses_sigmoid)
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
        if not isinstance(data, dict):
            raise ConfigError(f"model config: expected an object, got {type(data).__name__}")
        return _from_dict(cls, dict(data), "model config")
