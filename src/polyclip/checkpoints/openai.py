"""OpenAI CLIP single-file checkpoints: the released TorchScript archives (``ViT-B-32.pt``, ``RN50.pt``...),
plain state dicts (OpenAI's or open_clip's key names, optionally with DDP's ``module.`` prefix), and
PubMedCLIP's ``{"best_epoch", "state_dict", "optimizer_state_dict"}`` training checkpoints.

There is no config: the architecture is read from the tensor shapes as OpenAI's ``build_model``
(``clip/model.py``) does, with QuickGELU. TorchScript archives are read without TorchScript: their
``data.pkl`` is unpickled by a restricted unpickler that rebuilds tensors and module attribute records and
refuses every other global, and the parameter/buffer names come from the ``__parameters__`` and
``__buffers__`` declarations of the archive's serialized class definitions, so the result equals
``torch.jit.load(path).state_dict()`` while no code of the archive runs.

Reference: OpenAI ``clip/clip.py`` (``load``), ``clip/model.py`` (``build_model``); torch
``serialization.py`` and ``_weights_only_unpickler.py`` (the storage records of a zip archive).
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from polyclip.checkpoints.common import Checkpoint, CheckpointError, read_weights
from polyclip.checkpoints.loading import is_torchscript_archive
from polyclip.checkpoints.open_clip import OPENAI_MEAN, OPENAI_STD, convert_state_dict, unwrap_state_dict
from polyclip.models import ConfigError, DualEncoderConfig, TextConfig, VisionConfig

# Entries of OpenAI's archives that record the config, not weights (clip/model.py build_model deletes them).
CONFIG_ENTRIES = ("input_resolution", "context_length", "vocab_size")

# The legacy typed storages a zip archive names in its storage records.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


# ---------------------------------------------------------------------------------------------------------
# TorchScript archives


class _ScriptObject:
    """An object of the archive (a scripted module): its attribute dict, nothing executable."""

    qualified_name = ""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"{self.qualified_name} has a custom state {type(state).__name__}")
        self.attributes = state


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _rebuild_tensor(
    storage: torch.Tensor, offset: int, size, stride, requires_grad=False, hooks=None, metadata=None
):
    # (flat storage, element offset, shape, strides) -> a view; the saved requires_grad flag is irrelevant here
    return storage.as_strided(tuple(size), tuple(stride), offset)


class _ArchiveUnpickler(pickle.Unpickler):
    """Rebuilds tensors from the archive's storages and scripted objects as attribute records; refuses any
    other global, so nothing named by the file can run."""

    def __init__(self, file, archive: zipfile.ZipFile, root: str):
        super().__init__(file)
        self.archive = archive
        self.root = root
        self.storages: dict[str, torch.Tensor] = {}
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "__torch__" or module.startswith("__torch__."):
            qualified = f"{module}.{name}"
            if qualified not in self.classes:
                self.classes[qualified] = type(name, (_ScriptObject,), {"qualified_name": qualified})
            return self.classes[qualified]
        raise pickle.UnpicklingError(f"the archive names {module}.{name}, which polyclip does not load")

    def persistent_load(self, record):
        if not (isinstance(record, tuple) and len(record) == 5 and record[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent record {record!r}")
        _, storage_type, key, _location, numel = record
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unknown storage type {storage_type!r}")
        if key not in self.storages:
            raw = bytearray(self.archive.read(f"{self.root}/data/{key}"))
            itemsize = torch.empty(0, dtype=storage_type.dtype).element_size()
            if len(raw) != numel * itemsize:
                raise pickle.UnpicklingError(
                    f"storage {key} holds {len(raw)} bytes, expected {numel * itemsize}"
                )
            flat = (
                torch.frombuffer(raw, dtype=storage_type.dtype)
                if raw
                else torch.empty(0, dtype=storage_type.dtype)
            )
            self.storages[key] = flat
        return self.storages[key]


_CLASS_HEADER = re.compile(r"^class (\w+)\((?:\w+\.)*Module\):\n((?:  .*\n)*)", re.MULTILINE)
_NAME_LIST = re.compile(r'"([^"]+)"')


def _declared_state(archive: zipfile.ZipFile, root: str) -> dict[str, set[str]]:
    """Parameter and buffer names per scripted class, from ``__parameters__``/``__buffers__`` declarations."""
    declared: dict[str, set[str]] = {}
    prefix = f"{root}/code/"
    for name in archive.namelist():
        if not (name.startswith(prefix) and name.endswith(".py")):
            continue
        module = name[len(prefix) : -len(".py")].replace("/", ".")  # __torch__/a/b.py -> __torch__.a.b
        source = archive.read(name).decode("utf-8")
        for match in _CLASS_HEADER.finditer(source):
            names: set[str] = set()
            for line in match.group(2).splitlines():
                stripped = line.strip()
                if stripped.startswith(("__parameters__", "__buffers__")):
                    names.update(_NAME_LIST.findall(stripped))
            declared[f"{module}.{match.group(1)}"] = names
    return declared


def _collect(
    obj: _ScriptObject, prefix: str, declared: dict[str, set[str]], out: dict[str, torch.Tensor]
) -> None:
    state_names = declared.get(obj.qualified_name)
    for name, value in getattr(obj, "attributes", {}).items():
        if isinstance(value, _ScriptObject):
            _collect(value, f"{prefix}{name}.", declared, out)
        elif isinstance(value, torch.Tensor) and value.layout == torch.strided:
            # a class without declarations (not expected) keeps every tensor attribute
            if state_names is None or name in state_names:
                out[f"{prefix}{name}"] = value


def read_torchscript_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive, read without TorchScript."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            roots = {name.split("/", 1)[0] for name in names if name.endswith("/data.pkl")}
            if len(roots) != 1:
                raise CheckpointError(f"{path}: expected one data.pkl in the archive, found {len(roots)}")
            root = roots.pop()
            if f"{root}/byteorder" in names and archive.read(f"{root}/byteorder").strip() != b"little":
                raise CheckpointError(f"{path}: big-endian archives are not supported")
            declared = _declared_state(archive, root)
            with archive.open(f"{root}/data.pkl") as file:
                top = _ArchiveUnpickler(file, archive, root).load()
    except CheckpointError:
        raise
    except Exception as error:  # a malformed archive fails in many ways; none of them runs its code
        raise CheckpointError(
            f"cannot read TorchScript archive {path}: {type(error).__name__}: {error}"
        ) from error
    if not isinstance(top, _ScriptObject):
        raise CheckpointError(f"{path}: the archive's data.pkl does not hold a module")
    out: dict[str, torch.Tensor] = {}
    _collect(top, "", declared, out)
    return out


# ---------------------------------------------------------------------------------------------------------
# Architecture from the tensor shapes (clip/model.py build_model)


def _require(state_dict: dict[str, torch.Tensor], names: tuple[str, ...], source: Path) -> None:
    missing = [name for name in names if name not in state_dict]
    if missing:
        raise CheckpointError(
            f"{source} is not an OpenAI CLIP state dict: missing {missing} "
            "(open_clip hub folders need their open_clip_config.json)"
        )


def _count_indices(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    """How many distinct ``<prefix><index>.`` blocks there are."""
    return len({key[len(prefix) :].split(".", 1)[0] for key in state_dict if key.startswith(prefix)})


def config_from_openai_state_dict(
    state_dict: dict[str, torch.Tensor], source: Path
) -> tuple[DualEncoderConfig, str]:
    """polyclip's config and the image key layout ("vit" or "resnet"), from the shapes as OpenAI does."""
    try:
        return _config_from_shapes(state_dict, source)
    except ConfigError as error:
        raise CheckpointError(f"{source}: the tensor shapes describe no valid CLIP model: {error}") from error


def _config_from_shapes(state_dict: dict[str, torch.Tensor], source: Path) -> tuple[DualEncoderConfig, str]:
    _require(
        state_dict,
        ("text_projection", "positional_embedding", "token_embedding.weight", "ln_final.weight"),
        source,
    )
    vit = "visual.proj" in state_dict  # OpenAI's own test
    if vit:
        _require(state_dict, ("visual.conv1.weight", "visual.positional_embedding"), source)
        width = state_dict["visual.conv1.weight"].shape[0]
        patch_size = state_dict["visual.conv1.weight"].shape[-1]
        grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = VisionConfig(
            image_size=patch_size * grid, patch_size=patch_size, width=width,
            layers=_count_indices(state_dict, "visual.transformer.resblocks."), heads=width // 64,
            mlp_dim=4 * width, act="quick_gelu",
        )  # fmt: skip
    else:
        _require(state_dict, ("visual.layer1.0.conv1.weight", "visual.attnpool.positional_embedding"), source)
        stage_blocks = tuple(_count_indices(state_dict, f"visual.layer{stage}.") for stage in (1, 2, 3, 4))
        output_grid = round((state_dict["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = VisionConfig(
            kind="resnet", image_size=output_grid * 32, resnet_layers=stage_blocks,
            resnet_width=state_dict["visual.layer1.0.conv1.weight"].shape[0],
        )  # fmt: skip
    text_width = state_dict["ln_final.weight"].shape[0]
    text = TextConfig(
        vocab_size=state_dict["token_embedding.weight"].shape[0],
        context_length=state_dict["positional_embedding"].shape[0], width=text_width,
        layers=_count_indices(state_dict, "transformer.resblocks."), heads=text_width // 64, mlp_dim=4 * text_width,
        act="quick_gelu",
    )  # fmt: skip
    config = DualEncoderConfig(embed_dim=state_dict["text_projection"].shape[1], vision=vision, text=text)
    return config, "vit" if vit else "resnet"


def clip_preprocess(image_size: int) -> dict[str, Any]:
    """OpenAI's evaluation transform (clip/clip.py _transform): short side bicubic, centre crop."""
    return dict(
        image_size=image_size, resize_mode="shortest", interpolation="bicubic", crop_pct=1.0,
        mean=OPENAI_MEAN, std=OPENAI_STD,
    )  # fmt: skip


def read_openai(path: Path) -> Checkpoint:
    notes: list[str] = []
    if is_torchscript_archive(path):
        state_dict = read_torchscript_state_dict(path)
        notes.append("read from a TorchScript archive (tensors only; no code run)")
    else:
        obj = read_weights(path)
        if "best_epoch" in obj:
            notes.append(f"PubMedCLIP training checkpoint (best_epoch {obj['best_epoch']})")
        state_dict = unwrap_state_dict(obj, path, notes)
    for name in CONFIG_ENTRIES:
        state_dict.pop(name, None)
    config, layout = config_from_openai_state_dict(state_dict, path)
    dtypes = sorted(
        {str(t.dtype).replace("torch.", "") for t in state_dict.values() if t.is_floating_point()}
    )
    if dtypes != ["float32"]:
        notes.append(f"stored as {', '.join(dtypes)}; converted to float32 when the model is built")
    return Checkpoint(
        format="openai",
        config=config,
        state_dict=convert_state_dict(state_dict, layout),
        preprocess=clip_preprocess(config.vision.image_size),
        tokenizer={"type": "clip", "context_length": config.text.context_length},
        source=path,
        notes=notes,
    )


__all__ = [
    "CONFIG_ENTRIES",
    "clip_preprocess",
    "config_from_openai_state_dict",
    "read_openai",
    "read_torchscript_state_dict",
]
