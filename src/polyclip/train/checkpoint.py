"""Training checkpoints that resume exactly, and the last K kept.

A checkpoint is a folder ``checkpoints/step_00001234/``:
- ``polyclip_config.json`` + ``model.safetensors``: a normal polyclip model folder (``polyclip.load``
  reads it), with the preprocessing and tokenizer the run uses;
- ``trainer_state.pt``: optimiser state, the step, the data position (epoch and batch within it),
  the random generators (torch, CUDA, Python, NumPy), skip counters and the config.

Written to a temporary folder and renamed, so an interrupted save never leaves a half checkpoint; a
full disk is reported as `polyclip.files.DiskFullError` ("free space and rerun to resume").
Under FSDP the full (unsharded) weights and optimiser state are gathered on rank 0
(``torch.distributed.checkpoint.state_dict`` with ``full_state_dict=True``).
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from polyclip.files import DiskFullError, reporting_disk_full
from polyclip.train.config import TrainConfigError

STATE_NAME = "trainer_state.pt"
_STEP_FOLDER = re.compile(r"step_(\d+)$")


def rng_state() -> dict[str, Any]:
    name, keys, position, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, sharded: bool
) -> tuple[dict, dict | None]:
    """(model state dict, optimiser state dict or None), full and on the CPU (collective under FSDP)."""
    if not sharded:
        model_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return model_state, optimizer.state_dict() if optimizer is not None else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        return get_model_state_dict(model, options=options), None
    return get_state_dict(model, optimizer, options=options)


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict,
    optimizer_state: dict,
    sharded: bool,
) -> None:
    if not sharded:
        model.load_state_dict(model_state, strict=True)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_state_dict(
        model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state, options=options
    )


def save_checkpoint(
    run_dir: Path, step: int, model_state: dict, config_model, preprocess, tokenizer, trainer_state: dict,
    keep_last: int,
) -> Path:  # fmt: skip
    """Write checkpoint ``step`` (rank 0 only) and delete all but the newest ``keep_last``."""
    from polyclip.checkpoints.native import write_native

    root = run_dir / "checkpoints"
    final = root / f"step_{step:08d}"
    temporary = root / f".step_{step:08d}.tmp"
    if temporary.exists():
        shutil.rmtree(temporary)
    preprocess_dict = preprocess.config.to_dict() if hasattr(preprocess, "config") else preprocess
    try:
        with reporting_disk_full(final):
            temporary.mkdir(parents=True)
            # The tokenizer copies the files it needs (a SentencePiece model, a custom BPE) into the checkpoint.
            tokenizer_config = tokenizer.save(temporary) if hasattr(tokenizer, "save") else tokenizer.config
            write_native(temporary, config_model, model_state, preprocess_dict, tokenizer_config)
            # through a Python file: torch's own writer reports a full disk only as "unexpected pos"
            with (temporary / STATE_NAME).open("wb") as file:
                torch.save(trainer_state, file)
    except DiskFullError:
        # the earlier checkpoints are untouched; the partial one would only hold on to the space
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    temporary.rename(final)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in root.iterdir()
        if (match := _STEP_FOLDER.match(path.name)) and (path / STATE_NAME).is_file()
    ]
    return [path for _, path in sorted(found)]


def resolve_resume(resume: str, run_dir: Path) -> Path:
    if resume == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise TrainConfigError(
                f"checkpoint.resume=latest but {run_dir / 'checkpoints'} holds no checkpoint"
            )
        return found[-1]
    path = Path(resume)
    if not (path / STATE_NAME).is_file():
        raise TrainConfigError(f"{path} is not a training checkpoint (no {STATE_NAME} in it)")
    return path


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(model weights, trainer state) of a checkpoint folder."""
    from safetensors.torch import load_file

    weights = load_file(str(path / "model.safetensors"))
    state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
    return weights, state
