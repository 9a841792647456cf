"""Shared by the test_hostile_* tests: TorchScript-style archives written by hand, and the CLI run
through its entry point."""

from __future__ import annotations

import struct
import sys
import zlib
from pathlib import Path

import pytest

# A TorchScript-style archive written by hand: data.pkl as pickle opcodes, members as raw zip records


def _text(value: str) -> bytes:  # BINUNICODE
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _int(value: int) -> bytes:  # BININT (LONG1 for values that need more than 32 bits)
    if 0 <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def module_pickle(tensors: dict[str, tuple[str, int, tuple[int, ...]]]) -> bytes:
    """data.pkl of a scripted module ``__torch__.M`` whose attributes are float tensors, each given as
    (storage key, storage elements, shape), in the opcodes torch's own archives use."""
    out = b"\x80\x02c__torch__\nM\n)\x81}"
    for name, (key, numel, shape) in tensors.items():
        stride = [1] * len(shape)
        for axis in range(len(shape) - 2, -1, -1):
            stride[axis] = stride[axis + 1] * shape[axis + 1]
        out += _text(name) + b"ctorch._utils\n_rebuild_tensor_v2\n("
        out += b"(" + _text("storage") + b"ctorch\nFloatStorage\n" + _text(key) + _text("cpu") + _int(numel)
        out += b"tQ" + _int(0) + b"(" + b"".join(map(_int, shape)) + b"t(" + b"".join(map(_int, stride))
        out += b"t\x89ccollections\nOrderedDict\n)RtRs"
    return out + b"b."


def zip_archive(path: Path, members: list[tuple[str, bytes, int, int, int]]) -> None:
    """A zip of (name, stored bytes, method 0 or 8, CRC-32, inflated size) members, written record by record
    so that a member's compressed stream and declared sizes are exactly what the test says."""
    body, directory = b"", b""
    for name, data, method, crc, size in members:
        encoded = name.encode()
        fields = struct.pack("<HHHHHIIIHH", 20, 0, method, 0, 0, crc, len(data), size, len(encoded), 0)
        directory += (
            b"PK\x01\x02"
            + struct.pack("<H", 20)
            + fields
            + struct.pack("<HHHII", 0, 0, 0, 0, len(body))
            + encoded
        )
        body += b"PK\x03\x04" + fields + encoded + data
    end = struct.pack(
        "<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(members), len(members), len(directory), len(body), 0
    )
    path.write_bytes(body + directory + end)


def stored(name: str, data: bytes) -> tuple[str, bytes, int, int, int]:
    return name, data, 0, zlib.crc32(data), len(data)


def deflated_zeros(name: str, size: int) -> tuple[str, bytes, int, int, int]:
    """A member inflating to ``size`` zero bytes (a multiple of 1 MiB) from about size / 1000 bytes: one
    compressed MiB repeated (a full flush makes every block identical), then the final empty block."""
    chunk = bytes(1 << 20)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(size >> 20):
        crc = zlib.crc32(chunk, crc)
    return name, block * (size >> 20) + compressor.flush(zlib.Z_FINISH), 8, crc, size


CODE = 'class M(Module):\n  __parameters__ = ["weight", ]\n  __buffers__ = []\n  weight : Tensor\n'


def script_archive(path: Path, tensors, storages) -> None:
    zip_archive(
        path,
        [
            stored("archive/data.pkl", module_pickle(tensors)),
            stored("archive/code/__torch__.py", CODE.encode()),
            stored("archive/byteorder", b"little"),
            *storages,
        ],
    )


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``polyclip ARGS`` run in this process through the entry point that
    turns a user's mistake into one line; an exception escaping it (a traceback) fails the test."""
    from polyclip.cli import main

    monkeypatch.setattr(sys, "argv", ["polyclip", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err
