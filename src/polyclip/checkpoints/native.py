"""polyclip's own folder format: ``polyclip_config.json`` + ``model.safetensors`` in polyclip key names.

The config records the model, its preprocessing and its tokenizer, so a saved model reloads offline
with exactly the preprocessing it was trained or converted with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from polyclip.checkpoints.common import Checkpoint, CheckpointError, read_weights
from polyclip.models import DualEncoderConfig

CONFIG_NAME = "polyclip_config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


def read_native(folder: Path) -> Checkpoint:
    try:
        data = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {folder / CONFIG_NAME}: {error}") from error
    if not isinstance(data, dict) or "model" not in data:
        raise CheckpointError(
            f"{folder / CONFIG_NAME} is not a polyclip config (an object with a 'model' entry)"
        )
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{folder / CONFIG_NAME}: format_version {version!r}, this polyclip reads {FORMAT_VERSION}"
        )
    if not (folder / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    return Checkpoint(
        format="native",
        config=DualEncoderConfig.from_dict(data["model"]),
        state_dict=read_weights(folder / WEIGHTS_NAME),
        preprocess=data.get("preprocess"),
        tokenizer=data.get("tokenizer"),
        source=folder,
    )


def write_native(
    folder: Path,
    config: DualEncoderConfig,
    state_dict: dict[str, torch.Tensor],
    preprocess: dict[str, Any] | None,
    tokenizer: dict[str, Any] | None,
    extra: dict[str, Any] | None = None,
) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    tmp = folder / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(folder / WEIGHTS_NAME)  # atomic: a killed save never leaves a half-written file
    record = {
        "format_version": FORMAT_VERSION,
        "model": config.to_dict(),
        "preprocess": preprocess,
        "tokenizer": tokenizer,
        **(extra or {}),
    }
    (folder / CONFIG_NAME).write_text(json.dumps(record, indent=2) + "\n")
    return folder
