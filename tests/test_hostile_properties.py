"""Property-based tests of the checkpoint readers: whatever the bytes of a header, a record or a config,
the reader returns or raises a CheckpointError (or the config's ConfigError), never another exception,
and within a time and memory bound.

Inputs are generated near the formats (valid structure, hostile values) as well as at random, so that
the checks behind the first parse are reached. Examples are few enough to keep the default run to
seconds; ``HYPOTHESIS_PROFILE=thorough`` runs many more.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import zlib
from pathlib import Path

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from polyclip.checkpoints import CheckpointError, read_checkpoint
from polyclip.checkpoints.flax import decode_msgpack, to_pytorch_names
from polyclip.checkpoints.safetensors_io import SafetensorsError, read_safetensors
from polyclip.models import ConfigError
from test_hostile_support import module_pickle, stored, zip_archive

settings.register_profile(
    "default", max_examples=40, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.register_profile(
    "thorough", max_examples=2000, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

MEMORY_BOUND_MIB = 512  # peak growth over a whole property, far below what the hostile sizes claim


@pytest.fixture(autouse=True)
def bounded_memory():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # KiB on Linux
    assert growth_mib < MEMORY_BOUND_MIB, f"peak memory grew by {growth_mib:.0f} MiB"


def read_or_refuse(path: Path, format: str | None = None) -> None:
    try:
        read_checkpoint(path, format)
    except CheckpointError:
        pass


# Numbers that break readers: negative, zero, huge, non-integers, wrong types
hostile_ints = st.one_of(
    st.integers(-3, 70), st.sampled_from([0, -1, 2**31, 2**40, 10**12, 2**63, 2**64 + 1, 10_000_000])
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    hostile_ints,
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.just(float("1e308")),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)

# ---------------------------------------------------------------------------------------------------------
# safetensors

DTYPES = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8", "x", 3]
tensor_records = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(DTYPES),
        "shape": st.one_of(st.lists(hostile_ints, max_size=4), json_values),
        "data_offsets": st.one_of(st.lists(hostile_ints, min_size=2, max_size=2), json_values),
    }
)
headers = st.one_of(
    st.dictionaries(st.text(max_size=6), st.one_of(tensor_records, json_values), max_size=5), json_values
)


@given(header=headers, data=st.binary(max_size=64), length_delta=st.sampled_from([0, 0, 0, 1, -1, 2**40]))
def test_safetensors_any_header(tmp_path, header, data, length_delta):
    encoded = json.dumps(header).encode()
    length = max(0, len(encoded) + length_delta) % 2**64
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", length) + encoded + data)
    try:
        read_safetensors(path)
    except SafetensorsError:
        pass
    read_or_refuse(path)


@given(raw=st.binary(max_size=200))
def test_safetensors_any_bytes(tmp_path, raw):
    path = tmp_path / "x.safetensors"
    path.write_bytes(raw)
    read_or_refuse(path)


# ---------------------------------------------------------------------------------------------------------
# TorchScript archives: records and zip members

record_sizes = st.one_of(st.integers(0, 64), st.sampled_from([2**28, 2**40, 10**15]))
tensor_specs = st.dictionaries(
    st.sampled_from(["weight", "bias", "visual.proj", "x"]),
    st.tuples(
        st.sampled_from(["0", "1", "2"]), record_sizes, st.lists(st.integers(0, 70), max_size=3).map(tuple)
    ),
    min_size=1,
    max_size=3,
)
members = st.lists(
    st.tuples(st.sampled_from(["archive/data/0", "archive/data/1", "archive/data/2"]), st.integers(0, 300)),
    max_size=3,
    unique_by=lambda member: member[0],
)


@given(
    tensors=tensor_specs,
    storages=members,
    compress=st.booleans(),
    declared_extra=st.sampled_from([0, 0, 4, 2**30]),
)
def test_torchscript_any_records(tmp_path, tensors, storages, compress, declared_extra):
    entries = []
    for name, size in storages:
        data = bytes(size)
        if compress:
            compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
            body = compressor.compress(data) + compressor.flush()
            entries.append((name, body, 8, zlib.crc32(data), size + declared_extra))
        else:
            entries.append((name, data, 0, zlib.crc32(data), size))
    path = tmp_path / "model.pt"
    zip_archive(
        path,
        [
            stored("archive/data.pkl", module_pickle(tensors)),
            stored("archive/code/__torch__.py", b""),
            *entries,
        ],
    )
    read_or_refuse(path)


@given(pickle_bytes=st.binary(max_size=300), code=st.binary(max_size=100))
def test_torchscript_any_pickle(tmp_path, pickle_bytes, code):
    path = tmp_path / "model.pt"
    zip_archive(
        path,
        [stored("archive/data.pkl", b"\x80\x02" + pickle_bytes), stored("archive/code/__torch__.py", code)],
    )
    read_or_refuse(path)


@given(raw=st.binary(max_size=300))
def test_any_bytes_named_pt(tmp_path, raw):
    path = tmp_path / "model.pt"
    path.write_bytes(b"PK\x03\x04" + raw)
    read_or_refuse(path)


# ---------------------------------------------------------------------------------------------------------
# Flax msgpack


# msgpack holds integers of at most 64 bits
packable_ints = hostile_ints.filter(lambda n: -(2**63) <= n < 2**64)
packable_scalars = st.one_of(
    st.none(), st.booleans(), packable_ints, st.floats(allow_nan=False), st.text(max_size=8)
)


def _array(shape, dtype, size) -> msgpack.ExtType:
    return msgpack.ExtType(1, msgpack.packb((shape, dtype, bytes(size))))


arrays = st.builds(
    _array,
    st.one_of(st.lists(packable_ints, max_size=3), packable_scalars),
    st.sampled_from(["float32", "float16", "int64", "bool", "complex64", "x"]),
    st.integers(0, 64),
)
leaves = st.one_of(
    arrays, packable_scalars, st.builds(msgpack.ExtType, st.integers(0, 5), st.binary(max_size=20))
)
flax_trees = st.recursive(
    leaves, lambda inner: st.dictionaries(st.text(max_size=5), inner, max_size=4), max_leaves=10
)
chunked = st.fixed_dictionaries(
    {
        "__msgpack_chunked_array__": st.booleans(),
        "shape": st.dictionaries(st.sampled_from(["0", "1"]), packable_ints, max_size=2),
        "chunks": st.dictionaries(st.sampled_from(["0", "1"]), arrays, max_size=2),
    }
)


@given(tree=st.one_of(flax_trees, st.dictionaries(st.text(max_size=4), chunked, max_size=2)))
def test_flax_any_tree(tree):
    try:
        to_pytorch_names(decode_msgpack(msgpack.packb(tree)))
    except CheckpointError:
        pass


@given(raw=st.binary(max_size=200))
def test_flax_any_bytes(raw):
    try:
        decode_msgpack(raw)
    except CheckpointError:
        pass


# ---------------------------------------------------------------------------------------------------------
# Configs: transformers config.json, open_clip_config.json, polyclip_config.json

hf_towers = st.dictionaries(
    st.sampled_from(
        ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size",
         "hidden_act", "layer_norm_eps", "vocab_size", "max_position_embeddings", "eos_token_id", "projection_size"]
    ),
    st.one_of(json_scalars, json_values),
    max_size=6,
)  # fmt: skip
hf_configs = st.one_of(
    st.fixed_dictionaries(
        {
            "model_type": st.sampled_from(["clip", "siglip", "bert", 5]),
            "text_config": hf_towers,
            "vision_config": hf_towers,
        },
        optional={"projection_dim": json_scalars, "logit_scale_init_value": json_scalars},
    ),
    json_values,
)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    save_file({"logit_scale": torch.zeros(())}, path)
    return path


def folder_with(tmp_path: Path, name: str, config, weights: Path, weights_name: str) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(json.dumps(config))
    if not (folder / weights_name).exists():
        (folder / weights_name).symlink_to(weights)
    return folder


@given(config=hf_configs)
def test_transformers_any_config(tmp_path, weights_file, config):
    read_or_refuse(folder_with(tmp_path, "config.json", config, weights_file, "model.safetensors"), "hf")


open_clip_towers = st.dictionaries(
    st.sampled_from(["width", "layers", "head_width", "patch_size", "image_size", "mlp_ratio", "heads", "context_length",
                     "vocab_size", "timm_model_name", "pool_type", "act_kwargs", "norm_kwargs", "no_ln_pre"]),
    st.one_of(json_scalars, json_values, st.just("vit_base_patch16_siglip_224")),
    max_size=6,
)  # fmt: skip


@given(
    model_cfg=st.fixed_dictionaries(
        {"embed_dim": json_scalars, "vision_cfg": open_clip_towers, "text_cfg": open_clip_towers},
        optional={"quick_gelu": json_scalars, "init_logit_bias": json_scalars},
    ),
    preprocess_cfg=st.one_of(st.none(), json_values),
)
def test_open_clip_any_config(tmp_path, weights_file, model_cfg, preprocess_cfg):
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    read_or_refuse(
        folder_with(tmp_path, "open_clip_config.json", config, weights_file, "open_clip_model.safetensors")
    )


native_towers = st.dictionaries(
    st.sampled_from(["kind", "image_size", "patch_size", "width", "layers", "heads", "mlp_dim", "act", "norm_eps", "pool",
                     "class_token", "resnet_layers", "resnet_width", "vocab_size", "context_length", "eos_token_id"]),
    st.one_of(json_scalars, json_values, st.sampled_from(["vit", "resnet", "map", "gelu"])),
    max_size=5,
)  # fmt: skip


@given(
    model=st.one_of(
        st.fixed_dictionaries(
            {"vision": native_towers, "text": native_towers},
            optional={"embed_dim": json_scalars, "init_logit_scale": json_scalars},
        ),
        json_values,
    )
)
def test_native_any_config(tmp_path, weights_file, model):
    config = {"format_version": 1, "model": model, "preprocess": None, "tokenizer": None}
    read_or_refuse(folder_with(tmp_path, "polyclip_config.json", config, weights_file, "model.safetensors"))


@given(model=native_towers)
def test_config_classes_raise_config_error_only(model):
    from polyclip.models import DualEncoderConfig

    try:
        DualEncoderConfig.from_dict({"vision": model, "text": model})
    except ConfigError:
        pass
