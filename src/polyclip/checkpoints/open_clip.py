"""open_clip checkpoints: the hub folder layout, and the key names OpenAI's CLIP also uses.

A hub folder holds ``open_clip_config.json`` (``{"model_cfg": ..., "preprocess_cfg": ...}``) and
``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``. The weights are the state dict of
open_clip's ``CLIP`` (text keys at the top level, as OpenAI's) or ``CustomTextCLIP`` (text keys under
``text.``); the image tower is open_clip's ``VisionTransformer`` (``visual.conv1``, ``visual.transformer``...),
``ModifiedResNet`` (``visual.layer1``...) or a timm trunk (``visual.trunk.*``, SigLIP).

Reference: open_clip ``src/open_clip/model.py`` (CLIPVisionCfg, CLIPTextCfg, CLIP, CustomTextCLIP),
``transformer.py``, ``modified_resnet.py``, ``timm_model.py``, ``transform.py`` (PreprocessCfg); timm
``models/vision_transformer.py`` (the SigLIP trunks) and ``layers/attention_pool.py`` (AttentionPoolLatent).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from polyclip.checkpoints.common import (
    Checkpoint,
    CheckpointError,
    TemplatePairs,
    read_weights,
    rename_keys,
    template_renames,
)
from polyclip.models import (
    CLIP_EOT_ID,
    CLIP_VOCAB_SIZE,
    ConfigError,
    DualEncoderConfig,
    TextConfig,
    VisionConfig,
    siglip_vision,
)
from polyclip.models.architectures import UNSUPPORTED_OPEN_CLIP_FAMILIES
from polyclip.transforms import CLIP_MEAN, CLIP_STD

CONFIG_NAME = "open_clip_config.json"
WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _block_pairs(theirs: str, ours: str) -> TemplatePairs:
    """One residual attention block: open_clip's (nn.MultiheadAttention, c_fc/c_proj) -> polyclip's."""
    return [
        (f"{theirs}.{{i}}.ln_1.{{w}}", f"{ours}.{{i}}.norm1.{{w}}"),
        (f"{theirs}.{{i}}.attn.in_proj_{{w}}", f"{ours}.{{i}}.attn.qkv.{{w}}"),
        (f"{theirs}.{{i}}.attn.out_proj.{{w}}", f"{ours}.{{i}}.attn.proj.{{w}}"),
        (f"{theirs}.{{i}}.ln_2.{{w}}", f"{ours}.{{i}}.norm2.{{w}}"),
        (f"{theirs}.{{i}}.mlp.c_fc.{{w}}", f"{ours}.{{i}}.mlp.fc1.{{w}}"),
        (f"{theirs}.{{i}}.mlp.c_proj.{{w}}", f"{ours}.{{i}}.mlp.fc2.{{w}}"),
    ]


VIT_PAIRS: TemplatePairs = [
    ("visual.conv1.weight", "visual.patch_embed.weight"),
    ("visual.class_embedding", "visual.class_embedding"),
    ("visual.positional_embedding", "visual.pos_embed"),
    ("visual.ln_pre.{w}", "visual.norm_pre.{w}"),
    *_block_pairs("visual.transformer.resblocks", "visual.transformer.blocks"),
    ("visual.ln_post.{w}", "visual.norm.{w}"),
    ("visual.proj", "visual.proj.weight"),  # stored (width, embed): transposed on the way
]

# ModifiedResNet: open_clip's stem convs are visual.conv1/2/3 with bn1/2/3; ours is one nn.Sequential with
# ReLUs in between. The downsample branch is (AvgPool "-1", conv "0", bn "1") there and (pool, conv, bn) here.
RESNET_PAIRS: TemplatePairs = [
    ("visual.conv1.weight", "visual.stem.0.weight"),
    ("visual.bn1.{bn}", "visual.stem.1.{bn}"),
    ("visual.conv2.weight", "visual.stem.3.weight"),
    ("visual.bn2.{bn}", "visual.stem.4.{bn}"),
    ("visual.conv3.weight", "visual.stem.6.weight"),
    ("visual.bn3.{bn}", "visual.stem.7.{bn}"),
    *[
        pair
        for stage in range(4)
        for pair in [
            *[
                (
                    f"visual.layer{stage + 1}.{{i}}.conv{n}.weight",
                    f"visual.stages.{stage}.{{i}}.conv{n}.weight",
                )
                for n in (1, 2, 3)
            ],
            *[
                (f"visual.layer{stage + 1}.{{i}}.bn{n}.{{bn}}", f"visual.stages.{stage}.{{i}}.bn{n}.{{bn}}")
                for n in (1, 2, 3)
            ],
            (
                f"visual.layer{stage + 1}.{{i}}.downsample.0.weight",
                f"visual.stages.{stage}.{{i}}.downsample.1.weight",
            ),
            (
                f"visual.layer{stage + 1}.{{i}}.downsample.1.{{bn}}",
                f"visual.stages.{stage}.{{i}}.downsample.2.{{bn}}",
            ),
        ]
    ],
    ("visual.attnpool.positional_embedding", "visual.attnpool.positional_embedding"),
    ("visual.attnpool.{qkv}_proj.{w}", "visual.attnpool.{qkv}_proj.{w}"),
    ("visual.attnpool.c_proj.{w}", "visual.attnpool.c_proj.{w}"),
]

# timm's VisionTransformer as open_clip's trunk (SigLIP): fused qkv like ours, MAP head "attn_pool"
TIMM_PAIRS: TemplatePairs = [
    ("visual.trunk.patch_embed.proj.{w}", "visual.patch_embed.{w}"),
    ("visual.trunk.pos_embed", "visual.pos_embed"),  # stored (1, N, width)
    ("visual.trunk.blocks.{i}.norm1.{w}", "visual.transformer.blocks.{i}.norm1.{w}"),
    ("visual.trunk.blocks.{i}.attn.qkv.{w}", "visual.transformer.blocks.{i}.attn.qkv.{w}"),
    ("visual.trunk.blocks.{i}.attn.proj.{w}", "visual.transformer.blocks.{i}.attn.proj.{w}"),
    ("visual.trunk.blocks.{i}.norm2.{w}", "visual.transformer.blocks.{i}.norm2.{w}"),
    ("visual.trunk.blocks.{i}.mlp.fc1.{w}", "visual.transformer.blocks.{i}.mlp.fc1.{w}"),
    ("visual.trunk.blocks.{i}.mlp.fc2.{w}", "visual.transformer.blocks.{i}.mlp.fc2.{w}"),
    ("visual.trunk.norm.{w}", "visual.norm.{w}"),
    ("visual.trunk.attn_pool.latent", "visual.head.probe"),
    ("visual.trunk.attn_pool.q.{w}", "visual.head.attn.q.{w}"),
    ("visual.trunk.attn_pool.kv.{w}", "visual.head.attn.kv.{w}"),
    ("visual.trunk.attn_pool.proj.{w}", "visual.head.attn.proj.{w}"),
    ("visual.trunk.attn_pool.norm.{w}", "visual.head.norm.{w}"),
    ("visual.trunk.attn_pool.mlp.fc1.{w}", "visual.head.mlp.fc1.{w}"),
    ("visual.trunk.attn_pool.mlp.fc2.{w}", "visual.head.mlp.fc2.{w}"),
    ("visual.head.proj.weight", "visual.proj.weight"),  # timm_proj="linear" only
]


def text_pairs(prefix: str) -> TemplatePairs:
    """The text tower: ``prefix`` is "" for CLIP (and OpenAI) and "text." for CustomTextCLIP."""
    return [
        (f"{prefix}token_embedding.weight", "text.token_embedding.weight"),
        (f"{prefix}positional_embedding", "text.pos_embed"),
        *_block_pairs(f"{prefix}transformer.resblocks", "text.transformer.blocks"),
        (f"{prefix}ln_final.{{w}}", "text.norm.{w}"),
        (f"{prefix}text_projection", "text.proj.weight"),  # a bare (width, embed) matrix: transposed
        (f"{prefix}text_projection.{{w}}", "text.proj.{w}"),  # an nn.Linear (proj_bias=True)
    ]


SCALE_PAIRS: TemplatePairs = [("logit_scale", "logit_scale"), ("logit_bias", "logit_bias")]

VISION_PAIRS = {"vit": VIT_PAIRS, "resnet": RESNET_PAIRS, "timm": TIMM_PAIRS}
# Both text layouts are listed when reading: their key names cannot collide with each other or the image's.
_READ_TABLES = {
    layout: template_renames(pairs + text_pairs("") + text_pairs("text.") + SCALE_PAIRS)
    for layout, pairs in VISION_PAIRS.items()
}
# Matrices that open_clip keeps as bare parameters applied as ``x @ P``; polyclip uses nn.Linear (P.T).
TRANSPOSED = ("visual.proj", "text_projection", "text.text_projection")


def convert_state_dict(state_dict: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """open_clip (or OpenAI) key names -> polyclip key names. ``layout`` is "vit", "resnet" or "timm"."""
    state_dict = dict(state_dict)
    for name in TRANSPOSED:
        if name in state_dict and state_dict[name].ndim == 2:
            state_dict[name] = state_dict[name].T.contiguous()
    out = rename_keys(state_dict, _READ_TABLES[layout], ignore=(r"(text\.)?attn_mask",))
    if "visual.pos_embed" in out and layout == "timm":
        out["visual.pos_embed"] = out["visual.pos_embed"].reshape(-1, out["visual.pos_embed"].shape[-1])
    for name in ("logit_scale", "logit_bias"):
        if name in out:
            out[name] = out[name].reshape(())  # nonscalar_logit_scale stores shape (1,)
    if layout == "resnet":
        # BatchNorm's step counter carries no weights; some exports leave it out
        for key in [k for k in out if k.endswith(".running_mean")]:
            out.setdefault(key.replace(".running_mean", ".num_batches_tracked"), torch.tensor(0))
    return out


def to_open_clip_state_dict(
    state_dict: dict[str, torch.Tensor], layout: str, custom_text: bool
) -> dict[str, torch.Tensor]:
    """polyclip key names -> open_clip key names (the inverse of `convert_state_dict`)."""
    prefix = "text." if custom_text else ""
    table = template_renames(VISION_PAIRS[layout] + text_pairs(prefix) + SCALE_PAIRS, reverse=True)
    state_dict = dict(state_dict)
    projection = state_dict.pop("text.proj.weight", None)
    out = rename_keys(state_dict, table, unmatched="raise", target=f"open_clip ({layout!r} layout)")
    if projection is not None:
        # a bare (width, embed) matrix as open_clip builds it without bias; an nn.Linear with one
        if "text.proj.bias" not in state_dict:
            out[f"{prefix}text_projection"] = projection.T.contiguous()
        else:
            out[f"{prefix}text_projection.weight"] = projection
    if "visual.proj" in out:
        out["visual.proj"] = out["visual.proj"].T.contiguous()
    if layout == "timm":
        out["visual.trunk.pos_embed"] = out["visual.trunk.pos_embed"].unsqueeze(0)
    return out


# ---------------------------------------------------------------------------------------------------------
# Configuration

# timm's SigLIP image trunks by family (timm models/vision_transformer.py, ``vit_*_siglip_*``):
# all have no class token, a MAP head, qkv bias, exact GELU and LayerNorm eps 1e-6.
TIMM_SIGLIP_FAMILIES: dict[str, dict[str, int]] = {
    "base": dict(width=768, layers=12, heads=12, mlp_dim=3072),
    "large": dict(width=1024, layers=24, heads=16, mlp_dim=4096),
    "so400m": dict(width=1152, layers=27, heads=16, mlp_dim=4304),  # mlp_ratio 3.7362
    "giantopt": dict(width=1536, layers=40, heads=16, mlp_dim=6144),  # SigLIP 2's g-opt (ViT-gopt-16-SigLIP2)
}
_TIMM_SIGLIP_NAME = re.compile(r"vit_(?P<family>[a-z0-9]+)_patch(?P<patch>\d+)_siglip_(?P<size>\d+)")

# Settings of open_clip's configs that change the architecture, with the value polyclip implements.
# A config giving any other value is refused rather than loaded into a different network.
_VISION_FIXED = {
    "ls_init_value": None, "attentional_pool": False, "pos_embed_type": "learnable",
    "final_ln_after_pool": False, "pool_type": "tok", "block_type": (None, "default"), "qk_norm": False,
    "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False, "scale_attn": False,
    "scale_fc": False, "global_average_pool": False,
}  # fmt: skip
# ... and for a timm trunk (checked only when timm_model_name is set: ViT configs carry timm's defaults)
_TIMM_FIXED = {"timm_pool": "map", "timm_proj": ("none", "linear"), "timm_proj_bias": False}
_TEXT_FIXED = {
    "ls_init_value": None, "embed_cls": False, "final_ln_after_pool": False, "proj_type": ("linear", "none"),
    "hf_model_name": None, "block_type": (None, "default"), "qk_norm": False, "scaled_cosine_attn": False,
    "scale_heads": False, "scale_attn_inner": False, "scale_attn": False, "scale_fc": False,
}  # fmt: skip
# Settings read below, or that only matter for training or tokenisation.
_VISION_FREE = set(
    "layers width head_width mlp_ratio patch_size image_size patch_dropout attn_pooler_queries attn_pooler_heads "
    "no_ln_pre output_tokens act_kwargs norm_kwargs timm_model_name timm_model_pretrained timm_drop "
    "timm_drop_path n_queries timm_pool timm_proj timm_proj_bias".split()  # n_queries: older name of attn_pooler_queries
)
_TEXT_FREE = set(
    "context_length vocab_size hf_tokenizer_name tokenizer_mode tokenizer_kwargs width heads layers mlp_ratio "
    "pad_id eos_id no_causal_mask pool_type proj_bias output_tokens act_kwargs norm_kwargs hf_model_pretrained "
    "hf_proj_type hf_pooler_type proj pooler_type".split()  # proj, pooler_type: older names of the hf_ ones
)
_TOP_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text", "init_logit_scale",
             "init_logit_bias", "nonscalar_logit_scale", "cast_dtype"}  # fmt: skip


def _check_settings(cfg: dict[str, Any], fixed: dict[str, Any], free: set[str], where: str) -> None:
    unknown = sorted(set(cfg) - set(fixed) - free)
    if unknown:
        raise CheckpointError(f"open_clip {where} has settings polyclip does not know: {unknown}")
    for key, allowed in fixed.items():
        allowed = allowed if isinstance(allowed, tuple) else (allowed,)
        if key in cfg and cfg[key] not in allowed:
            raise CheckpointError(
                f"open_clip {where} sets {key}={cfg[key]!r}; polyclip implements only {' or '.join(map(repr, allowed))}"
            )


def _activation(quick_gelu: bool, act_kwargs: dict[str, Any] | None, where: str) -> str:
    if quick_gelu:
        if act_kwargs:
            raise CheckpointError(
                f"open_clip {where}: act_kwargs {act_kwargs} with quick_gelu is not supported"
            )
        return "quick_gelu"
    approximate = (act_kwargs or {}).get("approximate", "none")
    if set(act_kwargs or {}) - {"approximate"} or approximate not in ("none", "tanh"):
        raise CheckpointError(f"open_clip {where}: act_kwargs {act_kwargs} are not supported")
    return "gelu_tanh" if approximate == "tanh" else "gelu"


def _norm_eps(cfg: dict[str, Any], default: float, where: str) -> float:
    kwargs = cfg.get("norm_kwargs") or {}
    if set(kwargs) - {"eps"}:
        raise CheckpointError(f"open_clip {where}: norm_kwargs {kwargs} are not supported (only eps)")
    return float(kwargs.get("eps", default))


def _square(size: Any, where: str) -> int:
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise CheckpointError(f"{where}: non-square size {size} is not supported")
        size = size[0]
    return int(size)


def timm_siglip_trunk(name: str) -> dict[str, int]:
    """Width, depth, heads, MLP size and patch size of a timm SigLIP trunk from its model name."""
    match = _TIMM_SIGLIP_NAME.fullmatch(name)
    if match is None or match["family"] not in TIMM_SIGLIP_FAMILIES:
        known = ", ".join(f"vit_{family}_patch<P>_siglip_<size>" for family in TIMM_SIGLIP_FAMILIES)
        raise CheckpointError(f"timm image tower {name!r} is not supported; polyclip reads {known}")
    return {**TIMM_SIGLIP_FAMILIES[match["family"]], "patch_size": int(match["patch"])}


def _vision_config(cfg: dict[str, Any], embed_dim: int, quick_gelu: bool) -> tuple[VisionConfig, str]:
    _check_settings(cfg, _VISION_FIXED, _VISION_FREE, "vision_cfg")
    image_size = _square(cfg.get("image_size", 224), "open_clip vision_cfg image_size")
    width = cfg.get("width", 768)
    if cfg.get("timm_model_name"):
        _check_settings(cfg, _TIMM_FIXED, set(cfg), "vision_cfg")  # unknown keys were checked above
        trunk = timm_siglip_trunk(cfg["timm_model_name"])
        # timm's SigLIP trunks use exact GELU
        config = siglip_vision(image_size=image_size, **trunk, act="gelu",
                               projection=cfg.get("timm_proj", "linear") == "linear")  # fmt: skip
        return config, "timm"
    layers = cfg.get("layers", 12)
    head_width = cfg.get("head_width", 64)
    if isinstance(layers, list | tuple):
        if head_width != 64:
            raise CheckpointError(f"ModifiedResNet with head_width {head_width} is not supported (only 64)")
        return VisionConfig(
            kind="resnet", image_size=image_size, resnet_layers=tuple(layers), resnet_width=width
        ), "resnet"
    where = "vision_cfg"
    config = VisionConfig(
        image_size=image_size, patch_size=cfg.get("patch_size", 16), width=width, layers=layers,
        heads=width // head_width, mlp_dim=int(width * cfg.get("mlp_ratio", 4.0)),
        act=_activation(quick_gelu, cfg.get("act_kwargs"), where), norm_eps=_norm_eps(cfg, 1e-5, where),
        pre_norm=not cfg.get("no_ln_pre", False),
    )  # fmt: skip
    return config, "vit"


def _text_config(cfg: dict[str, Any], quick_gelu: bool) -> TextConfig:
    _check_settings(cfg, _TEXT_FIXED, _TEXT_FREE, "text_cfg")
    pool = cfg.get("pool_type", "argmax")
    if pool not in ("argmax", "eos", "last"):
        raise CheckpointError(f"open_clip text pool_type {pool!r} is not supported (argmax, eos, last)")
    width = cfg.get("width", 512)
    where = "text_cfg"
    return TextConfig(
        vocab_size=cfg.get("vocab_size", CLIP_VOCAB_SIZE), context_length=cfg.get("context_length", 77), width=width,
        layers=cfg.get("layers", 12), heads=cfg.get("heads", 8), mlp_dim=int(width * cfg.get("mlp_ratio", 4.0)),
        act=_activation(quick_gelu, cfg.get("act_kwargs"), where), norm_eps=_norm_eps(cfg, 1e-5, where),
        causal=not cfg.get("no_causal_mask", False), pool=pool,
        # open_clip's eos_id defaults to 2 and matters only for pool_type "eos"
        eos_token_id=cfg.get("eos_id", 2 if pool == "eos" else CLIP_EOT_ID),
        projection=cfg.get("proj_type", "linear") != "none", projection_bias=cfg.get("proj_bias", False),
    )  # fmt: skip


def _refuse_unsupported_family(model_cfg: dict[str, Any]) -> None:
    """Name the open_clip family polyclip does not implement, rather than one setting it does not read."""
    vision = model_cfg.get("vision_cfg") or {}
    text = model_cfg.get("text_cfg") or {}
    if "multimodal_cfg" in model_cfg:
        raise CheckpointError(
            "open_clip CoCa models (a captioning decoder, multimodal_cfg) are not supported"
        )
    for where, name in (
        ("image tower", vision.get("timm_model_name")),
        ("text tower", text.get("hf_model_name")),
    ):
        if not name:
            continue
        for pattern, family in UNSUPPORTED_OPEN_CLIP_FAMILIES.items():
            if re.search(pattern, str(name).lower()):
                raise CheckpointError(f"open_clip {where} {name!r}: {family} are not supported by polyclip")
    if text.get("hf_model_name"):
        raise CheckpointError(
            f"open_clip text tower {text['hf_model_name']!r}: Hugging Face text towers are not supported by polyclip"
        )


def config_from_open_clip(model_cfg: dict[str, Any]) -> tuple[DualEncoderConfig, str]:
    """polyclip's config and the image tower's key layout ("vit", "resnet", "timm") from ``model_cfg``."""
    _refuse_unsupported_family(model_cfg)
    unknown = sorted(set(model_cfg) - _TOP_KEYS)
    if unknown:
        raise CheckpointError(
            f"open_clip model_cfg has settings polyclip does not read: {unknown} "
            "(CoCa and other multimodal decoders are not supported)"
        )
    if "embed_dim" not in model_cfg:
        raise CheckpointError("open_clip model_cfg has no embed_dim")
    quick_gelu = bool(model_cfg.get("quick_gelu", False))
    try:
        vision, layout = _vision_config(model_cfg.get("vision_cfg", {}), model_cfg["embed_dim"], quick_gelu)
        text = _text_config(model_cfg.get("text_cfg", {}), quick_gelu)
        config = DualEncoderConfig(
            embed_dim=model_cfg["embed_dim"], vision=vision, text=text,
            init_logit_scale=model_cfg.get("init_logit_scale", math.log(1 / 0.07)),
            init_logit_bias=model_cfg.get("init_logit_bias"),
        )  # fmt: skip
    except ConfigError as error:
        raise CheckpointError(f"open_clip model_cfg describes no valid polyclip model: {error}") from error
    return config, layout


def preprocess_from_open_clip(preprocess_cfg: dict[str, Any], image_size: int) -> dict[str, Any]:
    """PreprocessConfig fields from open_clip's PreprocessCfg (defaults: OpenAI's statistics, bicubic,
    shortest side + centre crop)."""
    mode = preprocess_cfg.get("mode", "RGB")
    if mode != "RGB":
        raise CheckpointError(f"open_clip preprocess mode {mode!r} is not supported (RGB only)")
    resize_mode = preprocess_cfg.get("resize_mode", "shortest")
    if resize_mode not in ("shortest", "longest", "squash"):
        raise CheckpointError(f"open_clip resize_mode {resize_mode!r} is not supported")
    interpolation = preprocess_cfg.get("interpolation", "bicubic")
    if interpolation == "random":  # a training setting; open_clip evaluates it with bicubic
        interpolation = "bicubic"
    if interpolation not in ("bicubic", "bilinear", "nearest"):
        raise CheckpointError(f"open_clip interpolation {interpolation!r} is not supported for evaluation")
    return dict(
        image_size=_square(preprocess_cfg.get("size", image_size), "open_clip preprocess size"),
        resize_mode=resize_mode,
        interpolation=interpolation,
        crop_pct=1.0,  # open_clip resizes straight to the crop size
        mean=tuple(preprocess_cfg.get("mean", CLIP_MEAN)),  # open_clip's default: OpenAI's statistics
        std=tuple(preprocess_cfg.get("std", CLIP_STD)),
        fill_color=int(preprocess_cfg.get("fill_color", 0)),
        convention="torchvision",  # open_clip's transforms are torchvision's on PIL images
    )


# The tokenizer file of a SigLIP (SentencePiece) or SigLIP 2 (Gemma) tokenizer: read from the folder, or from
# the hub repo the config names
SPIECE_FILE = "spiece.model"
GEMMA_FILE = "tokenizer.json"  # SigLIP 2's Gemma tokenizer
GEMMA_VOCAB_SIZE = 256_000
HUB_FILE_PREFIX = "hf-hub:"  # a tokenizer file named "hf-hub:org/repo/file" is resolved by the loader


def tokenizer_from_open_clip(
    text_cfg: dict[str, Any], notes: list[str], folder: Path | None = None
) -> dict[str, Any] | None:
    """The tokenizer config: CLIP's BPE, SigLIP's SentencePiece or SigLIP 2's Gemma BPE (``hf_tokenizer_name``).

    open_clip builds ``HFTokenizer(hf_tokenizer_name)``: from the folder's own files with ``local-dir:``,
    from the hub otherwise. polyclip reads the folder's ``spiece.model`` (SigLIP) or ``tokenizer.json``
    (SigLIP 2) when it is there and otherwise names the hub repo's (``hf-hub:REPO/FILE``), which the loader
    resolves through the hub cache. A SigLIP 2 tokenizer is recognised by what is recorded: a vocabulary of
    256000 (Gemma's), or a folder holding a tokenizer.json and no spiece.model.
    """
    context_length = text_cfg.get("context_length", 77)
    name = text_cfg.get("hf_tokenizer_name")
    if not name:
        if text_cfg.get("vocab_size", CLIP_VOCAB_SIZE) != CLIP_VOCAB_SIZE:
            notes.append(f"vocab_size {text_cfg['vocab_size']} is not CLIP's BPE and no tokenizer is named")
            return None
        return {"type": "clip", "context_length": context_length}
    # open_clip's HFTokenizer cleans the text first ("whitespace" unless tokenizer_kwargs say otherwise)
    clean = (text_cfg.get("tokenizer_kwargs") or {}).get("clean", "whitespace")
    repo = name.removeprefix(HUB_FILE_PREFIX)
    has = {file: folder is not None and (folder / file).is_file() for file in (SPIECE_FILE, GEMMA_FILE)}
    if text_cfg.get("vocab_size") == GEMMA_VOCAB_SIZE or (has[GEMMA_FILE] and not has[SPIECE_FILE]):
        return _gemma_tokenizer(repo, context_length, clean, has[GEMMA_FILE], folder, notes)
    local = has[SPIECE_FILE]
    # SigLIP (v1) checkpoints name a hub repo holding their SentencePiece model
    if not local and "siglip" not in repo.lower():
        notes.append(f"tokenizer {name!r} is not one polyclip provides")
        return None
    if local:
        spiece = SPIECE_FILE
    else:
        spiece = f"{HUB_FILE_PREFIX}{repo}/{SPIECE_FILE}"
        notes.append(f"the folder has no {SPIECE_FILE}: the SentencePiece model is the hub repo {name!r}'s")
    # the tokenizer's own lower-casing is its tokenizer_config.json's
    lower = True
    if local and (folder / "tokenizer_config.json").is_file():
        try:
            lower = bool(
                json.loads((folder / "tokenizer_config.json").read_text()).get("do_lower_case", True)
            )
        except (OSError, json.JSONDecodeError, AttributeError) as error:
            raise CheckpointError(f"cannot read {folder / 'tokenizer_config.json'}: {error}") from error
    config = {"type": "siglip", "context_length": context_length, "spiece_model": spiece, "clean": clean}
    if not lower:
        config["do_lower_case"] = False
    return config


def _gemma_tokenizer(
    repo: str, context_length: int, clean: str, local: bool, folder: Path | None, notes: list[str]
) -> dict[str, Any]:
    """SigLIP 2 in open_clip: HFTokenizer = open_clip's cleaning, then the Gemma tokenizer the repo names
    (``AutoTokenizer``: its tokenizer.json and tokenizer_config.json), padded to max_length. open_clip adds
    no lower-casing of its own: its SigLIP 2 configs clean with "canonicalize", which lower-cases."""
    if local:
        files = {"tokenizer_file": GEMMA_FILE}
        if (folder / "tokenizer_config.json").is_file():
            files["tokenizer_config"] = "tokenizer_config.json"
    else:
        files = {
            "tokenizer_file": f"{HUB_FILE_PREFIX}{repo}/{GEMMA_FILE}",
            "tokenizer_config": f"{HUB_FILE_PREFIX}{repo}/tokenizer_config.json",
        }
        notes.append(f"the folder has no {GEMMA_FILE}: the Gemma tokenizer is the hub repo {repo!r}'s")
    return {"type": "gemma", "context_length": context_length, **files, "clean": clean, "lower_case": False}


def find_weights(folder: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder} has {CONFIG_NAME} but none of {', '.join(WEIGHT_NAMES)}")


def unwrap_state_dict(obj: dict[str, Any], source: Path, notes: list[str]) -> dict[str, torch.Tensor]:
    """The tensors of a saved training checkpoint: ``{"state_dict": ...}`` wrappers and DDP's ``module.``
    prefix are removed."""
    if isinstance(obj.get("state_dict"), dict):
        extra = sorted(k for k in obj if k != "state_dict")
        notes.append(f"weights taken from the checkpoint's 'state_dict' entry (also holds {extra})")
        obj = obj["state_dict"]
    if obj and all(key.startswith("module.") for key in obj):
        obj = {key[len("module.") :]: value for key, value in obj.items()}
    not_tensors = sorted(key for key, value in obj.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise CheckpointError(f"{source}: entries that are not tensors: {not_tensors[:10]}")
    return obj


def read_open_clip(folder: Path) -> Checkpoint:
    config_path = folder / CONFIG_NAME
    try:
        data = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {config_path}: {error}") from error
    if not isinstance(data, dict) or not isinstance(data.get("model_cfg"), dict):
        raise CheckpointError(f"{config_path} has no model_cfg object")
    model_cfg = data["model_cfg"]
    config, layout = config_from_open_clip(model_cfg)
    notes: list[str] = []
    weights = find_weights(folder)
    state_dict = unwrap_state_dict(read_weights(weights), weights, notes)
    return Checkpoint(
        format="open_clip",
        config=config,
        state_dict=convert_state_dict(state_dict, layout),
        preprocess=preprocess_from_open_clip(data.get("preprocess_cfg") or {}, config.vision.image_size),
        tokenizer=tokenizer_from_open_clip(model_cfg.get("text_cfg", {}), notes, folder),
        source=folder,
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------------------
# Writing open_clip's config (used by export)


def _act_settings(act: str, where: str) -> tuple[bool, dict[str, Any] | None]:
    """(quick_gelu, act_kwargs) describing one of polyclip's activations in open_clip terms."""
    if act == "quick_gelu":
        return True, None
    if act == "gelu":
        return False, None
    if act == "gelu_tanh":
        return False, {"approximate": "tanh"}
    raise CheckpointError(f"{where} activation {act!r} has no open_clip equivalent")


def _check_mlp_ratio(width: int, mlp_dim: int, where: str) -> None:
    # open_clip stores the MLP size as a ratio and rebuilds it with int(width * ratio)
    if int(width * (mlp_dim / width)) != mlp_dim:
        raise CheckpointError(f"the {where} MLP size {mlp_dim} cannot be written as open_clip's mlp_ratio")


def to_open_clip_config(config: DualEncoderConfig) -> tuple[dict[str, Any], str, bool]:
    """``model_cfg``, the image key layout and whether the text tower is a CustomTextCLIP ``text.``."""
    vision, text = config.vision, config.text
    text_quick, text_act_kwargs = _act_settings(text.act, "text")
    model_cfg: dict[str, Any] = {"embed_dim": config.embed_dim}
    if vision.kind == "resnet":
        layout = "resnet"
        vision_cfg: dict[str, Any] = {
            "image_size": vision.image_size, "layers": list(vision.resnet_layers), "width": vision.resnet_width,
            "patch_size": None,
        }  # fmt: skip
        quick_gelu = text_quick
    elif vision.pool == "map":
        layout = "timm"
        if vision.act != "gelu" or vision.norm_eps != 1e-6 or vision.class_token or vision.pre_norm:
            raise CheckpointError(
                "open_clip describes a SigLIP image tower only as a timm trunk (exact GELU, eps 1e-6, no class "
                f"token, no pre-norm); this model has act={vision.act!r}, eps={vision.norm_eps}"
            )
        name = None
        for family, sizes in TIMM_SIGLIP_FAMILIES.items():
            if sizes == dict(
                width=vision.width, layers=vision.layers, heads=vision.heads, mlp_dim=vision.mlp_dim
            ):
                name = f"vit_{family}_patch{vision.patch_size}_siglip_{vision.image_size}"
        if name is None:
            raise CheckpointError(
                f"no timm SigLIP trunk has width {vision.width}, {vision.layers} layers, {vision.heads} heads and "
                f"MLP {vision.mlp_dim}; open_clip can only name one of {sorted(TIMM_SIGLIP_FAMILIES)}"
            )
        vision_cfg = {
            "image_size": vision.image_size, "timm_model_name": name, "timm_model_pretrained": False,
            "timm_pool": "map", "timm_proj": "linear" if vision.projection else "none",
        }  # fmt: skip
        quick_gelu = text_quick
    else:
        layout = "vit"
        if not vision.class_token or vision.patch_bias or not vision.projection:
            raise CheckpointError(
                "this image tower (no class token, patch bias or no projection) has no open_clip form"
            )
        vision_quick, vision_act_kwargs = _act_settings(vision.act, "image")
        if (vision_quick, vision_act_kwargs) != (text_quick, text_act_kwargs):
            raise CheckpointError(
                f"open_clip uses one activation for both towers; this model has {vision.act!r} and {text.act!r}"
            )
        _check_mlp_ratio(vision.width, vision.mlp_dim, "image")
        if vision.width % vision.heads:
            raise CheckpointError(f"image width {vision.width} is not divisible by {vision.heads} heads")
        vision_cfg = {
            "image_size": vision.image_size, "layers": vision.layers, "width": vision.width,
            "patch_size": vision.patch_size, "head_width": vision.width // vision.heads,
            "mlp_ratio": vision.mlp_dim / vision.width, "no_ln_pre": not vision.pre_norm,
            "norm_kwargs": {"eps": vision.norm_eps}, "act_kwargs": vision_act_kwargs,
        }  # fmt: skip
        quick_gelu = vision_quick
    model_cfg["vision_cfg"] = vision_cfg
    model_cfg["text_cfg"] = {
        "context_length": text.context_length, "vocab_size": text.vocab_size, "width": text.width,
        "heads": text.heads, "layers": text.layers, "mlp_ratio": text.mlp_dim / text.width,
        "no_causal_mask": not text.causal, "pool_type": text.pool, "proj_bias": text.projection_bias,
        "proj_type": "linear" if text.projection else "none", "norm_kwargs": {"eps": text.norm_eps},
        "act_kwargs": text_act_kwargs,
    }  # fmt: skip
    model_cfg["text_cfg"]["eos_id"] = text.eos_token_id
    _check_mlp_ratio(text.width, text.mlp_dim, "text")
    if quick_gelu != text_quick:
        raise CheckpointError("open_clip uses one activation flag (quick_gelu) for both towers")
    model_cfg["quick_gelu"] = quick_gelu
    custom_text = layout == "timm"  # open_clip's SigLIP configs build a CustomTextCLIP
    if custom_text:
        model_cfg["custom_text"] = True
    model_cfg["init_logit_scale"] = config.init_logit_scale
    if config.init_logit_bias is not None:
        model_cfg["init_logit_bias"] = config.init_logit_bias
    return model_cfg, layout, custom_text


__all__ = [
    "CONFIG_NAME",
    "HUB_FILE_PREFIX",
    "TIMM_SIGLIP_FAMILIES",
    "config_from_open_clip",
    "convert_state_dict",
    "preprocess_from_open_clip",
    "read_open_clip",
    "to_open_clip_config",
    "to_open_clip_state_dict",
    "tokenizer_from_open_clip",
    "unwrap_state_dict",
]
