"""Read a safetensors file straight into freshly allocated tensors.

``safetensors.torch.load_file`` maps the file and copies every tensor out of the mapping, so while a
checkpoint loads both the mapped pages and the copies count against memory. Reading each tensor's
bytes directly into its own storage keeps the peak at the weights' size. The format is a little-endian
u64 header length, a JSON header ``{name: {dtype, shape, data_offsets}}``, then the raw bytes.
"""

from __future__ import annotations

import json
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


class SafetensorsError(ValueError):
    pass


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as file:
        head = file.read(8)
        if len(head) != 8:
            raise SafetensorsError(f"{path} is too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, 100_000_000):
            raise SafetensorsError(f"{path} is not a safetensors file (header length {header_len})")
        try:
            header = json.loads(file.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SafetensorsError(f"{path} has a corrupt safetensors header: {error}") from error
        header.pop("__metadata__", None)
        base = 8 + header_len
        tensors = {}
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            dtype = _DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise SafetensorsError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
            start, end = info["data_offsets"]
            tensor = torch.empty(info["shape"], dtype=dtype)
            nbytes = tensor.numel() * tensor.element_size()
            if end - start != nbytes or base + end > size:
                raise SafetensorsError(f"{path}: tensor {name} has inconsistent offsets (file truncated?)")
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
