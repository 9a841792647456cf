"""Checkpoint formats: one module per source format, each a rename table plus a few special cases."""

from polyclip.checkpoints.common import Checkpoint, CheckpointError, load_strict
from polyclip.checkpoints.loading import FORMATS, build_model, describe, detect_format, read_checkpoint

__all__ = [
    "FORMATS",
    "Checkpoint",
    "CheckpointError",
    "build_model",
    "describe",
    "detect_format",
    "load_strict",
    "read_checkpoint",
]
