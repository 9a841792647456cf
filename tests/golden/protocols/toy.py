"""The toy dual encoder that both sides of the protocol goldens run (numpy only).

The reference code (clip_benchmark, PLIP, CLIP-RSICD, FashionCLIP, pybioclip) and polyclip are
given the same encoder, so any difference in their numbers comes from the protocol, not the model:

- an image is a 2x2 RGB picture; its embedding is its 12 pixel values scaled to [-0.5, 0.5];
- a text's embedding is the position-weighted sum of a fixed random table's rows over its CLIP token
  ids up to and including the first end-of-text token (what a causal CLIP text tower sees, so the
  padding a tokenizer adds after it does not matter).
"""

from __future__ import annotations

import numpy as np

EMBED_DIM = 12  # 2 x 2 pixels x 3 channels
VOCAB_SIZE = 49408  # CLIP's BPE vocabulary
END_OF_TEXT = 49407
_TABLE: np.ndarray | None = None


def table() -> np.ndarray:
    """(VOCAB_SIZE, EMBED_DIM) float64, the same on every machine (numpy's PCG64 stream)."""
    global _TABLE
    if _TABLE is None:
        _TABLE = np.random.default_rng(20240613).standard_normal((VOCAB_SIZE, EMBED_DIM))
    return _TABLE


def text_features(tokens) -> np.ndarray:
    """(N, L) token ids -> (N, EMBED_DIM) float32."""
    tokens = np.asarray(tokens, dtype=np.int64)
    is_end = tokens == END_OF_TEXT
    seen = np.cumsum(is_end, axis=1) - is_end  # end-of-text tokens strictly before each position
    weights = (seen == 0) * np.arange(1, tokens.shape[1] + 1)  # (N, L)
    return (table()[tokens] * weights[..., None]).sum(axis=1).astype(np.float32)


def image_features(pixels) -> np.ndarray:
    """(2, 2, 3) or (N, 2, 2, 3) uint8 pixels -> (EMBED_DIM,) or (N, EMBED_DIM) float32."""
    pixels = np.asarray(pixels)
    flat = pixels.reshape(*pixels.shape[:-3], EMBED_DIM).astype(np.float32)
    return flat / np.float32(255.0) - np.float32(0.5)


def reference_state(spec) -> dict:
    """Tensor values for a model's ``[(key, shape), ...]``: numpy's PCG64 stream (seed 7) in sorted key
    order, N(0, 1) / sqrt(fan-in); weight-norm gains (``*_g``) made positive (|x| + 1)."""
    rng = np.random.default_rng(7)
    out = {}
    for key, shape in sorted((key, tuple(shape)) for key, shape in spec):
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else max(shape[0] if shape else 1, 1)
        values = np.asarray(rng.standard_normal(shape) / np.sqrt(fan_in))
        if key.endswith("_g"):
            values = np.abs(values) + 1.0
        out[key] = np.asarray(values, dtype=np.float32).reshape(shape)
    return out
