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
    "path": r".+",  # the rest of a name, for a sub-module renamed as a whole
    "w": r"weight|bias",
    "bn": r"weight|bias|running_mean|running_var|num_batches_tracked",  # a BatchNorm tensor
    "qkv": r"q|k|v",
    "fc": r"fc1|fc2",
    # ClipBERT (BERT) names
    "bert_qkv": r"query|key|value",
    "text_emb": r"word|position|token_type",
    "visual_emb": r"row_position|col_position|token_type",
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
    state_dict: dict[str, torch.Tensor],
    table: RenameTable,
    ignore: tuple[str, ...] = (),
    unmatched: str = "keep",
    target: str = "the target format",
    error: type[CheckpointError] = CheckpointError,
) -> dict[str, torch.Tensor]:
    """Rename every key through the table (first full match wins); keys matching ``ignore`` are dropped.

    ``unmatched="keep"`` (reading): a key that no rule matches keeps its own name, so strict loading
    reports it as unexpected. ``unmatched="raise"`` (writing another format): every such key is listed in
    one ``error``, as nothing may be written under a name the target does not know.
    """
    if unmatched not in ("keep", "raise"):
        raise ValueError(f"unmatched must be 'keep' or 'raise', got {unmatched!r}")
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in table]
    ignored = [re.compile(pattern) for pattern in ignore]
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for key, value in state_dict.items():
        if any(p.fullmatch(key) for p in ignored):
            continue
        for pattern, replacement in compiled:
            if pattern.fullmatch(key):
                out[pattern.sub(replacement, key)] = value
                break
        else:
            if unmatched == "raise":
                missing.append(key)
            out[key] = value
    if missing:
        raise error(f"these weights have no {target} name: {sorted(missing)}")
    return out


def fuse_qkv(state_dict: dict[str, torch.Tensor], q: str, k: str, v: str, fused: str) -> None:
    """Concatenate separate q/k/v projections (weight and bias) into one fused projection, in place.

    Parts whose shapes cannot be stacked (a corrupt or mismatched checkpoint) stay unfused, so that
    `load_strict` reports each of them with its shape and the shape the model expects.
    """
    for kind in ("weight", "bias"):
        names = [f"{q}.{kind}", f"{k}.{kind}", f"{v}.{kind}"]
        if all(n in state_dict for n in names) and len({tuple(state_dict[n].shape) for n in names}) == 1:
            if state_dict[names[0]].ndim >= 1:
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


# q/k/v parts that `fuse_qkv` left unfused: "<prefix>.q_proj.weight" is a third of "<prefix>.qkv.weight"
_UNFUSED_PART = re.compile(r"(?P<prefix>.+)\.[qkv]_proj\.(?P<kind>weight|bias)")


def _unfused_parts(
    state_dict: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    missing: list[str],
    unexpected: list[str],
) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """(part key, checkpoint shape, shape the model expects of it) for q/k/v parts that `fuse_qkv` left
    unfused. Where all three parts are present they are taken out of ``unexpected`` and their fused key
    out of ``missing``: the report then names the part whose shape is wrong."""
    groups: dict[str, list[str]] = {}
    for key in unexpected:
        match = _UNFUSED_PART.fullmatch(key)
        if match:
            groups.setdefault(f"{match['prefix']}.qkv.{match['kind']}", []).append(key)
    report = []
    for fused, keys in groups.items():
        if fused not in expected or fused not in missing or len(keys) != 3:
            continue
        whole = tuple(expected[fused].shape)
        third = (whole[0] // 3, *whole[1:]) if whole else whole
        wrong = [
            (key, tuple(state_dict[key].shape), third)
            for key in keys
            if tuple(state_dict[key].shape) != third
        ]
        if wrong:
            missing.remove(fused)
            for key in keys:
                unexpected.remove(key)
            report += wrong
    return sorted(report)


def load_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, refusing missing or unexpected keys, shape and dtype mismatches, all listed at once."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{key}: checkpoint {got} vs model {want}"
        for key, got, want in _unfused_parts(state_dict, expected, missing, unexpected)
    ]
    mismatched += [
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[key].shape) != tuple(expected[key].shape)
    ]
    # a float weight cannot be filled from integers or booleans (assign=True would keep their dtype)
    wrong_dtype = [
        f"{key}: checkpoint {str(state_dict[key].dtype).replace('torch.', '')} vs model "
        f"{str(expected[key].dtype).replace('torch.', '')}"
        for key in sorted(set(expected) & set(state_dict))
        if expected[key].is_floating_point() != state_dict[key].is_floating_point()
    ]
    if missing or unexpected or mismatched or wrong_dtype:
        lines = [f"checkpoint {source} does not match its architecture:"]
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
            ("dtype mismatches", wrong_dtype),
        ):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True, assign=True)


# An index of shards is a small JSON file; anything far larger is not one.
MAX_INDEX_BYTES = 64 * 1024 * 1024


def file_inside(folder: Path, name: Any, what: str) -> Path:
    """``folder / name`` for a file name read from a checkpoint's own files, refused where it leaves the folder.

    The name must be relative with no ``..`` part, and the file it resolves to (symlinks followed) must lie
    in the folder, or, for a huggingface_hub snapshot (``<repo>/snapshots/<revision>/``, whose files are
    symlinks into ``<repo>/blobs/``), in that repository's blobs.
    """
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise CheckpointError(f"{what} names {name!r}, which is not a file name inside {folder}")
    parts = Path(name).parts
    if Path(name).is_absolute() or Path(name).drive or ".." in parts:
        raise CheckpointError(f"{what} names {name!r}, outside the checkpoint folder {folder}; refused")
    path = folder / name
    target, root = path.resolve(), folder.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":
        allowed.append(root.parent.parent / "blobs")
    if not any(target.is_relative_to(place) for place in allowed):
        raise CheckpointError(
            f"{what} names {name!r}, which resolves to {target}, outside the checkpoint folder {folder}; refused"
        )
    return path


def read_shard_index(folder: Path, index: Path) -> list[Path]:
    """The weight files a sharded checkpoint's ``*.index.json`` names (each once), all inside ``folder``."""
    import json

    if index.stat().st_size > MAX_INDEX_BYTES:
        raise CheckpointError(f"{index} is {index.stat().st_size:,} bytes, too large for a shard index")
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read the shard index {index}: {error}") from error
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no weight_map object naming the shards")
    names = set()
    for name in weight_map.values():
        if not isinstance(name, str):
            raise CheckpointError(f"{index}: the weight_map names a shard {name!r}, not a file name")
        names.add(name)
    files = [file_inside(folder, name, str(index)) for name in sorted(names)]
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{index} names the shard {path.name}, which is not in {folder}")
    return files


def _unreadable_pickle(path: Path, error: Exception) -> CheckpointError:
    """The reason a pickle was refused, without torch's advice to rerun with weights_only=False
    (which would execute the file's code: the one thing polyclip never does)."""
    text = str(error)
    if "WeightsUnpickler error:" in text:  # torch's restricted unpickler: its own reason follows the marker
        text = text.split("WeightsUnpickler error:", 1)[1]
    reason = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    reason = reason.split(". ", 1)[0].rstrip(".")  # its first sentence: the rest advises allowlisting
    return CheckpointError(
        f"cannot read {path} as a PyTorch state dict ({reason}). Only plain tensor checkpoints are "
        "accepted; nothing in a checkpoint is executed."
    )


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
            raise _unreadable_pickle(path, legacy_error) from legacy_error
    except Exception as error:
        raise _unreadable_pickle(path, error) from error
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj
