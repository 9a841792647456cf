"""An exported ONNX folder as a polyclip model: the model contract, run by onnxruntime (inference only).

``polyclip.load(folder)`` returns ``(OnnxDualEncoder, preprocess, tokenizer)`` for a folder written by
``export_onnx``. The model answers ``encode_image``, ``encode_text``, ``logits`` and ``__call__`` as
``DualEncoder`` does (the same arithmetic for logits and the output type), with torch tensors in and
out, so zero-shot classifiers, ``polyclip embed``, index building and the HTTP service take it as they
take an eager model. Training-only operations (``train()``, gradient checkpointing, loading weights,
moving to another device or dtype) raise a clear error: the graphs hold constants, not parameters.

Its ``state_dict`` holds the temperature and the SHA-256 of both graphs, so weight fingerprints (feature
caches, index identities) tell two exports apart.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from polyclip.models import DualEncoderConfig
from polyclip.models.dual_encoder import DualEncoder
from polyclip.onnx.manifest import OnnxFolderError, read_manifest

INFERENCE_ONLY = (
    "an ONNX export is inference only (its graphs hold constants): fine-tune or convert the checkpoint "
    "it was exported from, then export again"
)


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("running an ONNX export needs onnxruntime: pip install 'polyclip[onnx]'") from None
    return onnxruntime


def cpu_session(path: str | Path, threads: int | None = None):
    """An onnxruntime session on the CPU execution provider, all graph optimisations on."""
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: no per-node placement notes
    # no busy-waiting between runs: the process also runs torch (decoding, other models), whose threads
    # a spinning pool starves
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types for unreadable graphs
        raise OnnxFolderError(f"onnxruntime cannot load {path}: {error}") from None


def _check_files(folder: Path, manifest: dict[str, Any]) -> None:
    from polyclip.onnx.export import files_sha256

    for name, graph in manifest["graphs"].items():
        files = graph.get("files") or []
        missing = [f for f in files if not (folder / f).is_file()]
        if not files or missing:
            raise OnnxFolderError(
                f"{folder}: the {name} graph's files are missing ({', '.join(missing) or 'none listed'})"
            )
        if graph.get("sha256") != files_sha256(folder, files):
            raise OnnxFolderError(
                f"{folder}: {files[0]} does not match the SHA-256 its manifest records (damaged or replaced); export again"
            )


class OnnxDualEncoder(nn.Module):
    """The model contract over two onnxruntime sessions (CPU, float32)."""

    # the contract's arithmetic, shared with the eager model: the same attributes are read
    logits = DualEncoder.logits
    forward = DualEncoder.forward
    image_size = DualEncoder.image_size  # read from self.config, as on a DualEncoder
    context_length = DualEncoder.context_length

    def __init__(self, folder: str | Path, threads: int | None = None):
        super().__init__()
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        _check_files(self.folder, manifest)
        self.manifest = manifest
        try:  # the one config validation every checkpoint reader ends in
            self.config = DualEncoderConfig.from_dict(manifest["model"])
        except (ValueError, TypeError, KeyError) as error:
            raise OnnxFolderError(
                f"{self.folder}: the manifest's model config is not valid: {error}"
            ) from None
        self.logit_scale = nn.Parameter(torch.tensor(float(manifest["logit_scale"])), requires_grad=False)
        bias = manifest.get("logit_bias")
        self.logit_bias = (
            None if bias is None else nn.Parameter(torch.tensor(float(bias)), requires_grad=False)
        )
        digests = b"".join(bytes.fromhex(manifest["graphs"][name]["sha256"]) for name in ("image", "text"))
        self.register_buffer("graph_sha256", torch.frombuffer(bytearray(digests), dtype=torch.uint8))
        image, text = manifest["graphs"]["image"], manifest["graphs"]["text"]
        self._image = cpu_session(self.folder / image["files"][0], threads)
        self._text = cpu_session(self.folder / text["files"][0], threads)
        self._image_io = (image["input"], image["output"])
        self._text_io = (text["input"], text["output"])
        self.dynamic_length = bool(text.get("dynamic_length"))
        self.training = False

    def __repr__(self) -> str:
        return f"OnnxDualEncoder({str(self.folder)!r}, opset={self.manifest['opset']})"

    # -- the contract's attributes
    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, 3, H, W) -> (B, E) float32."""
        pixels = torch.as_tensor(pixels)
        size = self.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(
                f"pixels must be (B, 3, {size}, {size}) for this export, got {tuple(pixels.shape)}"
            )
        if pixels.shape[0] == 0:
            return torch.zeros(0, self.config.embed_dim)
        array = np.ascontiguousarray(pixels.detach().to("cpu", torch.float32).numpy())
        features = torch.from_numpy(self._image.run([self._image_io[1]], {self._image_io[0]: array})[0])
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, token_ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, L) token ids -> (B, E) float32."""
        token_ids = torch.as_tensor(token_ids)
        if token_ids.ndim != 2:
            raise ValueError(f"token ids must be (B, L), got shape {tuple(token_ids.shape)}")
        if token_ids.shape[0] == 0:
            return torch.zeros(0, self.config.embed_dim)
        length, context = token_ids.shape[1], self.context_length
        if length > context:
            raise ValueError(f"{length} tokens exceed the text tower's context length {context}")
        if self.dynamic_length:
            # as the eager causal tower does: nothing after the last pooled token changes the result
            token_ids = token_ids[:, : int(self._pool_positions(token_ids).max()) + 1]
        elif length != context:
            raise ValueError(
                f"this export's bidirectional text tower takes exactly {context} tokens (padding included), "
                f"got {length}: use the tokenizer returned with the model"
            )
        array = np.ascontiguousarray(token_ids.detach().to("cpu", torch.int64).numpy())
        features = torch.from_numpy(self._text.run([self._text_io[1]], {self._text_io[0]: array})[0])
        return F.normalize(features, dim=-1) if normalize else features

    def _pool_positions(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The positions ``TextTransformer.pool_positions`` pools a causal batch at: (B,)."""
        if self.config.text.pool == "eos":
            return (token_ids == self.config.text.eos_token_id).int().argmax(dim=-1)
        return token_ids.argmax(dim=-1)

    # -- what an inference-only model refuses
    def train(self, mode: bool = True) -> OnnxDualEncoder:
        if mode:
            raise NotImplementedError(INFERENCE_ONLY)
        self.training = False
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        raise NotImplementedError(INFERENCE_ONLY)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        raise NotImplementedError(INFERENCE_ONLY)

    def to(self, *args, **kwargs) -> OnnxDualEncoder:
        device, dtype, *_ = torch._C._nn._parse_to(*args, **kwargs)
        if (device is not None and torch.device(device).type != "cpu") or dtype not in (None, torch.float32):
            raise NotImplementedError(
                "an ONNX export runs on the CPU in float32 as exported; for another device or dtype load the "
                "checkpoint it was exported from"
            )
        return self

    def cuda(self, device=None) -> OnnxDualEncoder:
        return self.to("cuda")

    def half(self) -> OnnxDualEncoder:
        return self.to(torch.float16)

    def bfloat16(self) -> OnnxDualEncoder:
        return self.to(torch.bfloat16)


_FP32 = (None, "fp32", "float32", torch.float32)


def load_onnx(
    folder: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    compile: bool = False,
    quantize: str | None = None,
) -> tuple[OnnxDualEncoder, Any, Any]:
    """``polyclip.load`` for an exported folder: the model, and the preprocessing and tokenizer recorded with it."""
    from polyclip.factory import _tokenizer
    from polyclip.transforms import build_preprocess

    if device is not None and torch.device(device).type != "cpu":
        raise ValueError(f"an ONNX export runs on the CPU; device={device!r} is not supported")
    if dtype not in _FP32:
        raise ValueError(f"an ONNX export runs in float32 as exported; dtype={dtype!r} is not supported")
    if compile or quantize is not None:
        raise ValueError("compile and quantize apply to PyTorch models; an ONNX export runs as exported")
    folder = Path(folder)
    model = OnnxDualEncoder(folder)
    preprocess = build_preprocess(model.manifest["preprocess"])
    tokenizer = _tokenizer(
        None, model.manifest["tokenizer"], model.config, folder
    )  # as polyclip.load reads it
    return model, preprocess, tokenizer


__all__ = ["OnnxDualEncoder", "cpu_session", "load_onnx"]
