"""Writing a polyclip model in other libraries' formats: a transformers ``CLIPModel``/``SiglipModel`` folder,
or an open_clip hub folder.

The key names are the inverses of the readers' (`polyclip.checkpoints.hf`, `polyclip.checkpoints.open_clip`):
fused QKV projections are split back into q/k/v, the MAP head's separate q and fused kv become
``nn.MultiheadAttention``'s ``in_proj``, open_clip's bare projection matrices are transposed back.
A model that the target library cannot describe (a ModifiedResNet for transformers, a SigLIP image tower
whose size no timm model has for open_clip) raises `ExportError` instead of writing something else.

Reference: transformers ``models/clip`` and ``models/siglip`` (configuration and modeling files,
``CLIPImageProcessor``, ``SiglipImageProcessor``); open_clip ``model.py``, ``transform.py`` (PreprocessCfg),
``push_to_hf_hub.py`` (the hub folder's file names).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polyclip.checkpoints import hf
from polyclip.checkpoints.common import CheckpointError, rename_keys, template_renames
from polyclip.checkpoints.open_clip import (
    CONFIG_NAME as OPEN_CLIP_CONFIG_NAME,
)
from polyclip.checkpoints.open_clip import (
    to_open_clip_config,
    to_open_clip_state_dict,
)
from polyclip.models import DualEncoderConfig
from polyclip.transforms import CLIP_PREPROCESS, SIGLIP_PREPROCESS

OPEN_CLIP_WEIGHTS_NAME = "open_clip_model.safetensors"


class ExportError(CheckpointError, NotImplementedError):
    """The target format cannot describe this model."""


# ---------------------------------------------------------------------------------------------------------
# transformers


# polyclip activation names -> transformers' ACT2FN names
HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
# transformers CLIP pools at the argmax token id when eos_token_id is 2 (configs saved before v4.31)
_HF_ARGMAX_EOS = 2


def _split_qkv(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused ``attn.qkv`` -> ``attn.q_proj``/``k_proj``/``v_proj``; MAP head q + kv -> ``in_proj``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"(.*\.attn)\.qkv\.(weight|bias)", key)
        if match and ".transformer.blocks." in key:
            # each part gets its own storage: safetensors refuses tensors that share memory
            for name, part in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[f"{match[1]}.{name}_proj.{match[2]}"] = part.clone()
            continue
        match = re.fullmatch(r"visual\.head\.attn\.q\.(weight|bias)", key)
        if match:
            out[f"visual.head.attn.in_proj_{match[1]}"] = torch.cat(
                [value, state_dict[f"visual.head.attn.kv.{match[1]}"]]
            )
            continue
        if re.fullmatch(r"visual\.head\.attn\.kv\.(weight|bias)", key):
            continue  # joined with q above
        out[key] = value
    return out


def _require(conditions: dict[str, bool], target: str) -> None:
    failed = [what for what, ok in conditions.items() if not ok]
    if failed:
        raise ExportError(f"{target} cannot describe this model: it needs {'; '.join(failed)}")


def hf_model_type(config: DualEncoderConfig) -> str:
    """Which transformers class describes this model ("clip" or "siglip"); ExportError if none does."""
    vision, text = config.vision, config.text
    if vision.kind == "resnet":
        raise ExportError(
            "transformers' CLIPModel has no ModifiedResNet image tower, so RN50-style models cannot be exported "
            "to transformers; use export_open_clip or polyclip.save instead"
        )
    for where, act in (("image", vision.act), ("text", text.act)):
        if act not in HF_ACTIVATIONS:
            raise ExportError(f"the {where} activation {act!r} has no transformers name")
    if vision.pool == "map":
        _require(
            {
                "no class token": not vision.class_token, "no pre-norm": not vision.pre_norm,
                "a patch bias": vision.patch_bias, "no image projection": not vision.projection,
                "a bidirectional text tower": not text.causal, "text pooled at the last position": text.pool == "last",
                "a text head with bias": text.projection and text.projection_bias,
                "a logit bias": config.init_logit_bias is not None,
            },
            "transformers' SiglipModel",
        )  # fmt: skip
        return "siglip"
    _require(
        {
            "a class token": vision.class_token, "a pre-norm": vision.pre_norm, "no patch bias": not vision.patch_bias,
            "an image projection": vision.projection, "a causal text tower": text.causal,
            "text pooled at the end token (argmax or eos)": text.pool in ("argmax", "eos"),
            "a text projection without bias": text.projection and not text.projection_bias,
            "no logit bias": config.init_logit_bias is None,
            "an eos_token_id other than 2 with eos pooling": text.pool != "eos" or text.eos_token_id != _HF_ARGMAX_EOS,
        },
        "transformers' CLIPModel",
    )  # fmt: skip
    return "clip"


def hf_config(config: DualEncoderConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The ``config.json`` of a transformers CLIPModel or SiglipModel."""
    model_type = hf_model_type(config)
    vision, text = config.vision, config.text
    vision_config = {
        "hidden_size": vision.width, "intermediate_size": vision.mlp_dim, "num_hidden_layers": vision.layers,
        "num_attention_heads": vision.heads, "image_size": vision.image_size, "patch_size": vision.patch_size,
        "hidden_act": HF_ACTIVATIONS[vision.act], "layer_norm_eps": vision.norm_eps, "num_channels": 3,
        "model_type": f"{model_type}_vision_model",
    }  # fmt: skip
    text_config = {
        "vocab_size": text.vocab_size, "hidden_size": text.width, "intermediate_size": text.mlp_dim,
        "num_hidden_layers": text.layers, "num_attention_heads": text.heads,
        "max_position_embeddings": text.context_length, "hidden_act": HF_ACTIVATIONS[text.act],
        "layer_norm_eps": text.norm_eps, "model_type": f"{model_type}_text_model",
    }  # fmt: skip
    dtype_name = str(dtype).removeprefix("torch.")
    if model_type == "clip":
        # argmax pooling is what transformers does for eos_token_id 2; otherwise the first eos position
        text_config["eos_token_id"] = _HF_ARGMAX_EOS if text.pool == "argmax" else text.eos_token_id
        text_config["projection_dim"] = config.embed_dim
        vision_config["projection_dim"] = config.embed_dim
        return {
            "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": config.embed_dim,
            "logit_scale_init_value": config.init_logit_scale, "text_config": text_config,
            "vision_config": vision_config, "dtype": dtype_name,
        }  # fmt: skip
    text_config["projection_size"] = config.embed_dim
    # SigLIP's vocabulary has no start token and pads with its end token; transformers' SiglipTextConfig
    # would otherwise default to CLIP's ids (49406, 49407), outside a 32000-token vocabulary
    text_config.update(bos_token_id=None, eos_token_id=text.eos_token_id, pad_token_id=text.eos_token_id)
    return {
        "architectures": ["SiglipModel"], "model_type": "siglip", "text_config": text_config,
        "vision_config": vision_config, "dtype": dtype_name,
    }  # fmt: skip


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """polyclip key names -> transformers' (the inverse of `polyclip.checkpoints.hf.convert_state_dict`)."""
    table = template_renames(hf.PAIRS[model_type], reverse=True)  # the reader's pairs, read backwards
    out = rename_keys(
        _split_qkv(state_dict),
        table,
        unmatched="raise",
        target=f"transformers {model_type}",
        error=ExportError,
    )
    if model_type == "siglip":
        for name in ("logit_scale", "logit_bias"):
            out[name] = out[name].reshape(1)  # SiglipModel keeps shape (1,)
    return out


_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}  # PIL's codes, as transformers stores them


def _preprocess_fields(preprocess_config: Any, model_type: str, image_size: int) -> dict[str, Any]:
    """PreprocessConfig fields from a PreprocessConfig, a dict of its fields, or the model's defaults."""
    if preprocess_config is None:  # the family's preset at the model's resolution
        preset = SIGLIP_PREPROCESS if model_type == "siglip" else CLIP_PREPROCESS
        return {**dataclasses.asdict(preset), "image_size": image_size}
    if dataclasses.is_dataclass(preprocess_config):
        fields = dataclasses.asdict(preprocess_config)
    elif isinstance(preprocess_config, dict):
        fields = dict(preprocess_config)
    elif hasattr(preprocess_config, "config"):  # a transform object carrying its PreprocessConfig
        return _preprocess_fields(preprocess_config.config, model_type, image_size)
    else:
        raise ExportError(
            f"preprocess_config must be a PreprocessConfig or a dict, not {type(preprocess_config).__name__}"
        )
    defaults = _preprocess_fields(None, model_type, image_size)
    return {**defaults, **fields}


def hf_preprocessor_config(fields: dict[str, Any], model_type: str) -> dict[str, Any]:
    """``preprocessor_config.json`` for CLIPImageProcessor or SiglipImageProcessor."""
    size = fields["image_size"]
    if fields["interpolation"] not in _RESAMPLE:
        raise ExportError(f"interpolation {fields['interpolation']!r} has no transformers equivalent")
    common = {
        "do_resize": True, "resample": _RESAMPLE[fields["interpolation"]], "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(fields["mean"]),
        "image_std": list(fields["std"]), "do_convert_rgb": True,
    }  # fmt: skip
    mode, crop_pct = fields["resize_mode"], fields.get("crop_pct", 1.0)
    if model_type == "siglip":
        if mode != "squash" or crop_pct != 1.0:
            raise ExportError(
                "SiglipImageProcessor only resizes to the exact size (resize_mode 'squash', crop_pct 1)"
            )
        return {
            "image_processor_type": "SiglipImageProcessor",
            **common,
            "size": {"height": size, "width": size},
        }
    if mode == "shortest":
        return {
            "image_processor_type": "CLIPImageProcessor", **common, "size": {"shortest_edge": math.floor(size / crop_pct + 1e-6)},
            "do_center_crop": True, "crop_size": {"height": size, "width": size},
        }  # fmt: skip
    if mode == "squash" and crop_pct == 1.0:
        return {
            "image_processor_type": "CLIPImageProcessor", **common, "size": {"height": size, "width": size},
            "do_center_crop": False, "crop_size": {"height": size, "width": size},
        }  # fmt: skip
    raise ExportError(f"CLIPImageProcessor cannot resize with mode {mode!r} and crop_pct {crop_pct}")


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)  # a killed export never leaves a half-written weights file


def export_hf(
    model: nn.Module, folder: str | Path, preprocess_config: Any = None, tokenizer: Any = None
) -> Path:
    """Write ``model`` as a transformers CLIPModel or SiglipModel folder: ``config.json``,
    ``model.safetensors``, ``preprocessor_config.json``, and the tokenizer's files when ``tokenizer`` is
    given (then ``AutoProcessor``, ``pipeline("zero-shot-image-classification")`` and
    ``SiglipModel(**processor(...))`` read the folder as the model was trained: a SigLIP tokenizer there
    returns no attention mask)."""
    config: DualEncoderConfig = model.config
    model_type = hf_model_type(config)
    fields = _preprocess_fields(preprocess_config, model_type, config.vision.image_size)
    preprocessor = hf_preprocessor_config(fields, model_type)
    weights = _weights(model)
    tensors = to_hf_state_dict(weights, model_type)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _save_safetensors(tensors, folder / "model.safetensors")
    dtype = next(v.dtype for v in weights.values() if v.is_floating_point())
    (folder / "config.json").write_text(json.dumps(hf_config(config, dtype), indent=2) + "\n")
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    if tokenizer is not None:
        _check_tokenizer(tokenizer, config)
        tokenizer.save_hf(folder)
    return folder


def _check_tokenizer(tokenizer: Any, config: DualEncoderConfig) -> None:
    if not hasattr(tokenizer, "save_hf"):
        raise ExportError(
            f"{type(tokenizer).__name__} cannot write transformers tokenizer files (no save_hf)"
        )
    if getattr(tokenizer, "vocab_size", config.text.vocab_size) > config.text.vocab_size:
        raise ExportError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, the text tower only {config.text.vocab_size}"
        )


# ---------------------------------------------------------------------------------------------------------
# open_clip


def open_clip_preprocess_config(fields: dict[str, Any]) -> dict[str, Any]:
    """open_clip's PreprocessCfg from PreprocessConfig fields (open_clip has no crop_pct)."""
    if fields.get("crop_pct", 1.0) != 1.0:
        raise ExportError("open_clip's preprocessing resizes straight to the crop size; crop_pct must be 1")
    return {
        "size": fields["image_size"], "mode": "RGB", "mean": list(fields["mean"]), "std": list(fields["std"]),
        "interpolation": fields["interpolation"], "resize_mode": fields["resize_mode"],
        "fill_color": fields.get("fill_color", 0),
    }  # fmt: skip


# The hub repo holding the English SentencePiece model (big_vision's c4-en, 32000 pieces) that every
# English SigLIP (v1) checkpoint of open_clip names as its hf_tokenizer_name
SIGLIP_C4_TOKENIZER = "timm/ViT-B-16-SigLIP"


def open_clip_record(
    config: DualEncoderConfig,
    preprocess_config: Any = None,
    hf_tokenizer_name: str | None = None,
    tokenizer: Any = None,
) -> tuple[dict[str, Any], str, bool]:
    """``open_clip_config.json``'s content, the image key layout and whether the text tower is CustomTextCLIP's.

    A SigLIP model needs its SentencePiece tokenizer named: ``text_cfg.hf_tokenizer_name`` (``hf_tokenizer_name``,
    by default the English SigLIP tokenizer's repo for a 32000-token vocabulary) and open_clip's cleaning.
    """
    from polyclip.tokenizers import SiglipTokenizer

    model_cfg, layout, custom_text = to_open_clip_config(config)
    sentencepiece = isinstance(tokenizer, SiglipTokenizer)
    if tokenizer is not None and not sentencepiece and layout == "timm":
        raise ExportError(
            f"open_clip's SigLIP models read a SentencePiece tokenizer, not {type(tokenizer).__name__}"
        )
    if sentencepiece:
        _check_tokenizer(tokenizer, config)
        if hf_tokenizer_name is None and config.text.vocab_size == 32000:
            hf_tokenizer_name = SIGLIP_C4_TOKENIZER
        if hf_tokenizer_name is None:
            raise ExportError(
                "name the hub repo of this SentencePiece tokenizer (hf_tokenizer_name=...): open_clip records "
                "one for hf-hub: loading"
            )
    elif hf_tokenizer_name is None and layout == "timm":
        raise ExportError(
            "a SigLIP model needs its SentencePiece tokenizer in the open_clip folder: pass tokenizer=... "
            "(or hf_tokenizer_name=... for one on the hub), or open_clip falls back to CLIP's BPE"
        )
    if hf_tokenizer_name:
        model_cfg["text_cfg"]["hf_tokenizer_name"] = hf_tokenizer_name
        lower = tokenizer is None or tokenizer.config.get("do_lower_case", True)
        # open_clip's "canonicalize" lower-cases and strips punctuation before the HF tokenizer's own
        # canonicalisation, as big_vision does; "whitespace" keeps the case
        model_cfg["text_cfg"]["tokenizer_kwargs"] = {"clean": "canonicalize" if lower else "whitespace"}
    model_type = "siglip" if layout == "timm" else "clip"
    fields = _preprocess_fields(preprocess_config, model_type, config.vision.image_size)
    return (
        {"model_cfg": model_cfg, "preprocess_cfg": open_clip_preprocess_config(fields)},
        layout,
        custom_text,
    )


def export_open_clip(
    model: nn.Module,
    folder: str | Path,
    preprocess_config: Any = None,
    hf_tokenizer_name: str | None = None,
    tokenizer: Any = None,
) -> Path:
    """Write ``model`` as an open_clip hub folder: ``open_clip_config.json`` + ``open_clip_model.safetensors``.

    A SigLIP model needs its SentencePiece tokenizer: pass ``tokenizer`` (a `SiglipTokenizer`) and its files
    are written beside the weights (``spiece.model``, ``tokenizer_config.json``), with
    ``text_cfg.hf_tokenizer_name`` set, so that open_clip's ``get_tokenizer("local-dir:FOLDER")`` builds it
    offline; ``hf_tokenizer_name`` is the hub repo named for ``hf-hub:`` loading. Without them open_clip
    would use CLIP's BPE, so a SigLIP model without either is refused. A CLIP model needs no tokenizer files
    (open_clip's default is CLIP's BPE).
    """
    config: DualEncoderConfig = model.config
    record, layout, custom_text = open_clip_record(config, preprocess_config, hf_tokenizer_name, tokenizer)
    tensors = to_open_clip_state_dict(_weights(model), layout, custom_text)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _save_safetensors(tensors, folder / OPEN_CLIP_WEIGHTS_NAME)
    (folder / OPEN_CLIP_CONFIG_NAME).write_text(json.dumps(record, indent=2) + "\n")
    if "hf_tokenizer_name" in record["model_cfg"]["text_cfg"] and tokenizer is not None:
        tokenizer.save_hf(folder)
    return folder


__all__ = [
    "SIGLIP_C4_TOKENIZER",
    "ExportError",
    "export_hf",
    "export_open_clip",
    "open_clip_record",
    "hf_config",
    "hf_model_type",
    "hf_preprocessor_config",
    "to_hf_state_dict",
]
