"""name -> files -> checkpoint -> model, preprocessing and tokenizer. A screen of code per step."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from polyclip.checkpoints import CheckpointError, build_model, detect_format, read_checkpoint
from polyclip.checkpoints.native import write_native
from polyclip.hub import RegistryEntry, resolve
from polyclip.models import DualEncoder, DualEncoderConfig, create_model, get_architecture
from polyclip.quantization import quantize_model
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
    compile: bool | str = False,
    quantize: str | None = None,
    format: str | None = None,
) -> tuple[DualEncoder, ImageTransform, Any]:
    """Load a released checkpoint by registry name, ``hf-hub:org/repo``, or a local folder or file.

    Returns ``(model, preprocess, tokenizer)``: the model in eval mode on ``device`` in ``dtype``
    (default fp32, whatever the file stores), the image preprocessing of the checkpoint's reference
    implementation, and its tokenizer. ``compile=True`` compiles both towers with torch.compile
    (``compile="max-autotune"`` also tunes the GEMM kernels and, on a GPU, replays CUDA graphs);
    ``quantize="int8"`` applies dynamic int8 quantisation to the linear layers (CPU inference);
    ``quantize="fp8"`` runs the transformer blocks' linear layers as FP8 products (GPUs with FP8 tensor
    cores, ``dtype="bf16"``): see :mod:`polyclip.quantization`.
    """
    path, entry, entry_format = resolve(name_or_path)
    format = format or entry_format or detect_format(path)
    if format == "onnx":  # graphs, not weights: run through onnxruntime
        from polyclip.onnx.runtime import load_onnx

        return load_onnx(path, device, dtype, compile, quantize)
    checkpoint = read_checkpoint(path, format)
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
    compile: bool | str = False,
    quantize: str | None = None,
) -> DualEncoder:
    """Move, cast, quantise and compile a model for inference."""
    dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if isinstance(dtype, str):
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    model = model.to(device=device or "cpu", dtype=dtype or torch.float32).eval()
    if quantize is not None:
        quantize_model(model, quantize)
    if compile:
        options = compile_options(compile, model.device)
        model.visual.compile(dynamic=False, options=options)
        model.text.compile(dynamic=True, options=options)  # prompt lengths vary after trimming
    return model


COMPILE_MODES = ("default", "max-autotune")


def compile_options(mode: bool | str, device: torch.device) -> dict[str, Any]:
    """inductor options for ``compile=True`` / ``"default"`` / ``"max-autotune"`` (inference only).

    Freezing always: the weights become constants that inductor can prepack for its GEMMs, so a
    compiled model is for inference (compile a training model yourself). max-autotune benchmarks
    GEMM and convolution kernels at compile time, and on CUDA replays the tower as a CUDA graph
    (one launch per call instead of one per kernel: what small batches are bound by).
    """
    mode = "default" if mode is True else mode
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile={mode!r}: use True, False or one of {', '.join(COMPILE_MODES)}")
    options: dict[str, Any] = {"freezing": True}
    if mode == "max-autotune":
        options |= {"max_autotune": True, "triton.cudagraphs": torch.device(device).type == "cuda"}
    return options


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
