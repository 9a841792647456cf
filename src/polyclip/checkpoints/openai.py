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
from polyclip.checkpoints.open_clip import convert_state_dict, unwrap_state_dict
from polyclip.models import ConfigError, DualEncoderConfig, TextConfig, VisionConfig
from polyclip.transforms import CLIP_MEAN, CLIP_STD

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


# torch writes its archives uncompressed; an entry someone re-packed with deflate may shrink, but one
# that inflates more than this is refused before it is read: a few MB must not become GBs in memory.
MAX_COMPRESSION_RATIO = 32
_READ_CHUNK = 1 << 20


def _entry(
    archive: zipfile.ZipFile, name: str, archive_size: int, expected: tuple[int, str] | None = None
) -> zipfile.ZipInfo:
    """The archive member ``name``, refused where its declared sizes cannot be honest or would inflate, or
    differ from ``expected`` (bytes, and what declares them)."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise pickle.UnpicklingError(f"the archive has no entry {name}") from None
    if expected is not None and info.file_size != expected[0]:
        raise pickle.UnpicklingError(f"{name} declares {info.file_size:,} bytes, {expected[1]}")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        # bzip2 and lzma members decompress without an output bound in zipfile
        raise pickle.UnpicklingError(f"entry {name} uses compression method {info.compress_type}")
    if info.compress_size > archive_size:
        raise pickle.UnpicklingError(
            f"entry {name} claims {info.compress_size:,} stored bytes in an archive of {archive_size:,}"
        )
    if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
        raise pickle.UnpicklingError(f"stored entry {name} declares two different sizes")
    if info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, _READ_CHUNK):
        raise pickle.UnpicklingError(
            f"entry {name} inflates {info.compress_size:,} bytes to {info.file_size:,}: refused as a "
            f"decompression bomb (limit {MAX_COMPRESSION_RATIO}:1)"
        )
    return info


class _Storage:
    """A storage record of the archive, read only once every tensor on it has been checked."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.used = 0  # elements its tensors reach, the largest extent of any view
        self.data: torch.Tensor | None = None


class _PendingTensor:
    """(storage, element offset, shape, strides) of a tensor whose bytes are not read yet."""

    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def materialize(self) -> torch.Tensor:
        return self.storage.data.as_strided(self.size, self.stride, self.offset)


def _ints(values, what: str) -> tuple[int, ...]:
    if not isinstance(values, tuple | list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values
    ):
        raise pickle.UnpicklingError(f"a tensor record has an invalid {what} {values!r}")
    return tuple(values)


def _rebuild_tensor(
    storage: _Storage, offset: int, size, stride, requires_grad=False, hooks=None, metadata=None
):
    # (flat storage, element offset, shape, strides) -> a view; the saved requires_grad flag is irrelevant.
    # The view must fit its storage; that is known from the record alone, before any byte is read.
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor record does not name a storage")
    size, stride = _ints(size, "shape"), _ints(stride, "stride")
    (offset,) = _ints((offset,), "offset")
    if len(size) != len(stride):
        raise pickle.UnpicklingError(f"a tensor record has shape {size} but strides {stride}")
    extent = 0 if 0 in size else offset + sum((n - 1) * step for n, step in zip(size, stride)) + 1
    if extent > storage.numel:
        raise pickle.UnpicklingError(
            f"a tensor of shape {size} needs {extent:,} elements of storage {storage.key}, which holds {storage.numel:,}"
        )
    storage.used = max(storage.used, extent)
    return _PendingTensor(storage, offset, size, stride)


class _ArchiveUnpickler(pickle.Unpickler):
    """Rebuilds tensors from the archive's storages and scripted objects as attribute records; refuses any
    other global, so nothing named by the file can run. Storages are only recorded here; `read_storages`
    reads them once the whole record has been checked."""

    def __init__(self, file, archive: zipfile.ZipFile, root: str, archive_size: int):
        super().__init__(file)
        self.archive = archive
        self.root = root
        self.archive_size = archive_size
        self.storages: dict[str, _Storage] = {}
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
        if not isinstance(key, str) or not key.isascii() or not key.isalnum():
            raise pickle.UnpicklingError(f"invalid storage key {key!r}")
        (numel,) = _ints((numel,), "storage size")
        if key not in self.storages:
            storage = _Storage(key, storage_type.dtype, numel)
            nbytes = numel * torch.empty(0, dtype=storage.dtype).element_size()
            record = (nbytes, f"its record {numel:,} elements ({nbytes:,} bytes)")
            _entry(self.archive, f"{self.root}/data/{key}", self.archive_size, record)
            self.storages[key] = storage
        return self.storages[key]

    def read_storages(self, storages: list[_Storage]) -> None:
        """Read each storage straight into its own tensor, in chunks: memory is the weights' size."""
        for storage in storages:
            if storage.data is not None:
                continue
            if storage.numel > 2 * storage.used + _READ_CHUNK:
                raise pickle.UnpicklingError(
                    f"storage {storage.key} holds {storage.numel:,} elements but its tensors use {storage.used:,}"
                )
            flat = torch.empty(storage.numel, dtype=storage.dtype)
            view = memoryview(flat.view(torch.uint8).numpy() if storage.numel else bytearray()).cast("B")
            with self.archive.open(f"{self.root}/data/{storage.key}") as entry:
                filled = 0
                while filled < len(view):
                    count = entry.readinto(view[filled : filled + _READ_CHUNK])
                    if not count:
                        raise pickle.UnpicklingError(f"storage {storage.key} ends early")
                    filled += count
                if entry.read(1):  # also makes zipfile check the entry's CRC
                    raise pickle.UnpicklingError(f"storage {storage.key} holds more than it declares")
            storage.data = flat


_CLASS_HEADER = re.compile(r"^class (\w+)\((?:\w+\.)*Module\):\n((?:  .*\n)*)", re.MULTILINE)
_NAME_LIST = re.compile(r'"([^"]+)"')


def _declared_state(archive: zipfile.ZipFile, root: str, archive_size: int) -> dict[str, set[str]]:
    """Parameter and buffer names per scripted class, from ``__parameters__``/``__buffers__`` declarations."""
    declared: dict[str, set[str]] = {}
    prefix = f"{root}/code/"
    for name in archive.namelist():
        if not (name.startswith(prefix) and name.endswith(".py")):
            continue
        module = name[len(prefix) : -len(".py")].replace("/", ".")  # __torch__/a/b.py -> __torch__.a.b
        _entry(archive, name, archive_size)
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
    obj: _ScriptObject,
    prefix: str,
    declared: dict[str, set[str]],
    out: dict[str, _PendingTensor],
    depth: int = 0,
) -> None:
    if depth > 100:
        raise CheckpointError("the archive's modules are nested more than 100 deep")
    state_names = declared.get(obj.qualified_name)
    for name, value in getattr(obj, "attributes", {}).items():
        if isinstance(value, _ScriptObject):
            _collect(value, f"{prefix}{name}.", declared, out, depth + 1)
        elif isinstance(value, _PendingTensor):
            # a class without declarations (not expected) keeps every tensor attribute
            if state_names is None or name in state_names:
                out[f"{prefix}{name}"] = value


def read_torchscript_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive, read without TorchScript.

    Every size the archive declares is checked before anything is read or allocated: an entry's
    compressed and inflated sizes (`_entry`), a storage's size against its record, each tensor's shape
    and strides against its storage. Only the storages of the parameters and buffers are then read.
    """
    archive_size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            roots = {name.split("/", 1)[0] for name in names if name.endswith("/data.pkl")}
            if len(roots) != 1:
                raise CheckpointError(f"{path}: expected one data.pkl in the archive, found {len(roots)}")
            root = roots.pop()
            if f"{root}/byteorder" in names:
                _entry(archive, f"{root}/byteorder", archive_size)
                if archive.read(f"{root}/byteorder").strip() != b"little":
                    raise CheckpointError(f"{path}: big-endian archives are not supported")
            declared = _declared_state(archive, root, archive_size)
            _entry(archive, f"{root}/data.pkl", archive_size)
            with archive.open(f"{root}/data.pkl") as file:
                unpickler = _ArchiveUnpickler(file, archive, root, archive_size)
                top = unpickler.load()
            if not isinstance(top, _ScriptObject):
                raise CheckpointError(f"{path}: the archive's data.pkl does not hold a module")
            pending: dict[str, _PendingTensor] = {}
            _collect(top, "", declared, pending)
            unpickler.read_storages([tensor.storage for tensor in pending.values()])
            return {name: tensor.materialize() for name, tensor in pending.items()}
    except CheckpointError:
        raise
    except Exception as error:  # a malformed archive fails in many ways; none of them runs its code
        raise CheckpointError(
            f"cannot read TorchScript archive {path}: {type(error).__name__}: {error}"
        ) from error


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
        mean=CLIP_MEAN, std=CLIP_STD,
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
