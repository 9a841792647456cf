"""Quantised inference modes: int8 on CPU, and the FP8 layers' arithmetic (run on PyTorch's CPU kernel).

The FP8 mode itself is for GPUs with FP8 tensor cores; its speed is measured by benchmarks/gpu.py.
Here the layers are checked against a dequantised reference product, the swap against the model it
replaces, and the device refusal.
"""

from __future__ import annotations

import pytest
import torch

import polyclip
from polyclip.factory import compile_options
from polyclip.quantization import (
    FP8_MAX,
    Fp8Linear,
    fp8_layer_count,
    fp8_support,
    quantize_fp8,
    quantize_model,
    quantize_rows,
)


def test_quantize_rows_scales_each_row_to_the_format_range():
    torch.manual_seed(0)
    x = torch.randn(5, 64) * torch.tensor([1e-3, 1.0, 10.0, 300.0, 1.0]).unsqueeze(1)
    x[4] = 0.0  # a row of zeros keeps scale 1 and stays zero
    q, scale = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (5, 1)
    assert torch.allclose(q.float().abs().amax(dim=1)[:4], torch.full((4,), FP8_MAX))
    assert scale[4].item() == 1.0 and torch.count_nonzero(q[4].float()) == 0
    # e4m3 keeps 3 mantissa bits: every element within 2^-4 relative of its row's own scale
    error = (q.float() * scale - x).abs()
    assert (error <= x.abs() * 2**-4 + scale * 2**-9).all()


def test_fp8_linear_equals_the_dequantised_product():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    layer = Fp8Linear(linear)
    x = torch.randn(3, 7, 64, dtype=torch.bfloat16)
    out = layer(x)
    assert out.shape == (3, 7, 48) and out.dtype == torch.bfloat16
    qx, sx = quantize_rows(x.reshape(-1, 64))
    reference = (qx.float() * sx) @ (layer.weight.float() * layer.weight_scale.T).T + linear.bias
    assert torch.allclose(out.float().reshape(-1, 48), reference, rtol=1e-2, atol=1e-2)
    # and it stays close to the full-precision layer it replaced
    cosine = torch.nn.functional.cosine_similarity(
        out.float().reshape(-1, 48), linear(x.float()).reshape(-1, 48)
    )
    assert cosine.min() > 0.995


@pytest.mark.parametrize("arch", ["tiny-vit", "tiny-siglip"])
def test_fp8_swaps_the_image_blocks_and_keeps_embeddings(arch):
    torch.manual_seed(0)
    bf16 = polyclip.create_model(arch).to(torch.bfloat16).eval()
    fp8 = polyclip.create_model(arch).to(torch.bfloat16).eval()
    fp8.load_state_dict(bf16.state_dict())
    quantize_fp8(fp8)
    blocks = len(fp8.visual.transformer.blocks)
    assert fp8_layer_count(fp8) == 4 * blocks  # qkv, proj, fc1, fc2 of every image block
    assert all(not isinstance(m, Fp8Linear) for m in fp8.text.modules())  # the text tower stays bf16
    pixels = torch.randn(4, 3, bf16.image_size, bf16.image_size, dtype=torch.bfloat16)
    ids = torch.randint(1, bf16.config.text.vocab_size - 1, (4, bf16.context_length))
    with torch.inference_mode():
        cos_image = torch.nn.functional.cosine_similarity(
            bf16.encode_image(pixels).float(), fp8.encode_image(pixels).float()
        )
        assert torch.equal(bf16.encode_text(ids), fp8.encode_text(ids))
    assert cos_image.min() > 0.998


def test_fp8_mode_is_refused_without_fp8_hardware(tiny_hf_clip_dir):
    assert "no FP8" in fp8_support(torch.device("cpu"))
    with pytest.raises(ValueError, match="FP8 tensor cores"):
        polyclip.load(tiny_hf_clip_dir, dtype="bf16", quantize="fp8")
    with pytest.raises(ValueError, match="supported modes are int8, fp8"):
        polyclip.load(tiny_hf_clip_dir, quantize="int4")


def test_fp8_support_reads_the_compute_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "8.0; FP8 needs 8.9" in fp8_support(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8_support(torch.device("cuda")) is None


def test_fp8_mode_wants_bf16_weights(monkeypatch):
    import polyclip.quantization as quantization

    monkeypatch.setattr(quantization, "check_fp8_device", lambda device: None)
    model = polyclip.create_model("tiny-vit").eval()
    with pytest.raises(ValueError, match="dtype='bf16'"):
        quantize_model(model, "fp8")
    assert fp8_layer_count(quantize_model(model.to(torch.bfloat16), "fp8")) > 0


def test_compile_modes():
    assert compile_options(True, torch.device("cpu")) == {"freezing": True}
    assert compile_options("max-autotune", torch.device("cpu")) == {
        "freezing": True, "max_autotune": True, "triton.cudagraphs": False,
    }  # fmt: skip
    assert compile_options("max-autotune", torch.device("cuda"))["triton.cudagraphs"] is True
    with pytest.raises(ValueError, match="compile='fast'"):
        compile_options("fast", torch.device("cpu"))


@pytest.mark.slow
def test_gpu_benchmark_harness_runs_on_cpu():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
    out = subprocess.run(
        [sys.executable, str(script), "--smoke", "--peers", "transformers",
         "--sections", "peak", "image", "fp8", "text", "train", "embed"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    for heading in (
        "== peak ==",
        "polyclip best / transformers",
        "fp8 not measured",
        "GradCache x4",
        "pipeline / model-only",
    ):
        assert heading in out.stdout


def test_embed_pipeline_with_a_batch_in_flight_yields_the_same_batches(tiny_hf_clip_dir, tmp_path):
    """The GPU pipelining (one batch queued before the previous one is read back), run on CPU."""
    import numpy as np
    from PIL import Image

    from polyclip.encode import embed_images

    rng = np.random.default_rng(0)
    paths = []
    for i in range(7):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    paths.insert(3, str(tmp_path / "bad.png"))
    model, preprocess, _ = polyclip.load(tiny_hf_clip_dir)
    plain = list(embed_images(model, preprocess, paths, batch_size=3, overlap=False))
    pipelined = list(embed_images(model, preprocess, paths, batch_size=3, overlap=True))
    assert [b[0] for b in plain] == [b[0] for b in pipelined] and len(plain) == 3
    assert [b[2] for b in plain] == [b[2] for b in pipelined] and plain[1][2][0][0].endswith("bad.png")
    for (_, a, _), (_, b, _) in zip(plain, pipelined):
        assert torch.equal(a, b)
