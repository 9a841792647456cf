"""name -> files -> checkpoint -> model, preprocessing and tokenizer. A screen of code per step."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from polyclip.checkpoints import CheckpointError, build_model, detect_format, read_checkpoint
from polyclip.checkpoints.loading import is_torchscript_archive
from polyclip.checkpoints.native import write_native
from polyclip.checkpoints.open_clip import HUB_FILE_PREFIX
from polyclip.hub import ModelNotFoundError, RegistryEntry, hub_file, resolve
from polyclip.models import (
    CLIP_VOCAB_SIZE,
    ConfigError,
    DualEncoder,
    DualEncoderConfig,
    create_model,
    get_architecture,
    open_clip_architecture,
)
from polyclip.quantization import quantize_model
from polyclip.tokenizers import (
    MissingTokenizerError,
    UnavailableTokenizer,
    build_tokenizer,
    tokenizer_from_hf_folder,
)
from polyclip.transforms import (
    FAMILY_PRESETS,
    FORMAT_CONVENTIONS,
    PRESETS,
    ImageTransform,
    PreprocessConfig,
    build_preprocess,
)

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
    architecture: str | DualEncoderConfig | None = None,
) -> tuple[DualEncoder, ImageTransform, Any]:
    """Load a released checkpoint by registry name, ``hf-hub:org/repo``, or a local folder or file.

    Returns ``(model, preprocess, tokenizer)``: the model in eval mode on ``device`` in ``dtype``
    (default fp32, whatever the file stores), the image preprocessing of the checkpoint's reference
    implementation, and its tokenizer. ``compile=True`` compiles both towers with torch.compile
    (``compile="max-autotune"`` also tunes the GEMM kernels and, on a GPU, replays CUDA graphs);
    ``quantize="int8"`` applies dynamic int8 quantisation to the linear layers (CPU inference);
    ``quantize="fp8"`` runs the transformer blocks' linear layers as FP8 products (GPUs with FP8 tensor
    cores, ``dtype="bf16"``): see :mod:`polyclip.quantization`.

    ``architecture`` names what a plain state dict does not say (its activation), with open_clip's names:
    ``"ViT-B-32"`` is open_clip's GELU model, ``"ViT-B-32-quickgelu"`` OpenAI's (see
    `polyclip.models.open_clip_architecture`). The file's shapes must match it. Without it a plain state
    dict is read as OpenAI's QuickGELU, with a warning. A `DualEncoderConfig` may be given instead of a name.
    """
    path, entry, entry_format = resolve(name_or_path)
    format = format or entry_format or detect_format(path)
    if format == "onnx":  # graphs, not weights: run through onnxruntime
        from polyclip.onnx.runtime import load_onnx

        return load_onnx(path, device, dtype, compile, quantize)
    checkpoint = read_checkpoint(path, format)
    if entry is not None:
        _check_architecture(entry, checkpoint.config)
    if architecture is not None:
        if isinstance(architecture, DualEncoderConfig):
            _apply_architecture(checkpoint, architecture, "given")
        else:
            _apply_architecture(checkpoint, open_clip_architecture_or_error(architecture), architecture)
    elif entry is not None and checkpoint.format == "openai":
        _apply_architecture(checkpoint, get_architecture(entry.architecture), entry.architecture)
    elif _activation_assumed(checkpoint, path):
        name = _matching_open_clip_name(checkpoint.config)
        choices = (
            f"architecture='{name}-quickgelu' (OpenAI's, as assumed) or '{name}' (open_clip's GELU)"
            if name
            else "architecture= (an open_clip name, or a DualEncoderConfig)"
        )
        message = (
            f"{path} is a plain state dict, which does not say its activation: read as OpenAI's QuickGELU. "
            "open_clip models trained with exact GELU (its ViT-B-32, ViT-B-16, ViT-L-14, RN50... without "
            f"'-quickgelu') come out slightly wrong so; say which with {choices} (--arch on the command line)"
        )
        checkpoint.notes.append(message)
        warnings.warn(message, stacklevel=2)
    folder = path if path.is_dir() else path.parent
    preprocess = build_preprocess(_preprocess_config(entry, checkpoint.preprocess, checkpoint.config))
    tokenizer = _tokenizer(entry, checkpoint.tokenizer, checkpoint.config, folder)
    model = build_model(checkpoint)
    return finalize(model, device, dtype, compile, quantize), preprocess, tokenizer


def create_model_and_transforms(
    arch: str | DualEncoderConfig | dict,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    preprocess: str | dict | PreprocessConfig | None = None,
    tokenizer: dict | Any | None = None,
) -> tuple[DualEncoder, ImageTransform, Any]:
    """A randomly initialised model with its preprocessing and tokenizer: ``(model, preprocess, tokenizer)``.

    The counterpart of open_clip's ``create_model_and_transforms`` + ``get_tokenizer`` for an
    architecture without weights (to train from scratch, or to test): the preprocessing is the
    family's (CLIP's or SigLIP's preset at the tower's image size) unless ``preprocess`` names a preset
    or gives a config; the tokenizer is CLIP's BPE at the text tower's context length for a
    49408-token vocabulary. Other vocabularies (SigLIP's SentencePiece) need their tokenizer passed,
    as a tokenizer or a config dict such as ``{"type": "siglip", "spiece_model": "spiece.model"}``.
    The model is in eval mode; ``polyclip.save`` writes all three, and ``load`` reads them back.
    """
    model = create_model(arch)
    config = model.config
    if preprocess is None:
        preprocess = default_preprocess(config)
    elif isinstance(preprocess, str):
        preprocess = _preset(preprocess, config)
    transform = build_preprocess(preprocess)
    if tokenizer is None:
        if config.text.vocab_size != CLIP_VOCAB_SIZE:  # the BPE vocabulary shipped with polyclip
            raise ValueError(
                f"architecture {arch if isinstance(arch, str) else 'config'} has a {config.text.vocab_size}-token "
                "vocabulary, not CLIP's: pass tokenizer=..., e.g. {'type': 'siglip', 'spiece_model': "
                "'spiece.model'}"
            )
        tokenizer = {"type": "clip", "context_length": config.text.context_length}
    if isinstance(tokenizer, dict):
        tokenizer = build_tokenizer(tokenizer)
    return finalize(model, device, dtype), transform, tokenizer


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


def _preset(name: str, config: DualEncoderConfig) -> dict[str, Any]:
    """A preprocessing preset at the image size of the model's tower."""
    if name not in PRESETS:
        raise ValueError(f"unknown preprocessing preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name].to_dict() | {"image_size": config.vision.image_size}


def _preprocess_config(entry: RegistryEntry | None, recorded: dict | None, config: DualEncoderConfig):
    """The registry's preprocessing (a preset, inline fields or "recorded"), else what the files record.

    The family presets and inline tables leave the order and rounding to the format: a CLIP model
    published as a transformers folder is preprocessed as CLIPImageProcessor does, one published as an
    open_clip folder as open_clip does (see polyclip.transforms).
    """
    if entry is None or entry.preprocess == "recorded":
        return recorded or default_preprocess(config)
    spec = entry.preprocess
    convention = {"convention": FORMAT_CONVENTIONS.get(entry.format, "torchvision")}
    if isinstance(spec, str):
        fields = PRESETS[spec].to_dict() | {"image_size": config.vision.image_size}
        return fields | convention if spec in FAMILY_PRESETS else fields
    return convention | spec


def _tokenizer(entry: RegistryEntry | None, recorded: dict | None, config: DualEncoderConfig, folder: Path):
    """The checkpoint's tokenizer; an `UnavailableTokenizer` (with a warning) when its files cannot be had,
    so that the image tower is usable anyway."""
    spec = dict(entry.tokenizer) if entry is not None else recorded
    if spec is None or spec.get("type") == "folder":
        context = (spec or {}).get("context_length") or config.text.context_length
        try:
            return tokenizer_from_hf_folder(folder, context_length=context)
        except MissingTokenizerError:
            if config.text.vocab_size != CLIP_VOCAB_SIZE:
                return _unavailable(
                    f"{folder} holds no tokenizer files and its vocabulary ({config.text.vocab_size} tokens) is "
                    "not CLIP's: put the model's tokenizer files (e.g. spiece.model) in the folder"
                )
            spec = {"type": "clip", "context_length": context}
    for key in ("spiece_model", "tokenizer_file", "tokenizer_config"):  # SigLIP's and SigLIP 2's files
        value = str(spec.get(key, ""))
        if not value.startswith(HUB_FILE_PREFIX):
            continue
        # an open_clip folder naming its tokenizer's hub repo (hf_tokenizer_name) without the files
        repo_id, _, filename = value.removeprefix(HUB_FILE_PREFIX).rpartition("/")
        try:
            spec = {**spec, key: str(hub_file(repo_id, filename))}
        except ModelNotFoundError as error:
            return _unavailable(f"the tokenizer of {folder} cannot be built: {error}")
    return build_tokenizer(spec, model_dir=folder)


def _unavailable(message: str) -> UnavailableTokenizer:
    warnings.warn(
        f"{message}\nThe image tower is loaded; encoding text raises until the tokenizer is there.",
        stacklevel=4,
    )
    return UnavailableTokenizer(message)


def open_clip_architecture_or_error(name: str) -> DualEncoderConfig:
    try:
        return open_clip_architecture(name)
    except ConfigError as error:
        raise CheckpointError(str(error)) from None


def _matching_open_clip_name(config: DualEncoderConfig) -> str | None:
    """The open_clip architecture whose sizes the checkpoint has (e.g. "ViT-B-32"), if one does."""
    from polyclip.models.architectures import OPEN_CLIP_GELU_OF

    return next((n for n in OPEN_CLIP_GELU_OF if not _architecture_diffs(get_architecture(n), config)), None)


def _activation_assumed(checkpoint, path: Path) -> bool:
    """A state dict without a config (not one of OpenAI's TorchScript archives, which are QuickGELU)."""
    return checkpoint.format == "openai" and not is_torchscript_archive(path)


def _apply_architecture(checkpoint, expected: DualEncoderConfig, name: str) -> None:
    """Take what shapes cannot say (the activation) from ``expected``; refuse where the file disagrees."""
    diffs = _architecture_diffs(expected, checkpoint.config)
    if diffs:
        raise CheckpointError(
            f"{checkpoint.source} does not have the sizes of architecture {name}: " + "; ".join(diffs)
        )
    config = checkpoint.config
    towers = [("text", config.text, expected.text)]
    if config.vision.kind == "vit":
        towers.append(("image", config.vision, expected.vision))
    for where, ours, theirs in towers:
        if ours.act == theirs.act:
            continue
        if checkpoint.format != "openai":  # the other formats record their activation
            raise CheckpointError(
                f"{checkpoint.source} records the {where} activation {ours.act!r}; architecture {name} has "
                f"{theirs.act!r}"
            )
        ours.act = theirs.act
        checkpoint.notes.append(f"{where} activation {theirs.act!r} from architecture {name}")


def _check_architecture(entry: RegistryEntry, config: DualEncoderConfig) -> None:
    """A registry entry names the architecture its weights must build; refuse anything else."""
    diffs = _architecture_diffs(get_architecture(entry.architecture), config)
    if diffs:
        raise CheckpointError(
            f"registry entry {entry.name!r} expects architecture {entry.architecture} but its files build "
            "another one: " + "; ".join(diffs)
        )


def _architecture_diffs(expected: DualEncoderConfig, config: DualEncoderConfig) -> list[str]:
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
    return diffs


__all__ = ["create_model", "create_model_and_transforms", "finalize", "load", "save"]
