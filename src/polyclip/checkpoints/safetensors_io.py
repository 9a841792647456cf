"""Read a safetensors file straight into freshly allocated tensors.

``safetensors.torch.load_file`` maps the file and copies every tensor out of the mapping, so while a
checkpoint loads both the mapped pages and the copies count against memory. Reading each tensor's
bytes directly into its own storage keeps the peak at the weights' size. The format is a little-endian
u64 header length, a JSON header ``{name: {dtype, shape, data_offsets}}``, then the raw bytes.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


# Element sizes in bytes, so that a header is checked against the file without allocating anything.
_ITEMSIZE = {name: torch.empty(0, dtype=dtype).element_size() for name, dtype in _DTYPES.items()}

# A header is a small JSON object (a few hundred bytes per tensor); safetensors itself refuses more than 100 MB.
MAX_HEADER_BYTES = 100_000_000


class SafetensorsError(ValueError):
    pass


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(
    path: Path, file, size: int
) -> tuple[int, list[tuple[str, torch.dtype, list[int], int, int]]]:
    """(offset of the data, [(name, dtype, shape, start, end)] sorted by start), every entry checked against
    the file: known dtype, a shape of non-negative integers, offsets inside the data and not overlapping,
    and a byte length equal to the shape times the dtype's size. Nothing is allocated from the header's
    numbers before they pass."""
    head = file.read(8)
    if len(head) != 8:
        raise SafetensorsError(f"{path} is too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > min(size - 8, MAX_HEADER_BYTES):
        raise SafetensorsError(
            f"{path} is not a safetensors file (header length {header_len:,} bytes, file {size:,} bytes)"
        )
    try:
        header = json.loads(file.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise SafetensorsError(f"{path} has a corrupt safetensors header: {error}") from error
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the safetensors header is a {type(header).__name__}, not an object")
    header.pop("__metadata__", None)
    base = 8 + header_len
    data_size = size - base
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise SafetensorsError(f"{path}: tensor {name} has no dtype/shape/data_offsets record")
        dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:
            raise SafetensorsError(f"{path}: tensor {name} has unsupported dtype {dtype_name!r}")
        if not isinstance(shape, list) or len(shape) > 32 or not all(_is_count(dim) for dim in shape):
            raise SafetensorsError(f"{path}: tensor {name} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise SafetensorsError(f"{path}: tensor {name} has invalid data_offsets {offsets!r}")
        start, end = offsets
        if not start <= end <= data_size:
            raise SafetensorsError(
                f"{path}: tensor {name} claims bytes {start:,}..{end:,} of a data section of {data_size:,} "
                "bytes (file truncated or header corrupt)"
            )
        nbytes = math.prod(shape) * _ITEMSIZE[dtype_name]
        if end - start != nbytes:
            raise SafetensorsError(
                f"{path}: tensor {name} of shape {shape} and dtype {dtype_name} needs {nbytes:,} bytes, "
                f"its data_offsets hold {end - start:,}"
            )
        entries.append((name, _DTYPES[dtype_name], shape, start, end))
    entries.sort(key=lambda entry: (entry[3], entry[4]))
    for previous, entry in zip(entries, entries[1:]):
        if entry[3] < previous[4]:
            raise SafetensorsError(f"{path}: tensors {previous[0]} and {entry[0]} overlap in the file")
    return base, entries


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as file:
        base, entries = read_header(path, file, size)
        tensors = {}
        for name, dtype, shape, start, end in entries:
            tensor = torch.empty(shape, dtype=dtype)
            nbytes = end - start
            file.seek(base + start)
            if nbytes:
                view = (
                    tensor.view(-1).view(torch.uint8).numpy()
                    if dtype != torch.bool
                    else tensor.numpy().view("u1")
                )
                if file.readinto(memoryview(view).cast("B")) != nbytes:
                    raise SafetensorsError(f"{path}: unexpected end of file in tensor {name}")
            tensors[name] = tensor
    return tensors
