"""name -> files -> checkpoint -> model, preprocessing and tokenizer. A screen of code per step."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from polyclip.checkpoints import CheckpointError, build_model, read_checkpoint
from polyclip.checkpoints.native import write_native
from polyclip.hub import RegistryEntry, resolve
from polyclip.models import DualEncoder, DualEncoderConfig, create_model, get_architecture
from polyclip.tokenizers import MissingTokenizerError, build_tokenizer, tokenizer_from_hf_folder
from polyclip.transforms import PRESETS, ImageTransform, PreprocessConfig, build_preprocess

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def load(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    compile: bool = False,
    quantize: str | None = None,
    format: str | None = None,
) -> tuple[DualEncoder, ImageTransform, Any]:
    """Load a released checkpoint by registry name, ``hf-hub:org/repo``, or a local folder or file.

    Returns ``(model, preprocess, tokenizer)``: the model in eval mode on ``device`` in ``dtype``
    (default fp32, whatever the file stores), the image preprocessing of the checkpoint's reference
    implementation, and its tokenizer. ``compile=True`` compiles both towers with torch.compile;
    ``quantize="int8"`` applies dynamic int8 quantisation to the linear layers (CPU inference).
    """
    path, entry, entry_format = resolve(name_or_path)
    checkpoint = read_checkpoint(path, format or entry_format)
    if entry is not None:
        _check_architecture(entry, checkpoint.config)
    folder = path if path.is_dir() else path.parent
    preprocess = build_preprocess(_preprocess_config(entry, checkpoint.preprocess, checkpoint.config))
    tokenizer = _tokenizer(entry, checkpoint.tokenizer, checkpoint.config, folder)
    model = build_model(checkpoint)
    return finalize(model, device, dtype, compile, quantize), preprocess, tokenizer


def finalize(
    model: DualEncoder,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    compile: bool = False,
    quantize: str | None = None,
) -> DualEncoder:
    """Move, cast, quantise and compile a model for inference."""
    dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if isinstance(dtype, str):
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    model = model.to(device=device or "cpu", dtype=dtype or torch.float32).eval()
    if quantize is not None:
        if quantize != "int8":
            raise ValueError(f"quantize={quantize!r} is not supported; the supported mode is 'int8'")
        if model.device.type != "cpu" or model.dtype != torch.float32:
            raise ValueError(
                "int8 dynamic quantisation runs on CPU from fp32 weights (device='cpu', dtype=None)"
            )
        quantize_int8(model)
    if compile:
        # freezing: weights become constants that inductor can prepack for its GEMMs (inference only;
        # compile a training model yourself)
        model.visual.compile(dynamic=False, options={"freezing": True})
        model.text.compile(dynamic=True, options={"freezing": True})  # prompt lengths vary after trimming
    return model


def int8_layers(model: DualEncoder) -> list[str]:
    """The linear layers int8 mode quantises: every one of the image tower, and the text tower's MLPs.

    The text tower's attention projections stay fp32: its single pooled end-token state is sensitive to
    their rounding (cosine to fp32 drops below 0.999 with them), and MLPs hold two thirds of its FLOPs.
    """
    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (name.startswith("visual.") or ".mlp." in name):
            names.append(name)
    return names


def quantize_int8(model: DualEncoder) -> DualEncoder:
    """Dynamic int8 quantisation (per-channel weights, activations quantised per batch), in place."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch marks the eager quantisation API deprecated
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        spec = {name: per_channel_dynamic_qconfig for name in int8_layers(model)}
        return quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)


def save(
    model: DualEncoder,
    preprocess: ImageTransform | PreprocessConfig | dict | None,
    tokenizer: Any,
    directory: str | os.PathLike,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write polyclip's own folder (``polyclip_config.json`` + ``model.safetensors``)."""
    if isinstance(preprocess, ImageTransform):
        preprocess = preprocess.config
    if isinstance(preprocess, PreprocessConfig):
        preprocess = preprocess.to_dict()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # a tokenizer with files of its own (SigLIP's spiece.model) copies them next to the weights
    tokenizer_config = (
        tokenizer.save(directory) if hasattr(tokenizer, "save") else getattr(tokenizer, "config", tokenizer)
    )
    return write_native(directory, model.config, model.state_dict(), preprocess, tokenizer_config, extra)


def default_preprocess(config: DualEncoderConfig) -> dict[str, Any]:
    """The preprocessing a config's family uses when its checkpoint records none."""
    preset = PRESETS["siglip" if config.uses_sigmoid else "clip"]
    return {**preset.to_dict(), "image_size": config.vision.image_size}


def _preprocess_config(entry: RegistryEntry | None, recorded: dict | None, config: DualEncoderConfig):
    if entry is not None:
        spec = entry.preprocess
        return (
            PRESETS[spec].to_dict() | {"image_size": config.vision.image_size}
            if isinstance(spec, str)
            else spec
        )
    return recorded or default_preprocess(config)


def _tokenizer(entry: RegistryEntry | None, recorded: dict | None, config: DualEncoderConfig, folder: Path):
    spec = dict(entry.tokenizer) if entry is not None else recorded
    if spec is None or spec.get("type") == "folder":
        context = (spec or {}).get("context_length") or config.text.context_length
        try:
            return tokenizer_from_hf_folder(folder, context_length=context)
        except MissingTokenizerError:
            if config.text.vocab_size != 49408:
                raise CheckpointError(
                    f"{folder} holds no tokenizer files and its vocabulary ({config.text.vocab_size} tokens) is "
                    "not CLIP's: put the model's tokenizer files (e.g. spiece.model) in the folder"
                ) from None
            spec = {"type": "clip", "context_length": context}
    return build_tokenizer(spec, model_dir=folder)


def _check_architecture(entry: RegistryEntry, config: DualEncoderConfig) -> None:
    """A registry entry names the architecture its weights must build; refuse anything else."""
    expected = get_architecture(entry.architecture)
    vision_fields = ("kind", "image_size") + (
        ("resnet_layers", "resnet_width")
        if expected.vision.kind == "resnet"
        else ("patch_size", "width", "layers", "heads", "pool")
    )
    fields = {"vision": vision_fields, "text": ("vocab_size", "width", "layers", "heads", "causal")}
    diffs = []
    for tower, names in fields.items():
        for name in names:
            want, got = getattr(getattr(expected, tower), name), getattr(getattr(config, tower), name)
            if want != got:
                diffs.append(f"{tower}.{name}: expected {want}, checkpoint has {got}")
    if config.embed_dim != expected.embed_dim:
        diffs.append(f"embed_dim: expected {expected.embed_dim}, checkpoint has {config.embed_dim}")
    if diffs:
        raise CheckpointError(
            f"registry entry {entry.name!r} expects architecture {entry.architecture} but its files build "
            "another one: " + "; ".join(diffs)
        )


__all__ = ["create_model", "finalize", "load", "save"]
