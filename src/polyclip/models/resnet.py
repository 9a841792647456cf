"""OpenAI's ModifiedResNet image tower (RN50, RN101, RN50x4, RN50x16, RN50x64).

Differences from torchvision's ResNet (Radford et al. 2021, ``clip/model.py``): a three-convolution
stem with an average pool instead of a max pool; anti-aliased strided convolutions (every conv has
stride 1 and an ``AvgPool2d(stride)`` follows conv2); the downsample branch is AvgPool -> 1x1 conv ->
BN; the final pooling is a QKV attention pool whose query is the mean token.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from polyclip.layers import AttentionPool2d
from polyclip.models.config import VisionConfig


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or in_planes != planes * self.expansion:
            # keys downsample.1 (conv) and downsample.2 (bn) follow the checkpoints' numbering
            self.downsample = nn.Sequential(
                nn.AvgPool2d(stride) if stride > 1 else nn.Identity(),
                nn.Conv2d(in_planes, planes * self.expansion, 1, stride=1, bias=False),
                nn.BatchNorm2d(planes * self.expansion),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.act3(out + identity)


class ModifiedResNet(nn.Module):
    def __init__(self, config: VisionConfig, embed_dim: int):
        super().__init__()
        self.config = config
        width = config.resnet_width
        self.stem = nn.Sequential(
            nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False),
            nn.BatchNorm2d(width // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(width // 2, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(2),
        )
        in_planes = width
        stages = []
        for index, blocks in enumerate(config.resnet_layers):
            planes = width * 2**index
            stride = 1 if index == 0 else 2
            stage = [Bottleneck(in_planes, planes, stride)]
            in_planes = planes * Bottleneck.expansion
            stage += [Bottleneck(in_planes, planes) for _ in range(1, blocks)]
            stages.append(nn.Sequential(*stage))
        self.stages = nn.ModuleList(stages)
        feature_dim = width * 32  # the last stage's channels
        self.attnpool = AttentionPool2d(config.image_size // 32, feature_dim, feature_dim // 64, embed_dim)
        self.grad_checkpointing = False
        self.init_weights()

    def init_weights(self) -> None:
        self.attnpool.init_weights()
        for stage in self.stages:
            for block in stage:
                nn.init.zeros_(block.bn3.weight)  # each residual branch starts as identity

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map: (B, 32 * width, H/32, W/32)."""
        x = self.stem(pixels.to(self.stem[0].weight.dtype))
        for stage in self.stages:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return x

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.attnpool(self.forward_features(pixels))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
