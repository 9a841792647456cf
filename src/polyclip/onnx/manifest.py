"""The manifest of an exported ONNX folder: the explicit marker that a folder holds ONNX graphs.

``polyclip_onnx.json`` names the two graphs (with their input and output names and shapes, their
SHA-256 and the largest difference to polyclip's eager output measured at export), the opset, the
model's config and temperature, and the preprocessing and tokenizer records that ``polyclip.save``
writes into ``polyclip_config.json``. Format detection looks for this file by name, never at keys.

This module imports nothing heavy: checkpoint detection reads the file name from here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MANIFEST_NAME = "polyclip_onnx.json"
FORMAT_NAME = "polyclip-onnx"
FORMAT_VERSION = 1
GRAPHS = ("image", "text")
MAX_MANIFEST_BYTES = 16 << 20


class OnnxFolderError(ValueError):
    """An exported ONNX folder is incomplete, damaged or of another format version."""


def is_onnx_folder(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST_NAME).is_file()


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of ``folder``, checked for the fields the runtime needs."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:  # a few KiB in practice; never read a huge one whole
            raise OnnxFolderError(
                f"{path} is over {MAX_MANIFEST_BYTES >> 20} MiB: not a manifest polyclip wrote"
            )
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OnnxFolderError(f"{folder} has no {MANIFEST_NAME}: it is not an exported ONNX folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise OnnxFolderError(f"cannot read {path}: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise OnnxFolderError(f"{path} is not a {FORMAT_NAME} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise OnnxFolderError(
            f"{path}: format_version {manifest.get('format_version')!r}, this polyclip reads {FORMAT_VERSION}"
        )
    missing = [
        key
        for key in ("opset", "model", "logit_scale", "preprocess", "tokenizer", "graphs")
        if key not in manifest
    ]
    graphs = manifest.get("graphs")
    if isinstance(graphs, dict):
        missing += [f"graphs.{name}" for name in GRAPHS if not isinstance(graphs.get(name), dict)]
    if missing:
        raise OnnxFolderError(f"{path} lacks {', '.join(missing)}")
    return manifest


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    path = folder / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)  # the marker appears last and whole: a killed export leaves no folder that looks done
    return path
