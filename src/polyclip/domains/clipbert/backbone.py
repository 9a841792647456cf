"""ClipBERT's vision side: a detectron2 ResNet up to res5 and the grid encoder.

Layout and arithmetic follow detectron2's ``modeling/backbone/resnet.py`` (``BasicStem``,
``BottleneckBlock``, ``FrozenBatchNorm2d``) as ClipBERT builds it (jayleicn/ClipBERT
``src/modeling/grid_feat.py``: ``GridFeatBackbone`` with ``RES5_DILATION = 1`` and the res5 output taken
as the grid), so that the parameter names below the ``backbone.`` prefix are detectron2's own:
``stem.conv1.{weight,norm.*}``, ``res{2..5}.{i}.{conv1,conv2,conv3,shortcut}.{weight,norm.*}``.

The grid encoder is ClipBERT's ``grid_encoder``: 3x3 conv (no bias) -> MaxPool2d(2) -> ReLU.
Input pixels are detectron2's convention: BGR, 0..255 minus the per-channel mean, std 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from polyclip.domains.clipbert.config import GridBackboneConfig


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters, all stored as buffers (detectron2's)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)


class ConvNorm(nn.Conv2d):
    """A bias-free convolution followed by its norm, kept as ``.norm`` (detectron2's ``layers.Conv2d``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, eps: float):
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False
        )
        self.norm = FrozenBatchNorm2d(out_channels, eps)
        # detectron2 c2_msra_fill: He initialisation scaled by fan-out
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


class Stem(nn.Module):
    """7x7/2 conv + norm + ReLU, then a 3x3/2 max pool: stride 4."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.conv1 = ConvNorm(3, channels, 7, stride=2, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu_(self.conv1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 with a projection shortcut when the width changes; ReLU after the sum."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        bottleneck: int,
        stride: int,
        stride_in_1x1: bool,
        eps: float,
    ):
        super().__init__()
        self.shortcut = (
            ConvNorm(in_channels, out_channels, 1, stride=stride, eps=eps)
            if in_channels != out_channels
            else None
        )
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = ConvNorm(in_channels, bottleneck, 1, stride=stride_1x1, eps=eps)
        self.conv2 = ConvNorm(bottleneck, bottleneck, 3, stride=stride_3x3, eps=eps)
        self.conv3 = ConvNorm(bottleneck, out_channels, 1, stride=1, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        out = out + (self.shortcut(x) if self.shortcut is not None else x)
        return F.relu_(out)


class ResNetBackbone(nn.Module):
    """detectron2 ``ResNet`` with ``OUT_FEATURES = ["res5"]``: (N, 3, H, W) -> (N, C5, H/32, W/32)."""

    def __init__(self, config: GridBackboneConfig):
        super().__init__()
        eps = config.norm_eps
        self.stem = Stem(config.stem_channels, eps)
        self.stage_names: list[str] = []
        in_channels = config.stem_channels
        out_channels, bottleneck = config.res2_out_channels, config.res2_bottleneck_channels
        for index, num_blocks in enumerate(config.stage_blocks):
            first_stride = 1 if index == 0 else 2
            blocks = []
            for block in range(num_blocks):
                blocks.append(
                    Bottleneck(
                        in_channels,
                        out_channels,
                        bottleneck,
                        stride=first_stride if block == 0 else 1,
                        stride_in_1x1=config.stride_in_1x1,
                        eps=eps,
                    )
                )
                in_channels = out_channels
            name = f"res{index + 2}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            out_channels, bottleneck = out_channels * 2, bottleneck * 2
        self.out_channels = in_channels
        self.grad_checkpointing = False
        self.freeze(config.freeze_at)

    def freeze(self, freeze_at: int) -> None:
        """Stop gradients for the stem (``freeze_at >= 1``) and the first stages (res2 at 2, ...)."""
        modules = [self.stem] + [getattr(self, name) for name in self.stage_names]
        for module in modules[:freeze_at]:
            for parameter in module.parameters():
                parameter.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for name in self.stage_names:
            stage = getattr(self, name)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return x


class GridFeatureEncoder(nn.Module):
    """Frames -> grids of visual tokens: ResNet res5 -> 3x3 conv -> 2x2 max pool -> ReLU.

    (N, 3, H, W) BGR mean-subtracted pixels -> (N, H/64, W/64, D).
    """

    def __init__(self, config: GridBackboneConfig):
        super().__init__()
        self.backbone = ResNetBackbone(config)
        conv = nn.Conv2d(self.backbone.out_channels, config.out_channels, 3, padding=1, bias=False)
        self.grid_encoder = nn.Sequential(conv, nn.MaxPool2d(kernel_size=2, stride=2), nn.ReLU(inplace=True))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.grad_checkpointing = enable

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        grid = self.grid_encoder(self.backbone(pixels))  # (N, D, h, w)
        return grid.permute(0, 2, 3, 1)  # (N, h, w, D)
