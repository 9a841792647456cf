"""Hugging Face transformers folders: CLIPModel, SiglipModel (SigLIP and SigLIP 2) and Siglip2Model (NaFlex).

A folder holds ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin`` (or sharded weights
with an ``*.index.json``), usually with ``preprocessor_config.json`` and tokenizer files.
config.json records only the values that differ from transformers' defaults, so the defaults of
``CLIPTextConfig``/``CLIPVisionConfig`` and ``SiglipTextConfig``/``SiglipVisionConfig`` are kept here.
Reference: transformers ``models/clip/modeling_clip.py``, ``models/siglip/modeling_siglip.py``,
``models/siglip2/modeling_siglip2.py``.

SigLIP 2 comes in two forms. The fixed-resolution checkpoints are ``SiglipModel`` folders (model_type
"siglip") with Gemma's 256k tokenizer: polyclip tells them from SigLIP 1 by their tokenizer
(`siglip2_tokenizer_class`: a tokenizer_config.json naming a Gemma tokenizer, or a vocabulary of 256000
recorded with a tokenizer.json and no spiece.model). The NaFlex checkpoints are ``Siglip2Model`` folders
(model_type "siglip2"): the same towers and key names, except that the patch embedding is a linear layer
over flattened patches and the positions a grid resized per image (`polyclip.models.naflex`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from polyclip.checkpoints.common import (
    Checkpoint,
    CheckpointError,
    TemplatePairs,
    fuse_all_qkv,
    read_shard_index,
    read_weights,
    rename_keys,
    split_rows,
    template_renames,
)
from polyclip.models import (
    CLIP_EOT_ID,
    CLIP_VOCAB_SIZE,
    DualEncoderConfig,
    TextConfig,
    VisionConfig,
    siglip_text,
    siglip_vision,
)
from polyclip.transforms import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD

# transformers' defaults for what config.json may leave out
_DEFAULTS = {
    "clip": {
        "text": dict(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=512,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=8,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            eos_token_id=CLIP_EOT_ID,
        ),
        "vision": dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=32,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        ),
        "top": dict(projection_dim=512, logit_scale_init_value=2.6592),
    },
    "siglip": {
        "text": dict(
            vocab_size=32000,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=64,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
        ),
        "vision": dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=16,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
        ),
        "top": dict(),
    },
}
# Siglip2Model (NaFlex): SigLIP's towers; the position grid is num_patches (16 x 16) instead of image_size
_DEFAULTS["siglip2"] = {
    "text": _DEFAULTS["siglip"]["text"],
    "vision": {
        **{k: v for k, v in _DEFAULTS["siglip"]["vision"].items() if k != "image_size"},
        "num_patches": 256,
    },
    "top": dict(),
}
GEMMA_VOCAB_SIZE = 256_000  # every SigLIP 2 text tower (Gemma's tokenizer)

# transformers' activation names -> polyclip's
_ACTIVATIONS = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}


def _block_pairs(theirs: str, ours: str) -> TemplatePairs:
    """One encoder layer. q/k/v keep separate names here: the reader fuses them after renaming into
    polyclip's ``attn.qkv``, the exporter splits ``attn.qkv`` before renaming back."""
    return [
        (f"{theirs}.{{i}}.layer_norm1.{{w}}", f"{ours}.{{i}}.norm1.{{w}}"),
        (f"{theirs}.{{i}}.self_attn.{{qkv}}_proj.{{w}}", f"{ours}.{{i}}.attn.{{qkv}}_proj.{{w}}"),
        (f"{theirs}.{{i}}.self_attn.out_proj.{{w}}", f"{ours}.{{i}}.attn.proj.{{w}}"),
        (f"{theirs}.{{i}}.layer_norm2.{{w}}", f"{ours}.{{i}}.norm2.{{w}}"),
        (f"{theirs}.{{i}}.mlp.fc1.{{w}}", f"{ours}.{{i}}.mlp.fc1.{{w}}"),
        (f"{theirs}.{{i}}.mlp.fc2.{{w}}", f"{ours}.{{i}}.mlp.fc2.{{w}}"),
    ]


_COMMON_PAIRS: TemplatePairs = [
    ("vision_model.embeddings.patch_embedding.{w}", "visual.patch_embed.{w}"),
    ("vision_model.embeddings.position_embedding.weight", "visual.pos_embed"),
    *_block_pairs("vision_model.encoder.layers", "visual.transformer.blocks"),
    ("vision_model.post_layernorm.{w}", "visual.norm.{w}"),
    ("text_model.embeddings.token_embedding.weight", "text.token_embedding.weight"),
    ("text_model.embeddings.position_embedding.weight", "text.pos_embed"),
    *_block_pairs("text_model.encoder.layers", "text.transformer.blocks"),
    ("text_model.final_layer_norm.{w}", "text.norm.{w}"),
    ("logit_scale", "logit_scale"),
]
# (transformers name, polyclip name) templates per model type: read forwards, exported in reverse
PAIRS: dict[str, TemplatePairs] = {
    "clip": [
        *_COMMON_PAIRS,
        ("vision_model.embeddings.class_embedding", "visual.class_embedding"),
        ("vision_model.pre_layrnorm.{w}", "visual.norm_pre.{w}"),  # sic: transformers' spelling
        ("visual_projection.weight", "visual.proj.weight"),
        ("text_projection.weight", "text.proj.weight"),
    ],
    "siglip": [
        *_COMMON_PAIRS,
        ("vision_model.head.probe", "visual.head.probe"),
        # nn.MultiheadAttention's fused in_proj: split into the MAP head's q and kv after renaming
        ("vision_model.head.attention.in_proj_{w}", "visual.head.attn.in_proj_{w}"),
        ("vision_model.head.attention.out_proj.{w}", "visual.head.attn.proj.{w}"),
        ("vision_model.head.layernorm.{w}", "visual.head.norm.{w}"),
        ("vision_model.head.mlp.{fc}.{w}", "visual.head.mlp.{fc}.{w}"),
        ("text_model.head.{w}", "text.proj.{w}"),
        ("logit_bias", "logit_bias"),
    ],
}
# Siglip2Model has SiglipModel's names; its patch embedding is an nn.Linear (weight (D, P*P*3)) on both sides
PAIRS["siglip2"] = PAIRS["siglip"]
# reading does not need the model type: the two tables never map one name two ways
RENAMES = template_renames(list(dict.fromkeys(PAIRS["clip"] + PAIRS["siglip"])))
# buffers that older transformers versions saved; they carry no weights
IGNORED = (r".*\.position_ids",)


def _merged(defaults: dict[str, Any], given: dict[str, Any] | None) -> dict[str, Any]:
    return {**defaults, **{k: v for k, v in (given or {}).items() if v is not None}}


def _activation(name: str) -> str:
    if name not in _ACTIVATIONS:
        raise CheckpointError(
            f"activation {name!r} of this checkpoint is not supported ({sorted(_ACTIVATIONS)})"
        )
    return _ACTIVATIONS[name]


def config_from_hf(hf_config: dict[str, Any]) -> DualEncoderConfig:
    model_type = hf_config.get("model_type")
    if model_type not in _DEFAULTS:
        raise CheckpointError(
            f"config.json has model_type {model_type!r}; polyclip reads transformers 'clip', 'siglip' and "
            "'siglip2' folders"
        )
    defaults = _DEFAULTS[model_type]
    text = _merged(defaults["text"], hf_config.get("text_config"))
    vision = _merged(defaults["vision"], hf_config.get("vision_config"))
    top = _merged(defaults["top"], hf_config)
    if model_type == "clip":
        eos = text.get("eos_token_id")
        # configs saved before transformers 4.31 record eos_token_id=2 and pool at the argmax id
        pool = "argmax" if eos in (None, 2) else "eos"
        return DualEncoderConfig(
            embed_dim=top["projection_dim"],
            vision=VisionConfig(
                image_size=vision["image_size"],
                patch_size=vision["patch_size"],
                width=vision["hidden_size"],
                layers=vision["num_hidden_layers"],
                heads=vision["num_attention_heads"],
                mlp_dim=vision["intermediate_size"],
                act=_activation(vision["hidden_act"]),
                norm_eps=vision["layer_norm_eps"],
            ),
            text=TextConfig(
                vocab_size=text["vocab_size"],
                context_length=text["max_position_embeddings"],
                width=text["hidden_size"],
                layers=text["num_hidden_layers"],
                heads=text["num_attention_heads"],
                mlp_dim=text["intermediate_size"],
                act=_activation(text["hidden_act"]),
                norm_eps=text["layer_norm_eps"],
                pool=pool,
                eos_token_id=eos if eos is not None else CLIP_EOT_ID,
            ),
            init_logit_scale=top["logit_scale_init_value"],
        )
    # the text head maps to projection_size: the image width (SigLIP 2's giant-opt: 1152 -> 1536)
    projection = text.get("projection_size") or text["hidden_size"]
    if projection != vision["hidden_size"]:
        raise CheckpointError(
            f"SigLIP text projection size {projection} differs from the image width {vision['hidden_size']}: "
            "the two embeddings would not be comparable"
        )
    if model_type == "siglip2":
        grid = math.isqrt(vision["num_patches"])
        if not isinstance(vision["num_patches"], int) or grid * grid != vision["num_patches"]:
            raise CheckpointError(
                f"Siglip2 vision_config.num_patches {vision['num_patches']!r} is not a square grid of positions"
            )
        geometry = dict(kind="naflex", image_size=grid * vision["patch_size"])
    else:
        geometry = dict(image_size=vision["image_size"])
    return DualEncoderConfig(
        embed_dim=vision["hidden_size"],
        vision=siglip_vision(
            **geometry, patch_size=vision["patch_size"], width=vision["hidden_size"],
            layers=vision["num_hidden_layers"], heads=vision["num_attention_heads"],
            mlp_dim=vision["intermediate_size"], act=_activation(vision["hidden_act"]),
            norm_eps=vision["layer_norm_eps"],
        ),
        text=siglip_text(
            vocab_size=text["vocab_size"], context_length=text["max_position_embeddings"],
            width=text["hidden_size"], layers=text["num_hidden_layers"], heads=text["num_attention_heads"],
            mlp_dim=text["intermediate_size"], act=_activation(text["hidden_act"]),
            norm_eps=text["layer_norm_eps"],
        ),
        init_logit_scale=0.0,
        init_logit_bias=0.0,
    )  # fmt: skip


def convert_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers key names -> polyclip key names."""
    out = rename_keys(state_dict, RENAMES, ignore=IGNORED)
    fuse_all_qkv(out, r"(visual|text)\.transformer\.blocks\.\d+\.attn")
    for kind in ("weight", "bias"):
        fused = out.pop(f"visual.head.attn.in_proj_{kind}", None)
        if fused is not None:
            width = fused.shape[0] // 3
            out[f"visual.head.attn.q.{kind}"], out[f"visual.head.attn.kv.{kind}"] = split_rows(
                fused, [width, 2 * width]
            )
    for name in ("logit_scale", "logit_bias"):
        if name in out:
            out[name] = out[name].reshape(())  # SiglipModel stores shape (1,)
    return out


def find_weight_files(folder: Path) -> list[Path]:
    """The weight files of a transformers folder, safetensors first; sharded indexes resolved."""
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            return read_shard_index(folder, folder / index)
    raise CheckpointError(
        f"{folder} has a config.json but no model.safetensors, pytorch_model.bin or sharded index"
    )


def preprocess_from_hf(folder: Path, model_type: str, image_size: int) -> dict[str, Any]:
    """PreprocessConfig fields from preprocessor_config.json (or transformers' defaults)."""
    path = folder / "preprocessor_config.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    combined = folder / "processor_config.json"  # transformers 5 saves the processors' settings in one file
    if not data and combined.is_file():
        data = json.loads(combined.read_text()).get("image_processor") or {}
    resample = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}.get(
        data.get("resample", 2 if model_type == "siglip2" else 3), "bicubic"
    )
    if model_type == "siglip2":
        # Siglip2ImageProcessor: aspect ratio kept, at most max_num_patches patches (defaults 16 and 256)
        mean, std = data.get("image_mean", SIGLIP_MEAN), data.get("image_std", SIGLIP_STD)
        return dict(
            image_size=image_size, resize_mode="naflex", interpolation=resample, mean=tuple(mean),
            std=tuple(std), convention="transformers", patch_size=int(data.get("patch_size", 16)),
            max_num_patches=int(data.get("max_num_patches", 256)),
        )  # fmt: skip
    if model_type == "siglip":
        size = data.get("size", {}).get("height", image_size)
        mean, std = data.get("image_mean", SIGLIP_MEAN), data.get("image_std", SIGLIP_STD)
        return dict(
            image_size=size,
            resize_mode="squash",
            interpolation=resample,
            mean=tuple(mean),
            std=tuple(std),
            convention="transformers",
        )
    size = data.get("crop_size", {})
    size = size.get("height", image_size) if isinstance(size, dict) else size
    shortest = data.get("size", {})
    shortest = shortest.get("shortest_edge", size) if isinstance(shortest, dict) else shortest
    mean = data.get("image_mean", CLIP_MEAN)
    std = data.get("image_std", CLIP_STD)
    return dict(
        image_size=size,
        resize_mode="shortest" if data.get("do_center_crop", True) else "squash",
        interpolation=resample,
        crop_pct=size / shortest if shortest else 1.0,
        mean=tuple(mean),
        std=tuple(std),
        convention="transformers",  # RGB first (transparency over white), floored crop offsets
    )


def siglip2_tokenizer_class(folder: Path, hf_config: dict[str, Any]) -> str | None:
    """The Gemma tokenizer class a SigLIP 2 folder records, or None for a folder that is not SigLIP 2's.

    What is recorded decides, never the folder's name: tokenizer_config.json naming a Gemma tokenizer
    (GemmaTokenizer, GemmaTokenizerFast, Siglip2Tokenizer), or, without one, a text vocabulary of 256000
    with a tokenizer.json and no spiece.model (SigLIP 1's tokenizer file). Siglip2Model folders are SigLIP 2.
    """
    from polyclip.tokenizers import GEMMA_TOKENIZER_FILE, HF_GEMMA_CLASSES

    path = folder / "tokenizer_config.json"
    recorded = None
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"cannot read {path}: {error}") from error
        recorded = data.get("tokenizer_class") if isinstance(data, dict) else None
    if recorded in HF_GEMMA_CLASSES:
        return recorded
    vocab = (hf_config.get("text_config") or {}).get("vocab_size")
    gemma_files = (folder / GEMMA_TOKENIZER_FILE).is_file() and not (folder / "spiece.model").is_file()
    if recorded is None and (
        hf_config.get("model_type") == "siglip2" or (vocab == GEMMA_VOCAB_SIZE and gemma_files)
    ):
        return "GemmaTokenizer"
    return None


def read_hf(folder: Path) -> Checkpoint:
    hf_config = json.loads((folder / "config.json").read_text())
    config = config_from_hf(hf_config)
    state_dict: dict[str, torch.Tensor] = {}
    for path in find_weight_files(folder):
        state_dict.update(read_weights(path))
    notes = []
    if hf_config.get("model_type") in ("siglip", "siglip2"):
        tokenizer_class = siglip2_tokenizer_class(folder, hf_config)
        if tokenizer_class in ("GemmaTokenizer", "GemmaTokenizerFast"):
            notes.append(
                f"SigLIP 2: the folder names {tokenizer_class}, which does not lower-case; polyclip lower-cases "
                "the text before Gemma's tokenizer, as SigLIP 2 was trained (transformers' Siglip2Tokenizer)"
            )
    return Checkpoint(
        format="hf",
        config=config,
        state_dict=convert_state_dict(state_dict),
        preprocess=preprocess_from_hf(folder, hf_config["model_type"], config.vision.image_size),
        tokenizer=None,  # read from the folder's tokenizer files by the loader
        source=folder,
        notes=notes,
    )
