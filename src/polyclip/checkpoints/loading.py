"""Detect a checkpoint's format from the files present, read it, and build the model strictly.

The format is decided by which files exist (a folder's config file name, an archive's structure), and a
caller or the registry can name it outright; the architecture always comes from the checkpoint's config
(or, for OpenAI's bare state dicts, from its tensor shapes, as OpenAI's own loader does).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from polyclip.checkpoints.common import Checkpoint, CheckpointError, load_strict
from polyclip.models import ConfigError, DualEncoder, DualEncoderConfig

FORMATS = ("native", "hf", "open_clip", "openai", "flax", "onnx")


def detect_format(path: Path) -> str:
    if path.is_dir():
        from polyclip.onnx.manifest import is_onnx_folder

        if is_onnx_folder(path):  # an explicit marker file, written last by the exporter
            return "onnx"
        if (path / "polyclip_config.json").is_file():
            return "native"
        if (path / "open_clip_config.json").is_file():
            return "open_clip"
        if (path / "config.json").is_file():
            has_torch = any(
                (path / name).is_file()
                for name in (
                    "model.safetensors",
                    "pytorch_model.bin",
                    "model.safetensors.index.json",
                    "pytorch_model.bin.index.json",
                )
            )
            if has_torch:
                return "hf"
            if (path / "flax_model.msgpack").is_file():
                return "flax"
        raise CheckpointError(
            f"{path} is not a checkpoint folder polyclip knows: expected polyclip_config.json, "
            "open_clip_config.json, or a transformers config.json with model.safetensors, pytorch_model.bin "
            "or flax_model.msgpack"
        )
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    if path.suffix == ".msgpack":
        return "flax"
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt", ".safetensors"):
        return "openai"
    raise CheckpointError(f"{path}: unknown checkpoint file type {path.suffix!r}")


# What a reader raises when a file's content is not what its format promises (a string where a width
# belongs, a tensor of the wrong rank, a missing entry): the file is at fault, so the user is told which
# file and why, in one line, instead of a traceback.
_MALFORMED = (
    ValueError, TypeError, AttributeError, KeyError, IndexError, ZeroDivisionError, OverflowError,
    RecursionError, RuntimeError,
)  # fmt: skip


def read_checkpoint(path: str | Path, format: str | None = None) -> Checkpoint:
    path = Path(path).expanduser()
    format = format or detect_format(path)
    try:
        return _read(path, format)
    except CheckpointError:
        raise
    except ConfigError as error:
        raise CheckpointError(f"{path}: the checkpoint's config describes no valid model: {error}") from error
    except _MALFORMED as error:
        raise CheckpointError(
            f"{path}: malformed {format} checkpoint ({type(error).__name__}: {error})"
        ) from error


def _read(path: Path, format: str) -> Checkpoint:
    if format == "native":
        from polyclip.checkpoints.native import read_native

        return read_native(path)
    if format == "hf":
        from polyclip.checkpoints.hf import read_hf

        return read_hf(path)
    if format == "open_clip":
        from polyclip.checkpoints.open_clip import read_open_clip

        return read_open_clip(path)
    if format == "openai":
        from polyclip.checkpoints.openai import read_openai

        return read_openai(path)
    if format == "flax":
        from polyclip.checkpoints.flax import read_flax

        return read_flax(path)
    if format == "onnx":
        raise CheckpointError(
            f"{path} holds ONNX graphs, not weights: polyclip.load runs it through onnxruntime (inference only); "
            "convert or fine-tune the checkpoint it was exported from"
        )
    raise CheckpointError(f"unknown checkpoint format {format!r}; expected one of {FORMATS}")


def build_model(checkpoint: Checkpoint) -> DualEncoder:
    """The model with the checkpoint's weights, created on the meta device so weights are held once."""
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in checkpoint.state_dict.items()}
    keep_released_logit_scale(checkpoint.config, state_dict)
    with torch.device("meta"):
        model = DualEncoder(checkpoint.config)
    checkpoint.state_dict = {}  # drop the reference: the model now owns the tensors
    load_strict(model, state_dict, str(checkpoint.source))
    return model.eval()


def keep_released_logit_scale(config: DualEncoderConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise the config's logit-scale cap to the checkpoint's own value when it is above it.

    The references apply ``exp(logit_scale)`` unclamped at inference; OpenAI's fp16 archives store
    log(100) rounded up (4.6055 > 4.6052) and released SigLIP checkpoints learned values above log(100),
    so the default cap would change their logits.
    """
    scale = state_dict.get("logit_scale")
    if scale is not None and scale.numel() == 1 and float(scale) > config.logit_scale_max:
        config.logit_scale_max = float(scale)


def is_torchscript_archive(path: Path) -> bool:
    """OpenAI's released .pt files are TorchScript archives (zip with a ``code/`` folder)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.startswith("code/") for name in archive.namelist())


def describe(path: str | Path, format: str | None = None) -> dict:
    """What ``polyclip info`` prints: format, architecture, parameter count, preprocessing."""
    checkpoint = read_checkpoint(path, format)
    if not checkpoint.state_dict:
        raise CheckpointError(f"{path} holds no weights")
    params = sum(t.numel() for t in checkpoint.state_dict.values() if t.is_floating_point())
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in checkpoint.state_dict.values()})
    return {
        "path": str(path),
        "format": checkpoint.format,
        "parameters": params,
        "config_parameters": checkpoint.config.parameter_count(),
        "dtype": ", ".join(dtypes),
        "model": checkpoint.config.to_dict(),
        "preprocess": checkpoint.preprocess,
        "tokenizer": checkpoint.tokenizer,
        "notes": checkpoint.notes,
    }


__all__ = ["FORMATS", "build_model", "describe", "detect_format", "read_checkpoint"]
