"""transformers' Flax CLIP checkpoints (``flax_model.msgpack`` + ``config.json``), e.g. CLIP-RSICD.

The file is flax's msgpack serialization of the parameter tree of ``FlaxCLIPModel``; it is decoded here
with the ``msgpack`` package alone (no flax or jax):

- an array leaf is msgpack ExtType 1 whose payload is itself msgpack of ``(shape, dtype name, C-order
  bytes)``; ExtType 3 is a NumPy scalar in the same encoding; ExtType 2 a Python complex ``(re, im)``;
- an array larger than 2**30 bytes is stored as a dict ``{"__msgpack_chunked_array__": True,
  "shape": {"0": d0, ...}, "chunks": {"0": flat_chunk, ...}}``.

Flax names map to PyTorch's as transformers' ``convert_flax_state_dict_to_pytorch`` does: ``kernel`` ->
``weight`` (Dense kernels are (in, out) and are transposed; Conv kernels are HWIO and become OIHW),
LayerNorm ``scale`` -> ``weight``, Embed ``embedding`` -> ``weight``. The result goes through the
transformers converter (`polyclip.checkpoints.hf`).

Reference: flax ``serialization.py``; transformers ``models/clip/modeling_flax_clip.py`` and
``modeling_flax_pytorch_utils.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import msgpack
import torch

from polyclip.checkpoints.common import Checkpoint, CheckpointError
from polyclip.checkpoints.hf import config_from_hf, convert_state_dict, preprocess_from_hf

WEIGHTS_NAME = "flax_model.msgpack"

# NumPy dtype names as flax writes them (``arr.dtype.name``); bfloat16 is jax's extension type.
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_EXT_NDARRAY, _EXT_COMPLEX, _EXT_SCALAR = 1, 2, 3
_CHUNKED = "__msgpack_chunked_array__"


def _decode_array(payload: bytes) -> torch.Tensor:
    # (shape, dtype, bytes): the byte count must be the shape's, checked before anything is allocated
    try:
        shape, dtype_name, buffer = msgpack.unpackb(payload, raw=True)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"a flax array record is not (shape, dtype, bytes): {error}") from None
    name = dtype_name.decode(errors="replace") if isinstance(dtype_name, bytes) else dtype_name
    if not isinstance(name, str) or name not in _DTYPES:
        raise CheckpointError(f"flax array of dtype {name!r} is not supported")
    if not isinstance(shape, list | tuple) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise CheckpointError(f"flax array with an invalid shape {shape!r}")
    if not isinstance(buffer, bytes):
        raise CheckpointError("flax array without a byte buffer")
    dtype = _DTYPES[name]
    expected = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if len(buffer) != expected:
        raise CheckpointError(
            f"flax array of shape {list(shape)} and dtype {name} needs {expected:,} bytes, its record holds {len(buffer):,}"
        )
    if not buffer:
        return torch.empty(tuple(shape), dtype=dtype)
    return torch.frombuffer(bytearray(buffer), dtype=dtype).reshape(tuple(shape))


def _ext_hook(code: int, payload: bytes) -> Any:
    if code == _EXT_NDARRAY:
        return _decode_array(payload)
    if code == _EXT_SCALAR:
        return _decode_array(payload).reshape(())
    if code == _EXT_COMPLEX:
        real, imag = msgpack.unpackb(payload)
        return complex(real, imag)
    raise CheckpointError(f"unknown msgpack extension type {code} in a flax checkpoint")


def _ordered(mapping: dict[str, Any]) -> list[Any]:
    # flax stores tuples as {"0": ..., "1": ...}
    return [mapping[str(index)] for index in range(len(mapping))]


def _unchunk(tree: Any) -> Any:
    if not isinstance(tree, dict):
        return tree
    if tree.get(_CHUNKED) is True:
        shape = _ordered(tree["shape"])
        chunks = _ordered(tree["chunks"])
        if not all(isinstance(chunk, torch.Tensor) for chunk in chunks):
            raise CheckpointError("a chunked flax array holds chunks that are not arrays")
        return torch.cat([chunk.reshape(-1) for chunk in chunks]).reshape(shape)
    return {key: _unchunk(value) for key, value in tree.items()}


def decode_msgpack(data: bytes) -> dict[str, Any]:
    """flax ``msgpack_restore``: the nested dict of tensors."""
    try:
        tree = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False)
    except CheckpointError:
        raise
    except Exception as error:  # msgpack raises several unrelated types
        raise CheckpointError(f"not a flax msgpack checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(tree, dict):
        raise CheckpointError(
            f"a flax checkpoint holds a dict of parameters, this one a {type(tree).__name__}"
        )
    try:
        return _unchunk(tree)
    except CheckpointError:
        raise
    except Exception as error:  # a chunked array whose parts do not fit together
        raise CheckpointError(
            f"malformed chunked array in a flax checkpoint ({type(error).__name__}: {error})"
        ) from error


def _flatten(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def to_pytorch_names(tree: dict[str, Any]) -> dict[str, torch.Tensor]:
    """flax parameter paths -> transformers' PyTorch key names and layouts."""
    if set(tree) == {"params"} and isinstance(tree["params"], dict):
        tree = tree["params"]
    out: dict[str, torch.Tensor] = {}
    try:
        flat = _flatten(tree)
    except RecursionError:
        raise CheckpointError("a flax checkpoint nested too deep") from None
    for path, value in flat.items():
        if not all(isinstance(part, str) for part in path):
            raise CheckpointError(f"flax parameter path {path!r} has a key that is not a string")
        name = ".".join(path)
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"flax parameter {name} is a {type(value).__name__}, not an array")
        *parents, leaf = path
        if leaf == "kernel" and value.ndim == 4:
            value, leaf = value.permute(3, 2, 0, 1), "weight"  # (kh, kw, in, out) -> (out, in, kh, kw)
        elif leaf == "kernel" and value.ndim == 2:
            value, leaf = value.T, "weight"  # (in, out) -> (out, in)
        elif leaf in ("scale", "embedding"):
            leaf = "weight"
        out[".".join([*parents, leaf])] = value.contiguous()
    return out


def read_flax(path: Path) -> Checkpoint:
    folder, weights = (path, path / WEIGHTS_NAME) if path.is_dir() else (path.parent, path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{weights} needs the transformers config.json beside it")
    if not weights.is_file():
        raise CheckpointError(f"{folder} has no {WEIGHTS_NAME}")
    try:
        hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"cannot read {config_path}: {error}") from error
    if hf_config.get("model_type") != "clip":
        raise CheckpointError(
            f"{config_path}: model_type {hf_config.get('model_type')!r}; Flax checkpoints are read for CLIP only"
        )
    config = config_from_hf(hf_config)
    state_dict = convert_state_dict(to_pytorch_names(decode_msgpack(weights.read_bytes())))
    return Checkpoint(
        format="flax",
        config=config,
        state_dict=state_dict,
        preprocess=preprocess_from_hf(folder, "clip", config.vision.image_size),
        tokenizer=None,  # read from the folder's tokenizer files by the loader, as for transformers folders
        source=path,
    )


__all__ = ["WEIGHTS_NAME", "decode_msgpack", "read_flax", "to_pytorch_names"]
