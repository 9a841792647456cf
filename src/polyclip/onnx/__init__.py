"""ONNX export of a dual encoder's towers, and an exported folder run through onnxruntime.

``export_onnx(model, preprocess, tokenizer, out)`` writes the folder; ``polyclip.load(out)`` loads it
(``load_onnx``). Needs the ``onnx`` extra: ``pip install 'polyclip[onnx]'``.
"""

from __future__ import annotations

import importlib

from polyclip.onnx.manifest import MANIFEST_NAME, OnnxFolderError, is_onnx_folder, read_manifest

_LAZY = {
    "export_onnx": "polyclip.onnx.export",
    "OnnxExportError": "polyclip.onnx.export",
    "OnnxDualEncoder": "polyclip.onnx.runtime",
    "load_onnx": "polyclip.onnx.runtime",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'polyclip.onnx' has no attribute {name!r}")


__all__ = ["MANIFEST_NAME", "OnnxFolderError", "is_onnx_folder", "read_manifest", *sorted(_LAZY)]
