"""Checkpoint formats: parity with each format's reference implementation on the same weights.

References: transformers' CLIPModel and SiglipModel (test-time dependency); open_clip's own model classes
when the open_clip_torch wheel is installed (loaded by file path, without its torchvision-only helpers);
a hand-written functional forward of OpenAI's ModifiedResNet. State dicts in open_clip/OpenAI key names and
flax's msgpack encoding are written here by hand from the reference weights, so each reader is checked
against an independent writer. Tolerance: 1e-5 in fp32.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import pickle
import re
import sys
import types
import zipfile
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import import_reference, missing_reference
from polyclip.checkpoints import CheckpointError, build_model, detect_format, load_strict, read_checkpoint
from polyclip.checkpoints import open_clip as open_clip_format
from polyclip.checkpoints.export import ExportError, export_hf, export_open_clip
from polyclip.models import DualEncoderConfig, TextConfig, VisionConfig, create_model

transformers = import_reference("transformers", "pip install transformers")

TOLERANCE = 1e-5
VOCAB = 100  # tiny CLIP-style vocabulary: start token 98, end token 99 (the highest id, as in CLIP's BPE)


# ---------------------------------------------------------------------------------------------------------
# Inputs and comparison


def clip_token_ids(context: int, seed: int = 0) -> torch.Tensor:
    """(3, context): start, random tokens, end (the highest id), zero padding; three different lengths."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(3, context, dtype=torch.long)
    for row, length in enumerate((3, context // 2, context - 2)):
        ids[row, 0] = VOCAB - 2
        ids[row, 1 : length + 1] = torch.randint(1, VOCAB - 3, (length,), generator=generator)
        ids[row, length + 1] = VOCAB - 1
    return ids


def siglip_token_ids(context: int, seed: int = 0) -> torch.Tensor:
    """(3, context): random tokens then the end token 1 repeated to the end, as SigLIP pads."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.ones(3, context, dtype=torch.long)
    for row, length in enumerate((2, context // 2, context - 1)):
        ids[row, :length] = torch.randint(2, VOCAB, (length,), generator=generator)
    return ids


def pixels(size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every weight and statistic random (norm scales near 1, variances positive) so that no mapping error
    can hide behind a zero or one initialisation."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in module.state_dict().items():
        if not tensor.is_floating_point():
            continue
        noise = torch.randn(tensor.shape, generator=generator)
        if name.endswith("running_var"):
            tensor.copy_(noise.abs() * 0.5 + 0.5)
        elif tensor.ndim == 1 and name.endswith("weight"):  # LayerNorm / BatchNorm scales
            tensor.copy_(1 + 0.1 * noise)
        else:
            tensor.copy_(0.1 * noise)
    return module


def features(output) -> torch.Tensor:
    """transformers >= 5 returns a model output from get_*_features; older versions a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def assert_matches_hf(ours, reference, images: torch.Tensor, ids: torch.Tensor) -> None:
    ours.eval()
    reference.eval()
    out = ours(images, ids)
    expected = reference(input_ids=ids, pixel_values=images)
    torch.testing.assert_close(
        ours.encode_image(images),
        features(reference.get_image_features(pixel_values=images)),
        atol=TOLERANCE,
        rtol=0,
    )
    torch.testing.assert_close(
        ours.encode_text(ids), features(reference.get_text_features(input_ids=ids)), atol=TOLERANCE, rtol=0
    )
    torch.testing.assert_close(out.image_embeds, expected.image_embeds, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(out.text_embeds, expected.text_embeds, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(
        out.logits_per_image, expected.logits_per_image, atol=TOLERANCE, rtol=TOLERANCE
    )


def load(path: Path, format: str | None = None):
    return build_model(read_checkpoint(path, format))


# ---------------------------------------------------------------------------------------------------------
# Tiny transformers references


def hf_clip(act: str = "quick_gelu", eos_token_id: int = VOCAB - 1, vision_width: int = 48, text_width: int = 32,
            vision_heads: int = 4, text_heads: int = 4, mlp_ratio: int = 2, seed: int = 0):  # fmt: skip
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=VOCAB, hidden_size=text_width, intermediate_size=mlp_ratio * text_width, num_hidden_layers=2,
            num_attention_heads=text_heads, max_position_embeddings=16, hidden_act=act, eos_token_id=eos_token_id,
        ),
        vision_config=dict(
            hidden_size=vision_width, intermediate_size=mlp_ratio * vision_width, num_hidden_layers=2,
            num_attention_heads=vision_heads, image_size=32, patch_size=8, hidden_act=act,
        ),
        projection_dim=24,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = randomize_(transformers.CLIPModel(config), seed).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100) + 3e-4)  # above the default cap, as OpenAI's fp16 value is
    return model


def hf_siglip(act: str = "gelu_pytorch_tanh", seed: int = 0, image_size: int = 32, patch_size: int = 8):
    common = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, hidden_act=act
    )
    config = transformers.SiglipConfig(
        text_config=dict(vocab_size=VOCAB, max_position_embeddings=16, **common),
        vision_config=dict(image_size=image_size, patch_size=patch_size, **common),
    )
    torch.manual_seed(seed)
    model = randomize_(transformers.SiglipModel(config), seed).eval()
    with torch.no_grad():
        model.logit_scale.fill_(4.72)  # released SigLIP values sit above log(100)
        model.logit_bias.fill_(-16.5)
    return model


# ---------------------------------------------------------------------------------------------------------
# Writers in other libraries' key names, written here independently of polyclip's converters


def hf_clip_to_openai(state: dict[str, torch.Tensor], text_prefix: str = "") -> dict[str, torch.Tensor]:
    """transformers CLIPModel keys -> OpenAI / open_clip CLIP keys (q/k/v fused into in_proj)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    parts = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}  # fmt: skip
    simple = {
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "text_model.embeddings.token_embedding.weight": f"{text_prefix}token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": f"{text_prefix}positional_embedding",
        "logit_scale": "logit_scale",
    }
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key in simple:
            out[simple[key]] = value
            continue
        if key == "visual_projection.weight":
            out["visual.proj"] = value.T.contiguous()
            continue
        if key == "text_projection.weight":
            out[f"{text_prefix}text_projection"] = value.T.contiguous()
            continue
        match = re.fullmatch(
            r"(vision|text)_model\.(pre_layrnorm|post_layernorm|final_layer_norm)\.(\w+)", key
        )
        if match:
            name = {"pre_layrnorm": "visual.ln_pre", "post_layernorm": "visual.ln_post",
                    "final_layer_norm": f"{text_prefix}ln_final"}[match[2]]  # fmt: skip
            out[f"{name}.{match[3]}"] = value
            continue
        match = re.fullmatch(r"(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        assert match, key
        block = ("visual." if match[1] == "vision" else text_prefix) + f"transformer.resblocks.{match[2]}"
        if match[3] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            fused.setdefault(f"{block}.attn.in_proj_{match[4]}", {})[match[3][10]] = value
        else:
            out[f"{block}.{parts[match[3]]}.{match[4]}"] = value
    for key, qkv in fused.items():
        out[key] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return out


def hf_siglip_to_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers SiglipModel keys -> open_clip's SigLIP (timm trunk + CustomTextCLIP) keys."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    timm_parts = {"layer_norm1": "norm1", "layer_norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
                  "self_attn.out_proj": "attn.proj"}  # fmt: skip
    text_parts = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                  "self_attn.out_proj": "attn.out_proj"}  # fmt: skip
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key in ("logit_scale", "logit_bias"):
            out[key] = value.reshape(())
        elif key.startswith("vision_model.embeddings.patch_embedding."):
            out["visual.trunk.patch_embed.proj." + key.rsplit(".", 1)[1]] = value
        elif key == "vision_model.embeddings.position_embedding.weight":
            out["visual.trunk.pos_embed"] = value.unsqueeze(0)
        elif key.startswith("vision_model.post_layernorm."):
            out["visual.trunk.norm." + key.rsplit(".", 1)[1]] = value
        elif key == "vision_model.head.probe":
            out["visual.trunk.attn_pool.latent"] = value
        elif key.startswith("vision_model.head.attention.in_proj_"):
            kind = key.rsplit("_", 1)[1]
            width = value.shape[0] // 3
            out[f"visual.trunk.attn_pool.q.{kind}"] = value[:width]
            out[f"visual.trunk.attn_pool.kv.{kind}"] = value[width:]
        elif key.startswith("vision_model.head.attention.out_proj."):
            out["visual.trunk.attn_pool.proj." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("vision_model.head.layernorm."):
            out["visual.trunk.attn_pool.norm." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("vision_model.head.mlp."):
            out["visual.trunk.attn_pool.mlp." + key[len("vision_model.head.mlp.") :]] = value
        elif key == "text_model.embeddings.token_embedding.weight":
            out["text.token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out["text.positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out["text.ln_final." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("text_model.head."):
            out["text.text_projection." + key.rsplit(".", 1)[1]] = value
        else:
            match = re.fullmatch(r"(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
            assert match, key
            vision = match[1] == "vision"
            block = f"visual.trunk.blocks.{match[2]}" if vision else f"text.transformer.resblocks.{match[2]}"
            if match[3] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                fused_name = f"{block}.attn.qkv.{match[4]}" if vision else f"{block}.attn.in_proj_{match[4]}"
                fused.setdefault(fused_name, {})[match[3][10]] = value
            else:
                out[f"{block}.{(timm_parts if vision else text_parts)[match[3]]}.{match[4]}"] = value
    for key, qkv in fused.items():
        out[key] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return out


def write_open_clip_folder(folder: Path, model_cfg: dict, state: dict[str, torch.Tensor], preprocess_cfg=None,
                           weights: str = "open_clip_model.safetensors") -> Path:  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    record = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}
    (folder / "open_clip_config.json").write_text(json.dumps(record))
    if weights.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / weights))
    else:
        torch.save(state, folder / weights)
    return folder


# ---------------------------------------------------------------------------------------------------------
# transformers folders


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hf_clip_matches_transformers(tmp_path, act):
    reference = hf_clip(act)
    reference.save_pretrained(tmp_path)
    assert detect_format(tmp_path) == "hf"
    assert_matches_hf(load(tmp_path), reference, pixels(32), clip_token_ids(16))


def test_hf_clip_pooling_legacy_and_modern_eos(tmp_path):
    # A sequence whose highest id (99) comes before the end token 98: argmax and first-eos pooling differ.
    ids = clip_token_ids(16)
    ids[:, 1] = VOCAB - 1
    ids[ids == VOCAB - 2] = 5
    ids[:, 8] = VOCAB - 2
    for eos, expected_pool in ((2, "argmax"), (VOCAB - 2, "eos")):
        reference = hf_clip(eos_token_id=eos)
        folder = tmp_path / f"eos{eos}"
        reference.save_pretrained(folder)
        checkpoint = read_checkpoint(folder)
        assert checkpoint.config.text.pool == expected_pool
        assert_matches_hf(build_model(checkpoint), reference, pixels(32), ids)


def test_hf_sharded_and_pytorch_bin(tmp_path):
    reference = hf_clip()
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert_matches_hf(load(tmp_path / "sharded"), reference, pixels(32), clip_token_ids(16))
    # pytorch_model.bin, as older transformers versions saved
    reference.config.save_pretrained(tmp_path / "bin")
    torch.save(reference.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert_matches_hf(load(tmp_path / "bin"), reference, pixels(32), clip_token_ids(16))


def test_hf_siglip_matches_transformers(tmp_path):
    reference = hf_siglip()
    reference.save_pretrained(tmp_path)
    ours = load(tmp_path)
    assert ours.logit_bias is not None
    assert_matches_hf(ours, reference, pixels(32), siglip_token_ids(16))


def test_hf_siglip_whose_image_is_not_a_whole_number_of_patches(tmp_path):
    # as google/siglip-so400m-patch14-384 (27 x 27 patches of 14 over 384 px): the strided patch
    # convolution leaves out the last rows and columns
    reference = hf_siglip(image_size=30, patch_size=7)
    reference.save_pretrained(tmp_path)
    ours = load(tmp_path)
    assert ours.config.vision.grid_size == 4
    assert_matches_hf(ours, reference, pixels(30), siglip_token_ids(16))


# ---------------------------------------------------------------------------------------------------------
# open_clip hub folders


def open_clip_cfg_from_hf(reference, quick_gelu: bool) -> dict:
    vision, text = reference.config.vision_config, reference.config.text_config
    return {
        "embed_dim": reference.config.projection_dim,
        "quick_gelu": quick_gelu,
        "vision_cfg": {"image_size": vision.image_size, "layers": vision.num_hidden_layers, "width": vision.hidden_size,
                       "patch_size": vision.patch_size, "head_width": vision.hidden_size // vision.num_attention_heads,
                       "mlp_ratio": vision.intermediate_size / vision.hidden_size},
        "text_cfg": {"context_length": text.max_position_embeddings, "vocab_size": text.vocab_size,
                     "width": text.hidden_size, "heads": text.num_attention_heads, "layers": text.num_hidden_layers,
                     "mlp_ratio": text.intermediate_size / text.hidden_size},
    }  # fmt: skip


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_open_clip_folder_matches_transformers(tmp_path, act):
    reference = hf_clip(act)
    state = hf_clip_to_openai(reference.state_dict())
    preprocess = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2], "resize_mode": "squash"}
    write_open_clip_folder(tmp_path, open_clip_cfg_from_hf(reference, act == "quick_gelu"), state, preprocess)
    checkpoint = read_checkpoint(tmp_path)
    assert checkpoint.format == "open_clip"
    assert checkpoint.preprocess["resize_mode"] == "squash" and checkpoint.preprocess["mean"] == (
        0.5,
        0.4,
        0.3,
    )
    assert checkpoint.tokenizer is None  # a 100-token vocabulary is not CLIP's BPE
    assert any("vocab_size 100" in note for note in checkpoint.notes)
    assert_matches_hf(build_model(checkpoint), reference, pixels(32), clip_token_ids(16))


def test_open_clip_custom_text_layout(tmp_path):
    reference = hf_clip("gelu")
    state = hf_clip_to_openai(reference.state_dict(), text_prefix="text.")
    model_cfg = {**open_clip_cfg_from_hf(reference, False), "custom_text": True}
    write_open_clip_folder(tmp_path, model_cfg, state, weights="open_clip_pytorch_model.bin")
    assert_matches_hf(load(tmp_path), reference, pixels(32), clip_token_ids(16))


@pytest.fixture
def tiny_timm_family(monkeypatch):
    """A tiny SigLIP trunk family, named like timm's, matching hf_siglip's sizes."""
    monkeypatch.setitem(
        open_clip_format.TIMM_SIGLIP_FAMILIES, "tiny", dict(width=32, layers=2, heads=4, mlp_dim=64)
    )
    return "vit_tiny_patch8_siglip_32"


def siglip_open_clip_cfg(timm_name: str) -> dict:
    return {
        "embed_dim": 32, "init_logit_bias": -10, "custom_text": True,
        "vision_cfg": {"image_size": 32, "timm_model_name": timm_name, "timm_model_pretrained": False,
                       "timm_pool": "map", "timm_proj": "none"},
        "text_cfg": {"context_length": 16, "vocab_size": VOCAB, "hf_tokenizer_name": "timm/ViT-B-16-SigLIP",
                     "tokenizer_kwargs": {"clean": "canonicalize"}, "width": 32, "heads": 4, "layers": 2,
                     "mlp_ratio": 2.0, "no_causal_mask": True, "proj_bias": True, "pool_type": "last",
                     "norm_kwargs": {"eps": 1e-6}},
    }  # fmt: skip


def test_open_clip_siglip_timm_trunk_matches_transformers(tmp_path, tiny_timm_family):
    reference = hf_siglip(act="gelu")  # timm's trunk and open_clip's text tower use exact GELU
    write_open_clip_folder(
        tmp_path, siglip_open_clip_cfg(tiny_timm_family), hf_siglip_to_open_clip(reference.state_dict())
    )
    checkpoint = read_checkpoint(tmp_path)
    tokenizer = checkpoint.tokenizer  # open_clip's SigLIP configs clean with "canonicalize" (lower case)
    assert tokenizer["type"] == "siglip" and tokenizer.get("do_lower_case", True) is True
    assert (
        tokenizer["clean"] == "canonicalize"
        and tokenizer["spiece_model"] == "hf-hub:timm/ViT-B-16-SigLIP/spiece.model"
    )
    assert any("timm/ViT-B-16-SigLIP" in note for note in checkpoint.notes)
    assert_matches_hf(build_model(checkpoint), reference, pixels(32), siglip_token_ids(16))


def test_open_clip_config_errors(tmp_path, tiny_timm_family):
    reference = hf_clip()
    state = hf_clip_to_openai(reference.state_dict())
    cases = {
        "attentional_pool": ({"vision_cfg": {"attentional_pool": True}}, "attentional_pool"),
        "unknown": ({"text_cfg": {"rope": True}}, "rope"),
        "coca": ({"multimodal_cfg": {}}, "multimodal_cfg"),
        "pool": ({"text_cfg": {"pool_type": "first"}}, "pool_type"),
    }
    for name, (change, expected) in cases.items():
        model_cfg = open_clip_cfg_from_hf(reference, True)
        for section, values in change.items():
            model_cfg[section] = {**model_cfg.get(section, {}), **values}
        write_open_clip_folder(tmp_path / name, model_cfg, state)
        with pytest.raises(CheckpointError, match=expected):
            read_checkpoint(tmp_path / name)
    siglip = siglip_open_clip_cfg("vit_base_patch16_siglip_gap_224")
    write_open_clip_folder(tmp_path / "gap", siglip, state)
    with pytest.raises(CheckpointError, match="not supported"):
        read_checkpoint(tmp_path / "gap")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": open_clip_cfg_from_hf(reference, True)})
    )
    with pytest.raises(CheckpointError, match="open_clip_model.safetensors"):
        read_checkpoint(tmp_path / "noweights")


# --- open_clip's own classes as the reference (when the wheel is installed)


@pytest.fixture(scope="module")
def open_clip_reference():
    """open_clip's model.py loaded by file path under a private name, with its torchvision-only helpers
    (used for freezing and feature taps, not by forward) replaced; skipped when open_clip is absent."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        missing_reference("open_clip_torch is not installed (pip install --no-deps open_clip_torch)")
    name = "_open_clip_reference"
    package = types.ModuleType(name)
    package.__path__ = list(spec.submodule_search_locations)
    helpers = types.ModuleType(f"{name}.utils")
    helpers.to_2tuple = lambda x: tuple(x) if isinstance(x, list | tuple) else (x, x)

    def unused(*args, **kwargs):
        raise NotImplementedError("not needed by forward")

    helpers.feature_take_indices = helpers.freeze_batch_norm_2d = unused
    saved = {key: sys.modules.get(key) for key in (name, f"{name}.utils")}
    sys.modules[name], sys.modules[f"{name}.utils"] = package, helpers
    try:
        module = importlib.import_module(f"{name}.model")
    except Exception as error:  # a newer open_clip may import more than this test provides
        missing_reference(f"open_clip's model.py does not import here: {error}")
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
    yield module
    for key in [k for k in sys.modules if k.startswith(name)]:
        sys.modules.pop(key)


OPEN_CLIP_CASES = {
    "vit-quick-gelu": dict(
        model_cfg={"embed_dim": 24, "quick_gelu": True,
                   "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "patch_size": 8, "head_width": 12},
                   "text_cfg": {"context_length": 16, "vocab_size": VOCAB, "width": 32, "heads": 4, "layers": 2}},
        custom=False, ids=clip_token_ids(16)),
    "resnet": dict(
        model_cfg={"embed_dim": 24,
                   "vision_cfg": {"image_size": 64, "layers": [1, 2, 1, 1], "width": 8, "patch_size": None},
                   "text_cfg": {"context_length": 16, "vocab_size": VOCAB, "width": 32, "heads": 4, "layers": 1}},
        custom=False, ids=clip_token_ids(16)),
    "custom-text-sigmoid": dict(
        model_cfg={"embed_dim": 24, "custom_text": True, "init_logit_bias": -10,
                   "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "no_ln_pre": True,
                                  "norm_kwargs": {"eps": 1e-6}},
                   "text_cfg": {"context_length": 16, "vocab_size": VOCAB, "width": 32, "heads": 2, "layers": 2,
                                "no_causal_mask": True, "pool_type": "last", "proj_bias": True,
                                "act_kwargs": {"approximate": "tanh"}, "norm_kwargs": {"eps": 1e-6}}},
        custom=True, ids=siglip_token_ids(16)),
    "eos-pool": dict(
        model_cfg={"embed_dim": 24,
                   "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "mlp_ratio": 3.0,
                                  "head_width": 16},
                   "text_cfg": {"context_length": 16, "vocab_size": VOCAB, "width": 32, "heads": 4, "layers": 1,
                                "pool_type": "eos", "eos_id": 50}},
        custom=False, ids=clip_token_ids(16)),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(OPEN_CLIP_CASES))
def test_open_clip_matches_open_clip_classes(tmp_path, open_clip_reference, case):
    spec = OPEN_CLIP_CASES[case]
    cfg = spec["model_cfg"]
    cls = open_clip_reference.CustomTextCLIP if spec["custom"] else open_clip_reference.CLIP
    torch.manual_seed(0)
    reference = cls(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=cfg.get("quick_gelu", False),
                    init_logit_bias=cfg.get("init_logit_bias"))  # fmt: skip
    randomize_(reference).eval()
    write_open_clip_folder(tmp_path, cfg, reference.state_dict(), weights="open_clip_pytorch_model.bin")
    ours = load(tmp_path)
    images, ids = pixels(cfg["vision_cfg"]["image_size"]), spec["ids"]
    with torch.no_grad():
        torch.testing.assert_close(
            ours.encode_image(images), reference.encode_image(images), atol=TOLERANCE, rtol=0
        )
        torch.testing.assert_close(ours.encode_text(ids), reference.encode_text(ids), atol=TOLERANCE, rtol=0)
        logits, _ = reference.get_logits(images, ids)
        torch.testing.assert_close(ours(images, ids).logits_per_image, logits, atol=1e-4, rtol=1e-5)


def test_open_clip_full_config_dumps_are_read(open_clip_reference):
    """Every default of open_clip's config dataclasses is one polyclip implements (a dump of all fields
    reads), and a timm trunk's settings are checked only for timm trunks."""
    import dataclasses

    vision = dataclasses.asdict(
        open_clip_reference.CLIPVisionCfg(layers=2, width=64, patch_size=16, image_size=32)
    )
    text = dataclasses.asdict(open_clip_reference.CLIPTextCfg(width=64, heads=1, layers=1))
    config, layout = open_clip_format.config_from_open_clip(
        {"embed_dim": 16, "vision_cfg": vision, "text_cfg": text}
    )
    assert layout == "vit" and config.vision.heads == 1 and config.text.pool == "argmax"
    timm = {**vision, "image_size": 378, "timm_model_name": "vit_so400m_patch14_siglip_378", "timm_pool": "map",
            "timm_proj": "none"}  # fmt: skip
    config, layout = open_clip_format.config_from_open_clip(
        {"embed_dim": 1152, "vision_cfg": timm, "text_cfg": text}
    )
    assert layout == "timm" and (config.vision.width, config.vision.mlp_dim, config.vision.patch_size) == (
        1152,
        4304,
        14,
    )
    with pytest.raises(CheckpointError, match="timm_pool"):
        open_clip_format.config_from_open_clip(
            {"embed_dim": 1152, "vision_cfg": {**timm, "timm_pool": "avg"}, "text_cfg": text}
        )


# --- ModifiedResNet: a hand-written functional reference of OpenAI's forward


def openai_resnet_forward(state: dict[str, torch.Tensor], images: torch.Tensor, stage_blocks, heads: int):
    """OpenAI clip/model.py ModifiedResNet.forward, written with functional ops on OpenAI key names."""

    def bn(x, name):
        return F.batch_norm(x, state[f"{name}.running_mean"], state[f"{name}.running_var"], state[f"{name}.weight"],
                            state[f"{name}.bias"], training=False, eps=1e-5)  # fmt: skip

    x = F.relu(bn(F.conv2d(images, state["visual.conv1.weight"], stride=2, padding=1), "visual.bn1"))
    x = F.relu(bn(F.conv2d(x, state["visual.conv2.weight"], padding=1), "visual.bn2"))
    x = F.relu(bn(F.conv2d(x, state["visual.conv3.weight"], padding=1), "visual.bn3"))
    x = F.avg_pool2d(x, 2)
    for stage, blocks in enumerate(stage_blocks, start=1):
        for index in range(blocks):
            prefix = f"visual.layer{stage}.{index}"
            stride = 2 if stage > 1 and index == 0 else 1
            out = F.relu(bn(F.conv2d(x, state[f"{prefix}.conv1.weight"]), f"{prefix}.bn1"))
            out = F.relu(bn(F.conv2d(out, state[f"{prefix}.conv2.weight"], padding=1), f"{prefix}.bn2"))
            out = F.avg_pool2d(out, stride) if stride > 1 else out
            out = bn(F.conv2d(out, state[f"{prefix}.conv3.weight"]), f"{prefix}.bn3")
            identity = x
            if f"{prefix}.downsample.0.weight" in state:
                identity = F.avg_pool2d(x, stride) if stride > 1 else x
                identity = bn(
                    F.conv2d(identity, state[f"{prefix}.downsample.0.weight"]), f"{prefix}.downsample.1"
                )
            x = F.relu(out + identity)
    x = x.flatten(2).permute(2, 0, 1)  # (HW, B, C)
    x = (
        torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
        + state["visual.attnpool.positional_embedding"][:, None]
    )
    pool = "visual.attnpool"
    out, _ = F.multi_head_attention_forward(
        query=x[:1], key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=heads,
        q_proj_weight=state[f"{pool}.q_proj.weight"], k_proj_weight=state[f"{pool}.k_proj.weight"],
        v_proj_weight=state[f"{pool}.v_proj.weight"], in_proj_weight=None,
        in_proj_bias=torch.cat([state[f"{pool}.{n}_proj.bias"] for n in "qkv"]), bias_k=None, bias_v=None,
        add_zero_attn=False, dropout_p=0.0, out_proj_weight=state[f"{pool}.c_proj.weight"],
        out_proj_bias=state[f"{pool}.c_proj.bias"], use_separate_proj_weight=True, training=False,
        need_weights=False,
    )  # fmt: skip
    return out[0]


def test_resnet_round_trip_and_reference(tmp_path):
    model = randomize_(create_model("tiny-resnet")).eval()
    export_open_clip(model, tmp_path)
    state = read_open_clip_weights(tmp_path)
    assert (
        "visual.layer2.0.downsample.0.weight" in state and "visual.layer2.0.downsample.1.running_var" in state
    )
    reloaded = load(tmp_path)
    images = pixels(64)
    with torch.no_grad():
        expected = model.encode_image(images)
        torch.testing.assert_close(reloaded.encode_image(images), expected, atol=0, rtol=0)
        heads = model.config.vision.resnet_width * 32 // 64
        reference = openai_resnet_forward(state, images, model.config.vision.resnet_layers, heads)
        torch.testing.assert_close(expected, reference, atol=TOLERANCE, rtol=0)


def read_open_clip_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "open_clip_model.safetensors"))


# ---------------------------------------------------------------------------------------------------------
# OpenAI files


def openai_reference():
    """A CLIPModel shaped as OpenAI's inference assumes (64-wide heads), with fp16-representable weights."""
    reference = hf_clip(vision_width=128, text_width=64, vision_heads=2, text_heads=1, mlp_ratio=4)
    with torch.no_grad():
        for tensor in reference.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    return reference


def test_openai_plain_state_dict_and_wrappers(tmp_path):
    reference = openai_reference()
    state = {k: v.half() for k, v in hf_clip_to_openai(reference.state_dict()).items()}
    variants = {
        "plain.pt": state,
        "ddp.pt": {f"module.{k}": v for k, v in state.items()},
        "pubmedclip.pth": {"best_epoch": 7, "state_dict": state,
                           "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0]}]}},
    }  # fmt: skip
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)
        checkpoint = read_checkpoint(tmp_path / name)
        assert checkpoint.format == "openai"
        assert checkpoint.config.vision.heads == 2 and checkpoint.config.text.heads == 1
        assert checkpoint.config.vision.act == "quick_gelu" and checkpoint.config.vision.image_size == 32
        assert checkpoint.preprocess["resize_mode"] == "shortest"
        assert checkpoint.tokenizer == {"type": "clip", "context_length": 16}
        assert_matches_hf(build_model(checkpoint), reference, pixels(32), clip_token_ids(16))
    assert any("best_epoch 7" in note for note in read_checkpoint(tmp_path / "pubmedclip.pth").notes)


class _Node(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def torchscript_archive(state: dict[str, torch.Tensor], path: Path) -> None:
    """A real TorchScript archive holding ``state`` under its dotted names, plus OpenAI's config buffers
    and a tensor attribute that is neither parameter nor buffer (OpenAI's blocks keep ``attn_mask`` so)."""
    root = _Node()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        module = root
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, _Node())
            module = getattr(module, part)
        module.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
    for name, value in (("input_resolution", 32), ("context_length", 16), ("vocab_size", VOCAB)):
        root.register_buffer(name, torch.tensor(value))
    if "transformer.resblocks.0.ln_1.weight" in state:
        root.get_submodule("transformer.resblocks.0").attn_mask = torch.full((16, 16), float("-inf")).triu(1)
    torch.jit.save(torch.jit.script(root), str(path))


def test_openai_torchscript_archive(tmp_path):
    reference = openai_reference()
    state = {k: v.half() for k, v in hf_clip_to_openai(reference.state_dict()).items()}
    path = tmp_path / "ViT-tiny.pt"
    torchscript_archive(state, path)
    from polyclip.checkpoints.openai import read_torchscript_state_dict

    tensors = read_torchscript_state_dict(path)
    expected = torch.jit.load(str(path), map_location="cpu").state_dict()
    assert set(tensors) == set(expected)  # parameters and buffers only: attn_mask is not among them
    for key, value in expected.items():
        assert torch.equal(tensors[key], value), key
    checkpoint = read_checkpoint(path)
    assert not {"input_resolution", "context_length", "vocab_size"} & set(checkpoint.state_dict)
    assert_matches_hf(build_model(checkpoint), reference, pixels(32), clip_token_ids(16))


def test_openai_torchscript_resnet(tmp_path):
    config = DualEncoderConfig(
        embed_dim=24,
        vision=VisionConfig(kind="resnet", image_size=64, resnet_layers=(1, 2, 1, 1), resnet_width=8),
        text=TextConfig(vocab_size=VOCAB, context_length=16, width=64, layers=1, heads=1, mlp_dim=256),
    )
    model = randomize_(create_model(config)).eval()
    export_open_clip(model, tmp_path / "oc")
    state = read_open_clip_weights(tmp_path / "oc")
    torchscript_archive(
        {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, tmp_path / "RN.pt"
    )
    checkpoint = read_checkpoint(tmp_path / "RN.pt")
    assert (
        checkpoint.config.vision.resnet_layers == (1, 2, 1, 1) and checkpoint.config.vision.image_size == 64
    )
    ours = build_model(checkpoint)
    images, ids = pixels(64), clip_token_ids(16)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), model.encode_image(images), atol=0, rtol=0)
        torch.testing.assert_close(ours.encode_text(ids), model.encode_text(ids), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Flax msgpack (CLIP-RSICD)


def flax_msgpack(tree: dict, chunk_elements: int | None = None) -> bytes:
    """flax.serialization.msgpack_serialize, written from flax's format description. ``chunk_elements``
    forces the chunked form flax uses for arrays over 2**30 bytes on every array larger than it."""

    def array_bytes(array: np.ndarray) -> bytes:
        return msgpack.packb((array.shape, array.dtype.name, array.tobytes("C")), use_bin_type=True)

    def encode(obj):
        if isinstance(obj, np.ndarray):
            return msgpack.ExtType(1, array_bytes(obj))
        if isinstance(obj, np.generic):
            return msgpack.ExtType(3, array_bytes(np.asarray(obj)))
        raise TypeError(type(obj))

    def chunk(node):
        if isinstance(node, dict):
            return {key: chunk(value) for key, value in node.items()}
        if chunk_elements and isinstance(node, np.ndarray) and node.size > chunk_elements:
            flat = node.reshape(-1)
            pieces = [flat[i : i + chunk_elements] for i in range(0, flat.size, chunk_elements)]
            return {"__msgpack_chunked_array__": True, "shape": {str(i): d for i, d in enumerate(node.shape)},
                    "chunks": {str(i): piece for i, piece in enumerate(pieces)}}  # fmt: skip
        return node

    return msgpack.packb(chunk(tree), default=encode, strict_types=True)


def hf_to_flax_tree(state: dict[str, torch.Tensor]) -> dict:
    """transformers CLIPModel weights as FlaxCLIPModel's parameter tree (kernels (in, out), HWIO convs)."""
    embeddings = ("token_embedding", "position_embedding")
    norms = ("layer_norm1", "layer_norm2", "pre_layrnorm", "post_layernorm", "final_layer_norm")
    tree: dict = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        *parents, leaf = key.split(".")
        array = value.detach().numpy()
        if leaf == "weight" and parents[-1] in embeddings:
            leaf = "embedding"
        elif leaf == "weight" and parents[-1] in norms:
            leaf = "scale"
        elif leaf == "weight" and array.ndim == 4:
            leaf, array = "kernel", array.transpose(2, 3, 1, 0)
        elif leaf == "weight":
            leaf, array = "kernel", array.T
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = np.ascontiguousarray(array)
    tree["logit_scale"] = np.float32(tree["logit_scale"])  # a NumPy scalar: flax's ExtType 3
    return tree


def test_flax_msgpack_matches_transformers(tmp_path):
    reference = hf_clip(eos_token_id=2)  # CLIP-RSICD's config predates the eos fix
    reference.config.save_pretrained(tmp_path)
    data = flax_msgpack(hf_to_flax_tree(reference.state_dict()), chunk_elements=1000)
    (tmp_path / "flax_model.msgpack").write_bytes(data)
    assert detect_format(tmp_path) == "flax"
    assert_matches_hf(load(tmp_path), reference, pixels(32), clip_token_ids(16))
    # the msgpack file itself, config.json beside it
    checkpoint = read_checkpoint(tmp_path / "flax_model.msgpack")
    assert checkpoint.format == "flax"
    assert_matches_hf(build_model(checkpoint), reference, pixels(32), clip_token_ids(16))


def test_flax_params_wrapper_and_bad_files(tmp_path):
    reference = hf_clip()
    reference.config.save_pretrained(tmp_path)
    (tmp_path / "flax_model.msgpack").write_bytes(
        flax_msgpack({"params": hf_to_flax_tree(reference.state_dict())})
    )
    assert_matches_hf(load(tmp_path), reference, pixels(32), clip_token_ids(16))
    (tmp_path / "flax_model.msgpack").write_bytes(b"\xc1 not msgpack")
    with pytest.raises(CheckpointError, match="flax msgpack"):
        read_checkpoint(tmp_path)
    (tmp_path / "flax_model.msgpack").write_bytes(msgpack.packb({"a": msgpack.ExtType(9, b"")}))
    with pytest.raises(CheckpointError, match="extension type 9"):
        read_checkpoint(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Errors


def test_strict_loading_lists_every_problem():
    model = create_model("tiny-vit")
    state = dict(model.state_dict())
    del state["text.norm.bias"]
    state["visual.extra.weight"] = torch.zeros(1)
    state["visual.proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as error:
        load_strict(create_model("tiny-vit"), state, "test")
    message = str(error.value)
    assert "missing keys (1): text.norm.bias" in message
    assert "unexpected keys (1): visual.extra.weight" in message
    assert "shape mismatches (1): visual.proj.weight: checkpoint (3, 3) vs model (32, 64)" in message


def test_open_clip_folder_with_wrong_keys_is_refused(tmp_path):
    reference = hf_clip()
    state = hf_clip_to_openai(reference.state_dict())
    state.pop("visual.ln_post.bias")
    state["visual.surprise"] = torch.zeros(2)
    write_open_clip_folder(tmp_path, open_clip_cfg_from_hf(reference, True), state)
    with pytest.raises(
        CheckpointError,
        match=r"missing keys \(1\): visual\.norm\.bias[\s\S]*unexpected keys \(1\): visual\.surprise",
    ):
        load(tmp_path)


def test_bad_files_give_clear_errors(tmp_path):
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(CheckpointError, match="corrupt.pt"):
        read_checkpoint(tmp_path / "corrupt.pt")
    (tmp_path / "weights.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="unknown checkpoint file type '.txt'"):
        read_checkpoint(tmp_path / "weights.txt")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("nothing here")
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        read_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pt")
    torch.save({"visual.proj": torch.zeros(2, 2)}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="not an OpenAI CLIP state dict"):
        read_checkpoint(tmp_path / "partial.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        read_checkpoint(tmp_path / "bad.safetensors")


class _Payload:
    """Unpickling this would call Path.touch: a stand-in for code a malicious checkpoint runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "executed"
    torch.save({"visual.proj": torch.zeros(2, 2), "payload": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="nothing in a checkpoint is executed"):
        read_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_torchscript_archive_with_foreign_global_is_refused(tmp_path):
    model = create_model("tiny-vit")
    path = tmp_path / "archive.pt"
    torchscript_archive({"visual.proj": model.visual.proj.weight.detach()}, path)
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    root = next(name for name in entries if name.endswith("/data.pkl"))
    entries[root] = pickle.dumps(_Payload(tmp_path / "executed"), protocol=2)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    with pytest.raises(CheckpointError, match="does not load"):
        read_checkpoint(path)
    assert not (tmp_path / "executed").exists()


# ---------------------------------------------------------------------------------------------------------
# Exports


@pytest.mark.parametrize("arch_act", ["quick_gelu", "gelu"])
def test_export_hf_clip_reloads_everywhere(tmp_path, arch_act):
    config = create_model("tiny-vit").config
    config.vision.act = config.text.act = arch_act
    model = randomize_(create_model(config)).eval()
    preprocess = dict(image_size=32, resize_mode="shortest", interpolation="bicubic", crop_pct=0.875,
                      mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1))  # fmt: skip
    export_hf(model, tmp_path, preprocess)
    reference = transformers.CLIPModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(1, 49000, (3, 77))  # CLIP vocabulary: 49407 is the highest id
    ids[:, 9] = 49407
    assert_matches_hf(model, reference, pixels(32), ids)
    checkpoint = read_checkpoint(tmp_path)
    # transformers stores the resize as an integer short side: floor(32 / 0.875) = 36
    assert math.floor(32 / checkpoint.preprocess["crop_pct"] + 1e-6) == 36
    assert checkpoint.preprocess["mean"] == (0.1, 0.2, 0.3)
    assert_matches_hf(build_model(checkpoint), reference, pixels(32), ids)
    processor = transformers.CLIPImageProcessor.from_pretrained(tmp_path)
    assert processor.size == {"shortest_edge": 36} and processor.crop_size == {"height": 32, "width": 32}


def test_export_hf_siglip_reloads_everywhere(tmp_path):
    model = randomize_(create_model("tiny-siglip")).eval()
    with torch.no_grad():
        model.logit_scale.fill_(4.5)
    export_hf(model, tmp_path)
    reference = transformers.SiglipModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(2, 32000, (3, 64))
    assert_matches_hf(model, reference, pixels(32), ids)
    assert_matches_hf(load(tmp_path), reference, pixels(32), ids)


def test_export_hf_refuses_what_transformers_cannot_hold(tmp_path):
    with pytest.raises(ExportError, match="ModifiedResNet") as error:
        export_hf(create_model("tiny-resnet"), tmp_path / "rn")
    assert isinstance(error.value, NotImplementedError)
    assert not (tmp_path / "rn").exists()
    config = create_model("tiny-vit").config
    config.text.projection_bias = True
    with pytest.raises(ExportError, match="text projection without bias"):
        export_hf(create_model(config), tmp_path / "bias")


def test_export_open_clip_round_trip(tmp_path, tiny_timm_family):
    siglip = create_model("tiny-siglip").config
    siglip.vision.act = siglip.text.act = "gelu"
    siglip.vision.width = siglip.text.width = siglip.embed_dim = 32
    siglip.vision.mlp_dim = siglip.text.mlp_dim = 64
    siglip.text.vocab_size, siglip.text.context_length = VOCAB, 16
    for name, arch in (("vit", "tiny-vit"), ("resnet", "tiny-resnet"), ("siglip", siglip)):
        model = randomize_(create_model(arch)).eval()
        export_open_clip(
            model, tmp_path / name, hf_tokenizer_name="timm/ViT-B-16-SigLIP" if name == "siglip" else None
        )
        checkpoint = read_checkpoint(tmp_path / name)
        assert checkpoint.config.to_dict() == model.config.to_dict()
        reloaded = build_model(checkpoint)
        images = pixels(model.image_size)
        ids = siglip_token_ids(16) if name == "siglip" else clip_token_ids(16)
        with torch.no_grad():
            torch.testing.assert_close(
                reloaded(images, ids).logits_per_image, model(images, ids).logits_per_image, atol=0, rtol=0
            )
    record = json.loads((tmp_path / "siglip" / "open_clip_config.json").read_text())
    assert record["model_cfg"]["vision_cfg"]["timm_model_name"] == tiny_timm_family
    assert record["model_cfg"]["custom_text"] is True


def test_export_open_clip_matches_open_clip_classes(tmp_path, open_clip_reference):
    model = randomize_(create_model("tiny-vit")).eval()
    export_open_clip(model, tmp_path)
    cfg = json.loads((tmp_path / "open_clip_config.json").read_text())["model_cfg"]
    reference = open_clip_reference.CLIP(
        cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=cfg["quick_gelu"]
    )
    reference.load_state_dict(read_open_clip_weights(tmp_path))
    images, ids = pixels(32), clip_token_ids(77)
    with torch.no_grad():
        torch.testing.assert_close(
            reference.encode_image(images.clone()), model.encode_image(images), atol=TOLERANCE, rtol=0
        )
        torch.testing.assert_close(reference.encode_text(ids), model.encode_text(ids), atol=TOLERANCE, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Parity with autograd on: the training path (no in-place residual updates) gives the reference's outputs


def _assert_autograd_parity(ours, images, ids, image_expected, text_expected) -> None:
    ours.eval()
    with torch.enable_grad():
        image = ours.encode_image(images)
        text = ours.encode_text(ids)
    assert image.requires_grad and text.requires_grad  # the autograd path really ran
    torch.testing.assert_close(image.detach(), image_expected, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(text.detach(), text_expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_transformers_parity_with_autograd_on(tmp_path, kind):
    reference = (hf_clip() if kind == "clip" else hf_siglip()).eval()
    reference.save_pretrained(tmp_path)
    images, ids = pixels(32), clip_token_ids(16) if kind == "clip" else siglip_token_ids(16)
    with torch.no_grad():
        image_expected = features(reference.get_image_features(pixel_values=images))
        text_expected = features(reference.get_text_features(input_ids=ids))
    _assert_autograd_parity(load(tmp_path), images, ids, image_expected, text_expected)


@pytest.mark.parametrize("case", ["vit-quick-gelu", "resnet", "custom-text-sigmoid"])
def test_open_clip_parity_with_autograd_on(tmp_path, open_clip_reference, case):
    spec = OPEN_CLIP_CASES[case]
    cfg = spec["model_cfg"]
    cls = open_clip_reference.CustomTextCLIP if spec["custom"] else open_clip_reference.CLIP
    torch.manual_seed(0)
    reference = cls(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=cfg.get("quick_gelu", False),
                    init_logit_bias=cfg.get("init_logit_bias"))  # fmt: skip
    randomize_(reference).eval()
    write_open_clip_folder(tmp_path, cfg, reference.state_dict())
    images, ids = pixels(cfg["vision_cfg"]["image_size"]), spec["ids"]
    with torch.no_grad():
        image_expected, text_expected = reference.encode_image(images), reference.encode_text(ids)
    _assert_autograd_parity(load(tmp_path), images, ids, image_expected, text_expected)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints that do not say what they are


def test_plain_state_dict_of_a_gelu_model_needs_its_architecture(tmp_path, open_clip_reference):
    """open_clip's ViT-B-32 is GELU, OpenAI's QuickGELU, and a state dict does not say which: polyclip
    warns when it assumes, and takes the activation from ``architecture=``."""
    import polyclip

    # 64-wide heads: OpenAI's loader reads the head count as width // 64 from a state dict
    cfg = {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": VOCAB, "width": 64, "heads": 1, "layers": 2}}  # fmt: skip
    torch.manual_seed(0)
    reference = open_clip_reference.CLIP(
        cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=False
    )
    randomize_(reference).eval()
    path = tmp_path / "open_clip_gelu.pt"
    torch.save(reference.state_dict(), path)
    images, ids = pixels(32), clip_token_ids(16)
    with torch.no_grad():
        expected = reference.encode_image(images)
    with pytest.warns(UserWarning, match="does not say its activation"):
        assumed, _, _ = polyclip.load(path)
    assert assumed.config.vision.act == "quick_gelu"
    with torch.no_grad():
        assert (assumed.encode_image(images) - expected).abs().max() > 1e-3  # silently wrong otherwise
    gelu = assumed.config.to_dict()
    gelu["vision"]["act"] = gelu["text"]["act"] = "gelu"
    exact, _, _ = polyclip.load(path, architecture=DualEncoderConfig.from_dict(gelu))
    with torch.no_grad():
        torch.testing.assert_close(exact.encode_image(images), expected, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(exact.encode_text(ids), reference.encode_text(ids), atol=TOLERANCE, rtol=0)
    with pytest.raises(CheckpointError, match="does not have the sizes of architecture ViT-B-32"):
        polyclip.load(path, architecture="ViT-B-32")
    with pytest.raises(CheckpointError, match="EVA01/EVA02 trunks are not supported"):
        polyclip.load(path, architecture="EVA02-B-16")


def test_open_clip_architecture_names():
    from polyclip.models import ConfigError, get_architecture, open_clip_architecture

    assert open_clip_architecture("ViT-B-32").vision.act == "gelu"  # open_clip's LAION models
    assert open_clip_architecture("ViT-B-32").to_dict() == get_architecture("ViT-B-32-gelu").to_dict()
    assert open_clip_architecture("ViT-B-32-quickgelu").to_dict() == get_architecture("ViT-B-32").to_dict()
    assert open_clip_architecture("RN50").text.act == "gelu"
    assert open_clip_architecture("ViT-B-16-SigLIP2").vision.act == "gelu"  # timm's trunk
    for name, family in (("coca_ViT-B-32", "CoCa"), ("convnext_base_w", "ConvNeXt"), ("xlm-roberta-base-ViT-B-32",
                         "Hugging Face text towers")):  # fmt: skip
        with pytest.raises(ConfigError, match=family):
            open_clip_architecture(name)


def test_unsupported_open_clip_families_are_named(tmp_path):
    for model_cfg, family in (
        ({"embed_dim": 512, "multimodal_cfg": {"width": 512}}, "CoCa"),
        (
            {"embed_dim": 512, "vision_cfg": {"timm_model_name": "eva02_base_patch16_clip_224"}},
            "EVA01/EVA02 trunks",
        ),
        ({"embed_dim": 512, "vision_cfg": {"timm_model_name": "convnext_base"}}, "ConvNeXt"),
        ({"embed_dim": 512, "text_cfg": {"hf_model_name": "roberta-base"}}, "Hugging Face text towers"),
    ):
        with pytest.raises(CheckpointError, match=family):
            open_clip_format.config_from_open_clip(model_cfg)


def test_open_clip_siglip_folder_without_its_sentencepiece_file(tmp_path, monkeypatch):
    """open_clip resolves hf_tokenizer_name through the hub; polyclip does so through the hub cache (offline
    here), loads the image tower anyway when the file is not there, and says what to download."""
    import polyclip
    from polyclip.tokenizers import SiglipTokenizer, TokenizerError

    monkeypatch.setitem(  # tiny-siglip's sizes, named like a timm trunk
        open_clip_format.TIMM_SIGLIP_FAMILIES, "tiny", dict(width=64, layers=2, heads=4, mlp_dim=128)
    )
    spiece = Path(__file__).parent / "golden" / "exports" / "spiece.model"
    tokenizer = SiglipTokenizer(spiece)
    config = create_model("tiny-siglip").config
    config.text.vocab_size = tokenizer.vocab_size
    config.vision.act = config.text.act = "gelu"
    model = create_model(config).eval()
    folder = export_open_clip(
        model, tmp_path / "siglip", tokenizer=tokenizer, hf_tokenizer_name="org/tiny-siglip"
    )
    (folder / "spiece.model").unlink()
    (folder / "tokenizer_config.json").unlink()
    cache = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.warns(UserWarning, match="hf download org/tiny-siglip spiece.model"):
        loaded, preprocess, missing = polyclip.load(folder)
    with torch.no_grad():
        assert loaded.encode_image(pixels(32)).shape == (2, config.embed_dim)  # the image tower works
    with pytest.raises(TokenizerError, match="not in the local Hugging Face cache"):
        missing(["a cat"])
    # the same file in huggingface_hub's cache layout (models--org--name/snapshots/<commit>/, refs/main)
    snapshot = cache / "models--org--tiny-siglip" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "spiece.model").write_bytes(spiece.read_bytes())
    (cache / "models--org--tiny-siglip" / "refs").mkdir()
    (cache / "models--org--tiny-siglip" / "refs" / "main").write_text("0" * 40)
    _, _, found = polyclip.load(folder)
    assert torch.equal(found(["a photo of a cat"]), tokenizer(["a photo of a cat"]))


def test_missing_references_fail_in_ci(monkeypatch):
    import conftest

    monkeypatch.setattr(conftest, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="reference unavailable in CI"):
        conftest.import_reference("a_module_that_does_not_exist")
    monkeypatch.setattr(conftest, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception):
        conftest.import_reference("a_module_that_does_not_exist")
