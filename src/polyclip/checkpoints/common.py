"""What every converter shares: the loaded-checkpoint record, rename tables, strict loading."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from polyclip.models import DualEncoderConfig


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not match its architecture."""


@dataclass
class Checkpoint:
    """A checkpoint read from disk, in polyclip's key names, with what is needed to use it."""

    format: str  # "hf", "open_clip", "openai", "flax", "native"
    config: DualEncoderConfig
    state_dict: dict[str, torch.Tensor]
    preprocess: dict[str, Any] | None = None  # PreprocessConfig fields, when the source records them
    tokenizer: dict[str, Any] | None = None  # build_tokenizer() config, when the source records it
    source: Path | None = None
    notes: list[str] = field(default_factory=list)


# A rename table is a list of (pattern, replacement) applied with re.fullmatch, first match wins.
RenameTable = list[tuple[str, str]]

# Rename tables from name templates.
# A template names a key with placeholders; the same placeholders appear on both sides, so one list of
# pairs gives the table in both directions (reading and exporting).

_PLACEHOLDERS = {
    "i": r"\d+",  # a block index
    "w": r"weight|bias",
    "bn": r"weight|bias|running_mean|running_var|num_batches_tracked",  # a BatchNorm tensor
    "qkv": r"q|k|v",
    "fc": r"fc1|fc2",
}
TemplatePairs = list[tuple[str, str]]


def _template_pattern(template: str) -> str:
    parts = re.split(r"\{(\w+)\}", template)  # literal, name, literal, name, ...
    return "".join(
        re.escape(part) if index % 2 == 0 else f"(?P<{part}>{_PLACEHOLDERS[part]})"
        for index, part in enumerate(parts)
    )


def _template_replacement(template: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda match: rf"\g<{match.group(1)}>", template)


def template_renames(pairs: TemplatePairs, reverse: bool = False) -> RenameTable:
    """A rename table from (source template, target template) pairs; ``reverse`` swaps the sides."""
    return [
        (
            _template_pattern(target if reverse else source),
            _template_replacement(source if reverse else target),
        )
        for source, target in pairs
    ]


def rename_keys(
    state_dict: dict[str, torch.Tensor], table: RenameTable, ignore: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """Rename every key through the table; keys matching ``ignore`` patterns are dropped.

    A key that no rule matches is kept under its own name, so strict loading reports it as unexpected.
    """
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in table]
    ignored = [re.compile(pattern) for pattern in ignore]
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if any(p.fullmatch(key) for p in ignored):
            continue
        for pattern, replacement in compiled:
            if pattern.fullmatch(key):
                key = pattern.sub(replacement, key)
                break
        out[key] = value
    return out


def fuse_qkv(state_dict: dict[str, torch.Tensor], q: str, k: str, v: str, fused: str) -> None:
    """Concatenate separate q/k/v projections (weight and bias) into one fused projection, in place."""
    for kind in ("weight", "bias"):
        names = [f"{q}.{kind}", f"{k}.{kind}", f"{v}.{kind}"]
        if all(n in state_dict for n in names):
            state_dict[f"{fused}.{kind}"] = torch.cat([state_dict.pop(n) for n in names], dim=0)


def fuse_all_qkv(state_dict: dict[str, torch.Tensor], prefix_pattern: str) -> None:
    """Fuse every ``<prefix>.{q,k,v}_proj`` found, where prefix matches ``prefix_pattern``."""
    prefixes = {
        key[: -len(".q_proj.weight")]
        for key in state_dict
        if key.endswith(".q_proj.weight") and re.fullmatch(prefix_pattern, key[: -len(".q_proj.weight")])
    }
    for prefix in sorted(prefixes):
        fuse_qkv(state_dict, f"{prefix}.q_proj", f"{prefix}.k_proj", f"{prefix}.v_proj", f"{prefix}.qkv")


def split_rows(tensor: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(tensor, sizes, dim=0))


def load_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, refusing missing or unexpected keys and shape mismatches, all listed at once."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[key].shape) != tuple(expected[key].shape)
    ]
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {source} does not match its architecture:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True, assign=True)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors or pickle state dict (pickles read with weights_only=True: nothing is executed)."""
    if path.suffix == ".safetensors":
        from polyclip.checkpoints.safetensors_io import SafetensorsError, read_safetensors

        try:
            return read_safetensors(path)
        except (SafetensorsError, KeyError, TypeError) as error:
            raise CheckpointError(f"cannot read safetensors file {path}: {error}") from error
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        # mmap needs the zip format; legacy pickles fall back to a normal read
        if "mmap" not in str(error):
            raise CheckpointError(f"cannot read {path}: {error}") from error
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as legacy_error:
            raise CheckpointError(
                f"cannot read {path} as a PyTorch state dict ({type(legacy_error).__name__}: {legacy_error}). "
                "Only plain tensor checkpoints are accepted; nothing in a checkpoint is executed."
            ) from legacy_error
    except Exception as error:
        raise CheckpointError(
            f"cannot read {path} as a PyTorch state dict ({type(error).__name__}: {error}). "
            "Only plain tensor checkpoints are accepted; nothing in a checkpoint is executed."
        ) from error
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj
