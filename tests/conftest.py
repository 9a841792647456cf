"""Shared fixtures: tiny checkpoints in real formats, written by the reference libraries."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*")

TINY_CLIP = dict(
    text_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4),
    vision_config=dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    ),
    projection_dim=32,
)


@pytest.fixture(scope="session")
def tiny_hf_clip_dir(tmp_path_factory) -> Path:
    """A tiny random transformers CLIPModel saved with save_pretrained (model.safetensors + config.json)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-hf-clip")
    transformers.CLIPModel(transformers.CLIPConfig(**TINY_CLIP)).eval().save_pretrained(folder)
    return folder
