"""Hostile and corrupt checkpoints: each is refused with a CheckpointError (a one-line CLI error), before
memory or time is spent on what the file claims.

Files are crafted here byte by byte where the attack needs it (a deflate stream that inflates to 1 GiB
inside a 1 MB zip, a safetensors header claiming a terabyte) and otherwise derived from a tiny
transformers CLIP folder.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from polyclip.checkpoints import CheckpointError, read_checkpoint
from polyclip.checkpoints.safetensors_io import read_safetensors
from polyclip.models import ConfigError, DualEncoderConfig, TextConfig, VisionConfig
from polyclip.models.config import MAX_PARAMETERS
from test_hostile_support import deflated_zeros, run_main, script_archive, stored

GIB = 1 << 30


def test_handmade_archive_reads_as_torch_would(tmp_path):
    """The hand-written archive format is right: an honest one reads back its tensor exactly."""
    from polyclip.checkpoints.openai import read_torchscript_state_dict

    values = torch.arange(6, dtype=torch.float32)
    script_archive(
        tmp_path / "ok.pt",
        {"weight": ("0", 6, (2, 3))},
        [stored("archive/data/0", values.numpy().tobytes())],
    )
    assert torch.equal(read_torchscript_state_dict(tmp_path / "ok.pt")["weight"], values.reshape(2, 3))


BOMB_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    from polyclip.checkpoints import CheckpointError, read_checkpoint
    results = {}
    for name in sys.argv[1:]:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            read_checkpoint(Path(name))
            outcome = "read"
        except CheckpointError as error:
            outcome = "CheckpointError: " + str(error)
        growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB on Linux
        results[name] = {"outcome": outcome, "growth_mib": growth / 1024}
    print(json.dumps(results))
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
def test_torchscript_storage_bombs_are_refused_before_reading(tmp_path):
    # 1: the record says 4 floats, the member inflates to 1 GiB
    script_archive(
        tmp_path / "mismatch.pt", {"weight": ("0", 4, (4,))}, [deflated_zeros("archive/data/0", GIB)]
    )
    # 2: record and shape agree on 1 GiB, but the 1 MB member is a decompression bomb
    script_archive(
        tmp_path / "inflating.pt",
        {"weight": ("0", GIB // 4, (GIB // 4,))},
        [deflated_zeros("archive/data/0", GIB)],
    )
    # 3: a tensor whose shape reaches past its 4-element storage
    script_archive(
        tmp_path / "overreach.pt",
        {"weight": ("0", 4, (1000, 1000))},
        [stored("archive/data/0", bytes(16))],
    )
    for name in ("mismatch.pt", "inflating.pt"):
        assert (tmp_path / name).stat().st_size < 3 * 1024 * 1024
    files = [str(tmp_path / name) for name in ("mismatch.pt", "inflating.pt", "overreach.pt")]
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", BOMB_SCRIPT, *files], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    outcomes = json.loads(result.stdout)
    mismatch, inflating, overreach = (outcomes[name] for name in files)
    assert "archive/data/0 declares 1,073,741,824 bytes, its record 4 elements" in mismatch["outcome"]
    assert "decompression bomb" in inflating["outcome"]
    assert "needs 1,000,000 elements of storage 0, which holds 4" in overreach["outcome"]
    for outcome in outcomes.values():
        assert outcome["outcome"].startswith("CheckpointError")
        assert outcome["growth_mib"] < 64, outcomes  # nothing near the 1 GiB the members inflate to
    assert time.perf_counter() - started < 60


# ---------------------------------------------------------------------------------------------------------
# safetensors headers


def safetensors_bytes(header: dict, data: bytes = b"", header_len: int | None = None) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded) if header_len is None else header_len) + encoded + data


BAD_HEADERS = {
    "beyond the file": (
        {"w": {"dtype": "F32", "shape": [250_000_000_000], "data_offsets": [0, 10**12]}},
        "data section",
    ),
    "negative": ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, "invalid data_offsets"),
    "wrong length": ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, "needs 12 bytes"),
    "overlapping": (
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        "overlap",
    ),
    "negative dimension": ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, "invalid shape"),
    "string shape": ({"w": {"dtype": "F32", "shape": "big", "data_offsets": [0, 0]}}, "invalid shape"),
    "unknown dtype": ({"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, "unsupported dtype"),
    "not a record": ({"w": [1, 2, 3]}, "no dtype/shape/data_offsets"),
    "not an object": ([1, 2], "not an object"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_safetensors_headers_are_checked_before_allocating(tmp_path, case):
    header, message = BAD_HEADERS[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(safetensors_bytes(header, bytes(16)))
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)


def test_safetensors_huge_header_length(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(safetensors_bytes({}, header_len=2**63))
    with pytest.raises(CheckpointError, match="header length"):
        read_checkpoint(path)


def test_safetensors_reader_matches_the_library(tmp_path):
    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.arange(5),
        "c": torch.zeros(0, 2),
        "d": torch.tensor([True, False]),
    }
    save_file(tensors, tmp_path / "ok.safetensors")
    ours, theirs = read_safetensors(tmp_path / "ok.safetensors"), load_file(tmp_path / "ok.safetensors")
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_info_on_a_terabyte_header_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(safetensors_bytes(BAD_HEADERS["beyond the file"][0], bytes(16)))
    code, _, error = run_main(monkeypatch, capsys, "info", str(path))
    assert code == 2 and error.startswith("error: ") and "data section" in error


# ---------------------------------------------------------------------------------------------------------
# Configs: one validation, shared by every reader


@pytest.fixture
def hf_folder(tiny_hf_clip_dir, tmp_path) -> Path:
    folder = tmp_path / "hf"
    shutil.copytree(tiny_hf_clip_dir, folder)
    return folder


def edit_json(path: Path, tower: str | None, **changes) -> None:
    data = json.loads(path.read_text())
    (data[tower] if tower else data).update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("tower", "changes", "message"),
    [
        ("text_config", {"num_hidden_layers": 10_000_000}, "text.layers must be between 0 and 1,024"),
        ("vision_config", {"hidden_size": -5}, "vision.width must be between 1"),
        ("vision_config", {"hidden_size": "abc"}, "vision.width must be an integer, got 'abc'"),
        ("vision_config", {"patch_size": 0}, "vision.patch_size must be between 1"),
        ("vision_config", {"image_size": 3}, "smaller than patch_size"),
        ("text_config", {"num_attention_heads": 5}, "not divisible by its 5 heads"),
        ("text_config", {"layer_norm_eps": -1.0}, "text.norm_eps must be a finite number"),
        (
            "vision_config",
            {"hidden_size": 32768, "num_hidden_layers": 1000, "num_attention_heads": 1},
            "parameters",
        ),
        (None, {"projection_dim": True}, "embed_dim must be an integer"),
    ],
)
def test_bad_configs_are_refused_by_load_and_info(hf_folder, tower, changes, message):
    import polyclip

    edit_json(hf_folder / "config.json", tower, **changes)
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=message):
        polyclip.load(hf_folder)
    assert time.perf_counter() - started < 5  # refused from the config, nothing built
    from polyclip.checkpoints import describe

    with pytest.raises(CheckpointError, match=message):
        describe(hf_folder)


def test_info_refuses_ten_million_layers_at_once(hf_folder, monkeypatch, capsys):
    edit_json(hf_folder / "config.json", "text_config", num_hidden_layers=10_000_000)
    started = time.perf_counter()
    code, _, error = run_main(monkeypatch, capsys, "info", str(hf_folder))
    assert code == 2 and "text.layers must be between 0 and 1,024, got 10,000,000" in error
    assert time.perf_counter() - started < 5


def test_hf_config_of_the_wrong_shape(hf_folder):
    (hf_folder / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(CheckpointError, match="malformed hf checkpoint"):
        read_checkpoint(hf_folder)
    (hf_folder / "config.json").write_text(
        json.dumps({"model_type": "clip", "vision_config": {"hidden_act": ["x"]}})
    )
    with pytest.raises(CheckpointError):
        read_checkpoint(hf_folder)


def test_open_clip_and_native_configs_go_through_the_same_checks(tmp_path):
    import polyclip
    from polyclip.models import create_model

    model = create_model("tiny-vit")
    folder = polyclip.save(model, None, {"type": "clip", "context_length": 77}, tmp_path / "native")
    edit_json(folder / "polyclip_config.json", None, model={**model.config.to_dict(), "embed_dim": "abc"})
    with pytest.raises(CheckpointError, match="embed_dim must be an integer"):
        read_checkpoint(folder)
    edit_json(folder / "polyclip_config.json", None, model={**model.config.to_dict(), "vision": "abc"})
    with pytest.raises(CheckpointError, match="vision config must be an object"):
        read_checkpoint(folder)

    open_clip = tmp_path / "open_clip"
    open_clip.mkdir()
    save_file({"x": torch.zeros(1)}, open_clip / "open_clip_model.safetensors")
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"width": 64, "head_width": 0, "layers": 2, "patch_size": 8, "image_size": 32},
    }
    (open_clip / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    with pytest.raises(CheckpointError, match="ZeroDivisionError"):
        read_checkpoint(open_clip)
    cfg["vision_cfg"] |= {"head_width": 64, "layers": -3}
    (open_clip / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    with pytest.raises(CheckpointError, match="vision.layers must be between 0"):
        read_checkpoint(open_clip)


def test_openai_shapes_that_describe_no_model(tmp_path):
    """OpenAI's state dicts carry no config: a width below 64 gives 0 heads, which the config refuses."""
    state = {
        "text_projection": torch.zeros(32, 16), "positional_embedding": torch.zeros(16, 32),
        "token_embedding.weight": torch.zeros(100, 32), "ln_final.weight": torch.zeros(32),
        "visual.proj": torch.zeros(32, 16), "visual.conv1.weight": torch.zeros(32, 3, 8, 8),
        "visual.positional_embedding": torch.zeros(17, 32),
    }  # fmt: skip
    torch.save(state, tmp_path / "narrow.pt")
    with pytest.raises(CheckpointError, match="heads must be between 1 and 32, got 0"):
        read_checkpoint(tmp_path / "narrow.pt")
    state["visual.positional_embedding"] = torch.zeros(0, 32)  # no class token row: a complex square root
    torch.save(state, tmp_path / "empty-grid.pt")
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp_path / "empty-grid.pt")


def test_config_validation_directly():
    with pytest.raises(ConfigError, match="vision.patch_size must be between 1"):
        VisionConfig(patch_size=0)
    with pytest.raises(ConfigError, match="text.causal must be true or false"):
        TextConfig(causal="yes")
    with pytest.raises(ConfigError, match="resnet_width must be even"):
        VisionConfig(kind="resnet", resnet_width=63)
    with pytest.raises(ConfigError, match="must be 4 block counts"):
        VisionConfig(kind="resnet", resnet_layers=(1, 2))
    with pytest.raises(ConfigError, match=f"limit of {MAX_PARAMETERS:,}"):
        DualEncoderConfig(text=TextConfig(vocab_size=16_000_000, width=8192, heads=8))
    with pytest.raises(ConfigError, match="init_logit_scale must be a finite number"):
        DualEncoderConfig(init_logit_scale=float("nan"))


# ---------------------------------------------------------------------------------------------------------
# Weights that do not fit the config


def test_one_wrong_shaped_projection_gets_the_strict_report(hf_folder):
    import polyclip

    weights = load_file(hf_folder / "model.safetensors")
    key = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    weights[key] = torch.zeros(48, 40)
    save_file(weights, hf_folder / "model.safetensors")
    with pytest.raises(CheckpointError) as error:
        polyclip.load(hf_folder)
    message = str(error.value)
    assert "does not match its architecture" in message
    assert "text.transformer.blocks.0.attn.q_proj.weight: checkpoint (48, 40) vs model (48, 48)" in message
    assert "missing keys" not in message and "unexpected keys" not in message


def test_integer_weights_where_floats_belong(hf_folder):
    import polyclip

    weights = load_file(hf_folder / "model.safetensors")
    weights["text_model.final_layer_norm.weight"] = torch.ones(48, dtype=torch.int64)
    save_file(weights, hf_folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"dtype mismatches \(1\): text.norm.weight: checkpoint int64"):
        polyclip.load(hf_folder)


# ---------------------------------------------------------------------------------------------------------
# Sharded indexes naming files outside the folder


def sharded_folder(hf_folder: Path, name: str) -> None:
    (hf_folder / "model.safetensors").rename(hf_folder.parent / "elsewhere.safetensors")
    weights = load_file(hf_folder.parent / "elsewhere.safetensors")
    index = {"metadata": {}, "weight_map": {key: name for key in weights}}
    (hf_folder / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink"])
def test_shard_index_naming_a_file_outside_the_folder_is_refused(hf_folder, kind):
    outside = hf_folder.parent / "elsewhere.safetensors"
    name = {"parent": "../elsewhere.safetensors", "absolute": str(outside), "symlink": "link.safetensors"}[
        kind
    ]
    sharded_folder(hf_folder, name)
    if kind == "symlink":
        os.symlink(outside, hf_folder / "link.safetensors")
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        read_checkpoint(hf_folder)


def test_shard_index_inside_the_folder_and_hub_snapshots_load(hf_folder, tmp_path):
    sharded_folder(hf_folder, "shards/model-1.safetensors")
    (hf_folder / "shards").mkdir()
    shutil.copy(hf_folder.parent / "elsewhere.safetensors", hf_folder / "shards" / "model-1.safetensors")
    assert read_checkpoint(hf_folder).state_dict
    # huggingface_hub's cache: snapshots/<revision>/<file> are symlinks into the repo's blobs/
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    shutil.copytree(hf_folder, snapshot, ignore=shutil.ignore_patterns("shards"))
    shutil.move(hf_folder / "shards" / "model-1.safetensors", repo / "blobs" / "0f1e")
    (snapshot / "shards").mkdir()
    os.symlink("../../../blobs/0f1e", snapshot / "shards" / "model-1.safetensors")
    assert read_checkpoint(snapshot).state_dict


def test_shard_index_of_the_wrong_shape(hf_folder):
    sharded_folder(hf_folder, "x.safetensors")
    for content in ("[]", '{"weight_map": []}', '{"weight_map": {"a": 5}}', "{not json"):
        (hf_folder / "model.safetensors.index.json").write_text(content)
        with pytest.raises(CheckpointError):
            read_checkpoint(hf_folder)


def test_a_refused_pickle_names_its_reason_without_torchs_advice_to_trust_it(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "model.pt"
    torch.save({"weight": Payload()}, path)
    with pytest.raises(CheckpointError) as raised:
        read_checkpoint(path)
    message = str(raised.value)
    assert "GLOBAL print was not an allowed global" in message
    assert "weights_only" not in message and "allowlist" not in message and "Please" not in message
    (tmp_path / "junk.pt").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(CheckpointError, match=r"cannot read .*junk.pt as a PyTorch state dict \(") as raised:
        read_checkpoint(tmp_path / "junk.pt")
    assert len(str(raised.value)) < 400
