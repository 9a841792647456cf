"""Shared fixtures: tiny checkpoints in real formats, written by the reference libraries."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

# In CI (CI=true) every reference implementation must be importable: a missing or broken one fails the
# run instead of skipping the parity tests that need it.
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


# A vector stored in float16 differs from its float32 self by at most half a unit in the last place,
# 2^-11 relative, in each coordinate; for unit vectors the score of a query against its own stored copy
# is therefore within 2^-11 of 1 (plus float32 rounding of the sum).
SELF_SCORE_TOLERANCE = 2**-11 + 1e-5


def missing_reference(reason: str):
    """A reference cannot be used here: skip on a developer's machine, fail in CI."""
    if IN_CI:
        pytest.fail(f"reference unavailable in CI: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)  # also when a test module imports its reference


def import_reference(module: str, reason: str | None = None):
    """``pytest.importorskip`` that fails in CI; any import error (not only a missing module) counts."""
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as error:
        missing_reference(
            f"{module} cannot be imported ({type(error).__name__}: {error}); {reason or ''}".strip()
        )


os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*")

# ---------------------------------------------------------------------------------------------------------
# Helpers shared by test modules (imported as `from conftest import ...`): one copy of each.


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a server or a process group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: this one's, one OpenMP thread (the test runner and the
    child share the cores), and ``extra``."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def polyclip_command(*args: str | os.PathLike) -> list[str]:
    """``polyclip ARGS...`` as this interpreter runs it (the checkout under test, not an installed copy)."""
    return [sys.executable, "-m", "polyclip", *map(str, args)]


def run_polyclip(
    *args: str | os.PathLike, timeout: float = 300, **extra_env: str
) -> subprocess.CompletedProcess:
    """Run ``polyclip ARGS...`` to completion in a child process; output captured as text."""
    return subprocess.run(
        polyclip_command(*args), capture_output=True, text=True, timeout=timeout, env=child_env(**extra_env)
    )


def spawn_polyclip(*args: str | os.PathLike, **popen_kwargs) -> subprocess.Popen:
    """Start ``polyclip ARGS...`` in the background (a server, a build to kill); the caller waits for it."""
    popen_kwargs.setdefault("env", child_env())
    return subprocess.Popen(polyclip_command(*args), **popen_kwargs)


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
