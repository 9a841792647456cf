"""Export a dual encoder to two ONNX graphs (image tower, text tower) with its preprocessing and tokenizer.

The folder written (``polyclip export-onnx MODEL --out DIR``, or ``export_onnx``):

    polyclip_onnx.json   manifest: opset, graphs, model config, temperature, preprocess, tokenizer
    image.onnx           pixels (batch, 3, S, S) float32 -> image_features (batch, E), unnormalised
    text.onnx            token_ids (batch, length) int64 -> text_features (batch, E), unnormalised
    spiece.model ...     the tokenizer's own files, as ``polyclip.save`` copies them

Batch is dynamic in both graphs. A causal (CLIP) text tower also takes any length up to its context
length: it never looks past the pooled end token, so the runtime cuts the padding as the eager model does.
A bidirectional (SigLIP) tower attends over its padding, so its graph takes exactly ``context_length``.

Exporter: ``torch.onnx.export(..., dynamo=True)``, the torch.export-based exporter (needs ``onnxscript``).
It is the default since torch 2.9; the TorchScript-based exporter still runs under torch 2.13 but emits a
DeprecationWarning on every call and is no longer developed. The dynamo exporter is slower (seconds per
tiny graph rather than a fraction of one), which matters only at export time; both gave the same
numbers on polyclip's towers (within 1e-6 relative of eager). Weights over 1.5 GiB per graph go to an
external data file beside the graph (``<graph>.onnx.data``), because protobuf caps one file at 2 GiB.

Each graph is checked after export: onnxruntime runs a batch of another size than the export example
and its output must match eager within ``CHECK_TOLERANCE`` (the largest relative difference is kept in
the manifest).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polyclip.onnx.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    OnnxFolderError,
    is_onnx_folder,
    write_manifest,
)

OPSET = 20
CHECK_TOLERANCE = 1e-4  # max |onnx - eager| / max |eager| over the check batch, fp32
EXTERNAL_DATA_BYTES = 3 << 29  # 1.5 GiB of weights in one graph: move them to a .data file
IMAGE_INPUT, IMAGE_OUTPUT = "pixels", "image_features"
TEXT_INPUT, TEXT_OUTPUT = "token_ids", "text_features"


class OnnxExportError(RuntimeError):
    """The exporter failed, or its graph does not reproduce the eager model."""


class ImageGraph(nn.Module):
    """The image tower as exported: (B, 3, S, S) float32 -> (B, E) unnormalised features."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.visual = model.visual

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)


class TextGraph(nn.Module):
    """The text tower as exported: (B, L) int64 -> (B, E) unnormalised features.

    The eager tower's forward cuts a causal batch to its longest prompt with a data-dependent slice
    (``int(positions.max())``), which a graph cannot hold; here the graph runs on the length it is
    given and the runtime does the cut before calling it (same numbers: a causal tower never looks past
    the pooled token).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.text = model.text

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        positions = self.text.pool_positions(token_ids)  # (B,)
        x = self.text.forward_features(token_ids)  # (B, L, D)
        pooled = x[torch.arange(x.shape[0], device=x.device), positions]  # (B, D)
        return self.text.proj(pooled) if self.text.proj is not None else pooled


def _check_exportable(model: nn.Module) -> None:
    if not (hasattr(model, "visual") and hasattr(model, "text") and hasattr(model, "config")):
        raise ValueError("export_onnx takes a polyclip dual encoder (polyclip.load or polyclip.create_model)")
    floats = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if floats != {torch.float32}:
        raise ValueError(
            f"export from fp32 weights (the model holds {sorted(map(str, floats))}); load it with dtype=None"
        )
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("export from a model on the CPU (model.cpu())")
    if any("quantized" in type(m).__module__ for m in model.modules()):
        raise ValueError("export from the fp32 model, not an int8-quantised one")


def _prepare_out(out: Path, overwrite: bool) -> Path:
    """The staging folder beside ``out``; refuse to replace anything that is not a previous export."""
    if out.exists():
        if not out.is_dir():
            raise OnnxFolderError(f"{out} exists and is not a folder")
        if any(out.iterdir()):
            if not is_onnx_folder(out):
                raise OnnxFolderError(
                    f"{out} is not empty and is not an exported ONNX folder; choose another --out"
                )
            if not overwrite:
                raise OnnxFolderError(
                    f"{out} already holds an ONNX export; pass overwrite=True (--overwrite) to replace it"
                )
    stage = out.with_name(f".{out.name}.partial")
    if stage.exists():
        shutil.rmtree(stage)  # a previous export that was killed
    stage.mkdir(parents=True)
    return stage


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs per-op notes (optional torchvision ops absent, constant folding skipped)."""
    loggers = [
        logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "torch.export", "torch._dynamo")
    ]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _export_graph(
    module: nn.Module,
    example: torch.Tensor,
    path: Path,
    input_name: str,
    output_name: str,
    dims: dict[int, Any],
    opset: int,
) -> list[str]:
    """One graph to ``path``; returns the names of the files written (graph, and external data if any)."""
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    try:
        with _quiet_exporter(), torch.no_grad():
            torch.onnx.export(
                module.eval(),
                (example,),
                str(path),
                input_names=[input_name],
                output_names=[output_name],
                dynamic_shapes=(dims,),  # by position: the forward takes one tensor
                opset_version=opset,
                dynamo=True,
                external_data=external,
                verbose=False,
            )
    except ImportError as error:
        raise ImportError(
            f"ONNX export needs onnx and onnxscript: pip install 'polyclip[onnx]' ({error})"
        ) from None
    except Exception as error:  # the exporter's own errors are many types; name the graph that failed
        raise OnnxExportError(f"exporting {path.name} failed: {type(error).__name__}: {error}") from error
    files = [path.name]
    if (path.parent / f"{path.name}.data").is_file():
        files.append(f"{path.name}.data")
    return files


def files_sha256(folder: Path, files: list[str]) -> str:
    digest = hashlib.sha256()
    for name in files:
        with open(folder / name, "rb") as handle:
            while block := handle.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def _graph_opset(path: Path) -> int:
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in graph.opset_import if entry.domain in ("", "ai.onnx"))


def _relative_difference(got, want: torch.Tensor) -> float:
    got = torch.from_numpy(got)
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def _check_graph(path: Path, input_name: str, inputs: torch.Tensor, expected: torch.Tensor) -> float:
    from polyclip.onnx.runtime import cpu_session

    session = cpu_session(path)
    output = session.run(None, {input_name: inputs.numpy()})[0]
    if output.shape != tuple(expected.shape):
        raise OnnxExportError(
            f"{path.name}: onnxruntime returned shape {output.shape}, eager {tuple(expected.shape)}"
        )
    difference = _relative_difference(output, expected)
    if not difference <= CHECK_TOLERANCE:
        raise OnnxExportError(
            f"{path.name}: onnxruntime differs from eager by {difference:.2e} relative (tolerance {CHECK_TOLERANCE:.0e})"
        )
    return difference


_CHECK_PROMPTS = ["a photo of a cat", "a diagram", "satellite image of a harbour with many boats", "x"]


def export_onnx(
    model: nn.Module,
    preprocess: Any,
    tokenizer: Any,
    out: str | Path,
    opset: int = OPSET,
    source: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model``'s towers as ONNX graphs, and its preprocessing and tokenizer, to the folder ``out``.

    ``preprocess`` and ``tokenizer`` are those ``polyclip.load`` returns (their records go into the
    manifest as ``polyclip.save`` writes them). Returns ``out``. ``polyclip.load(out)`` runs the export
    through onnxruntime.
    """
    _check_exportable(model)
    out = Path(out).expanduser()
    config = model.config
    was_training = model.training
    model.eval()
    stage = _prepare_out(out, overwrite)
    try:
        size, context = config.vision.image_size, config.text.context_length
        generator = torch.Generator().manual_seed(0)
        batch = torch.export.Dim("batch", max=1 << 16)
        graphs: dict[str, dict[str, Any]] = {}

        # image tower: exported at batch 2, checked at batch 3
        image_files = _export_graph(
            ImageGraph(model),
            torch.randn(2, 3, size, size, generator=generator),
            stage / "image.onnx",
            IMAGE_INPUT,
            IMAGE_OUTPUT,
            {0: batch},
            opset,
        )
        pixels = torch.randn(3, 3, size, size, generator=generator)
        with torch.no_grad():
            expected = model.encode_image(pixels)
        graphs["image"] = {
            "files": image_files,
            "input": IMAGE_INPUT,
            "input_shape": ["batch", 3, size, size],
            "output": IMAGE_OUTPUT,
            "output_shape": ["batch", config.embed_dim],
            "check_relative_difference": _check_graph(stage / "image.onnx", IMAGE_INPUT, pixels, expected),
        }

        # text tower: the tokenizer's own ids, so pooling finds real end tokens
        causal = bool(config.text.causal)
        dims = {0: batch, 1: torch.export.Dim("length", min=2, max=context)} if causal else {0: batch}
        tokens = tokenizer(_CHECK_PROMPTS).long()  # (4, context)
        text_files = _export_graph(
            TextGraph(model), tokens[:2].clone(), stage / "text.onnx", TEXT_INPUT, TEXT_OUTPUT, dims, opset
        )
        check_tokens = (tokens[:, : min(context, 24)] if causal else tokens).clone()  # another length
        if causal:
            check_tokens[:, -1] = tokens.max()  # every row keeps an end token (the largest id) inside the cut
        with torch.no_grad():
            expected = model.encode_text(check_tokens)
        graphs["text"] = {
            "files": text_files,
            "input": TEXT_INPUT,
            "input_shape": ["batch", "length" if causal else context],
            "output": TEXT_OUTPUT,
            "output_shape": ["batch", config.embed_dim],
            "dynamic_length": causal,
            "check_relative_difference": _check_graph(
                stage / "text.onnx", TEXT_INPUT, check_tokens, expected
            ),
        }
        for entry in graphs.values():
            entry["sha256"] = files_sha256(stage, entry["files"])

        tokenizer_record = (
            tokenizer.save(stage) if hasattr(tokenizer, "save") else getattr(tokenizer, "config", None)
        )
        preprocess_config = getattr(preprocess, "config", preprocess)
        import onnxscript

        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "opset": _graph_opset(stage / "image.onnx"),
            "exporter": {
                "name": "torch.onnx.export(dynamo=True)",
                "torch": torch.__version__,
                "onnxscript": onnxscript.__version__,
            },
            "source": source,
            "model": config.to_dict(),
            "logit_scale": float(model.logit_scale.detach()),
            "logit_bias": None if model.logit_bias is None else float(model.logit_bias.detach()),
            "preprocess": preprocess_config.to_dict()
            if hasattr(preprocess_config, "to_dict")
            else preprocess_config,
            "tokenizer": tokenizer_record,
            "graphs": graphs,
        }
        write_manifest(stage, manifest)
        if out.exists():
            shutil.rmtree(out)  # empty, or a previous export (checked above)
        stage.rename(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        model.train(was_training)
    return out


__all__ = ["MANIFEST_NAME", "OPSET", "OnnxExportError", "OnnxFolderError", "export_onnx"]
