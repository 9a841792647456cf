"""Quantised inference: int8 dynamic quantisation on CPU, FP8 (e4m3) matrix products on GPU.

``polyclip.load(..., quantize="int8" | "fp8")`` calls :func:`quantize_model`.

- int8: PyTorch's dynamic quantisation of the linear layers (per-channel int8 weights, activations
  quantised per batch): for CPU inference from fp32 weights.
- fp8: each linear layer of the image tower's transformer blocks keeps its weight as
  ``float8_e4m3fn`` with one fp32 scale per output row, quantises its input per row (token) at run time and multiplies with
  ``torch._scaled_mm`` (row-wise scales, bf16 output, bias fused), the recipe of torchao's
  ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``. Only GPUs with FP8 tensor
  cores run that product fast (compute capability 8.9 and newer: Ada, Hopper, Blackwell);
  elsewhere the mode is refused. The layers themselves run anywhere ``torch._scaled_mm`` does
  (PyTorch's CPU kernel too), which is how their arithmetic is tested without a GPU.

  The text tower stays bf16: its one pooled end-token state accumulates the rounding of every layer
  (random-weight ViT-B/32 text tower, measured on CPU: min cosine to bf16 0.992 with all its block
  layers in FP8, 0.998 with a single MLP layer per block, against 0.9992 for the whole image tower),
  and zero-shot prompts are encoded once per label set while images stream, so the image tower is
  where the time goes.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

MODES = ("int8", "fp8")

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
# cuBLASLt's FP8 GEMM wants both matrix dimensions in multiples of 16
_FP8_ALIGNMENT = 16


def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Quantise a dual encoder in place for inference; ``mode`` is one of :data:`MODES`."""
    if mode == "int8":
        if model.device.type != "cpu" or model.dtype != torch.float32:
            raise ValueError(
                "int8 dynamic quantisation runs on CPU from fp32 weights (device='cpu', dtype=None)"
            )
        return quantize_int8(model)
    if mode == "fp8":
        check_fp8_device(model.device)
        if model.dtype != torch.bfloat16:
            raise ValueError("quantize='fp8' computes in bf16: load with dtype='bf16'")
        return quantize_fp8(model)
    raise ValueError(f"quantize={mode!r} is not supported; the supported modes are {', '.join(MODES)}")


# ---------------------------------------------------------------------------------------------------------
# int8 (CPU)


def int8_layers(model: nn.Module) -> list[str]:
    """The linear layers int8 mode quantises: every one of the image tower, and the text tower's MLPs.

    The text tower's attention projections stay fp32: its single pooled end-token state is sensitive to
    their rounding (cosine to fp32 drops below 0.999 with them), and MLPs hold two thirds of its FLOPs.
    """
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (name.startswith("visual.") or ".mlp." in name):
            names.append(name)
    return names


def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantisation (per-channel weights, activations quantised per batch), in place."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch marks the eager quantisation API deprecated
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        spec = {name: per_channel_dynamic_qconfig for name in int8_layers(model)}
        return quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)


# ---------------------------------------------------------------------------------------------------------
# fp8 (GPU)


def fp8_support(device: torch.device) -> str | None:
    """``None`` when ``device`` multiplies FP8 matrices in hardware, else the reason it does not."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"{device.type} has no FP8 matrix units"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        name = torch.cuda.get_device_name(device)
        return f"{name} has compute capability {capability[0]}.{capability[1]}; FP8 needs 8.9 or newer"
    return None


def check_fp8_device(device: torch.device) -> None:
    reason = fp8_support(device)
    if reason is not None:
        raise ValueError(
            f"quantize='fp8' runs on GPUs with FP8 tensor cores (Ada, Hopper, Blackwell: compute capability "
            f"8.9 or newer), and {reason}. Use dtype='bf16' there, or quantize='int8' on CPU."
        )


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> float8 (M, K) and fp32 scales (M, 1) with ``x ~= q.float() * scale`` row by row.

    Each row's largest magnitude maps to the format's largest finite value (448 for e4m3); a row of
    zeros keeps scale 1 rather than dividing by zero.
    """
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


class Fp8Linear(nn.Module):
    """A linear layer with a float8 weight (one scale per output row) and per-token float8 inputs.

    y = (q_x s_x) (q_w s_w)^T + b, computed by ``torch._scaled_mm`` with row-wise scales: s_x (M, 1)
    and s_w^T (1, N); the product accumulates in fp32 and is written in bf16.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight", weight)  # (N, K) float8
        self.register_buffer("weight_scale", scale.T.contiguous())  # (1, N) fp32
        bias = linear.bias.detach().to(torch.bfloat16) if linear.bias is not None else None
        self.register_buffer("bias", bias)  # (N,) bf16 or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        q, scale = quantize_rows(x.reshape(-1, self.in_features))  # (M, K), (M, 1)
        out = torch._scaled_mm(
            q,
            self.weight.T,  # column-major (K, N), as the kernel requires of its second operand
            scale_a=scale,
            scale_b=self.weight_scale,
            bias=self.bias,
            out_dtype=torch.bfloat16,
        )
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=float8_e4m3fn"


def fp8_eligible(name: str, module: nn.Module) -> bool:
    """Linear layers in the image tower's transformer blocks whose sides fit the kernel's alignment.

    Projections into the joint space and pooling heads stay bf16: they are a small share of the
    FLOPs and the embedding's last rounding step. (A ModifiedResNet tower has no such layers: its
    FLOPs are convolutions.)
    """
    return (
        isinstance(module, nn.Linear)
        and name.startswith("visual.")
        and ".blocks." in name
        and module.in_features % _FP8_ALIGNMENT == 0
        and module.out_features % _FP8_ALIGNMENT == 0
    )


def quantize_fp8(model: nn.Module) -> nn.Module:
    """Swap every eligible linear layer of ``model`` for :class:`Fp8Linear`, in place.

    No device check here: :func:`quantize_model` refuses devices without FP8 units; calling this
    directly runs wherever ``torch._scaled_mm`` has a kernel (CPU included, slowly).
    """
    targets = [(name, module) for name, module in model.named_modules() if fp8_eligible(name, module)]
    if not targets:
        raise ValueError("the model has no linear layer that FP8 mode can quantise")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Fp8Linear(module))
    return model


def fp8_layer_count(model: nn.Module) -> int:
    return sum(isinstance(module, Fp8Linear) for module in model.modules())


__all__ = [
    "MODES",
    "Fp8Linear",
    "check_fp8_device",
    "fp8_support",
    "int8_layers",
    "quantize_fp8",
    "quantize_int8",
    "quantize_model",
    "quantize_rows",
]
