"""Vision transformer tower: CLIP's (class token, ln_pre, ln_post, projection) and SigLIP's
(no class token, MAP attention-pooling head) are configurations of this one class.

References: Dosovitskiy et al. 2020 (ViT); Radford et al. 2021 (CLIP, ``clip/model.py``);
Zhai et al. 2023 (SigLIP, big_vision ``vit.py``); transformers ``CLIPVisionTransformer`` and
``SiglipVisionTransformer``.
"""

from __future__ import annotations

import torch
from torch import nn

from polyclip.layers import AttentionPoolingHead, Transformer
from polyclip.models.config import VisionConfig


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig, embed_dim: int):
        super().__init__()
        self.config = config
        width = config.width
        self.patch_embed = nn.Conv2d(
            3, width, kernel_size=config.patch_size, stride=config.patch_size, bias=config.patch_bias
        )
        num_tokens = config.grid_size**2 + int(config.class_token)
        self.class_embedding = nn.Parameter(torch.zeros(width)) if config.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(num_tokens, width))
        self.norm_pre = nn.LayerNorm(width, eps=config.norm_eps) if config.pre_norm else None
        self.transformer = Transformer(
            width, config.layers, config.heads, config.mlp_dim, config.act, config.norm_eps
        )
        self.norm = nn.LayerNorm(width, eps=config.norm_eps)
        self.head = (
            AttentionPoolingHead(width, config.heads, config.mlp_dim, config.act, config.norm_eps)
            if config.pool == "map"
            else None
        )
        self.proj = nn.Linear(width, embed_dim, bias=False) if config.projection else None
        self.init_weights()

    def init_weights(self) -> None:
        width = self.config.width
        if self.class_embedding is not None:
            nn.init.normal_(self.class_embedding, std=width**-0.5)
        nn.init.normal_(self.pos_embed, std=width**-0.5)
        self.transformer.init_weights(width)
        if self.proj is not None:
            nn.init.normal_(self.proj.weight, std=width**-0.5)

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Tokens after the blocks (and after the final norm for MAP pooling): (B, L, D)."""
        x = self.patch_embed(pixels)  # (B, D, G, G)
        x = x.flatten(2).transpose(1, 2)  # (B, G*G, D)
        if self.class_embedding is not None:
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)  # (B, 1 + G*G, D)
        x = x + self.pos_embed.to(x.dtype)
        if self.norm_pre is not None:
            x = self.norm_pre(x)
        x = self.transformer(x)
        if self.head is not None:
            x = self.norm(x)
        return x

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(pixels)
        pooled = self.head(x) if self.head is not None else self.norm(x[:, 0])  # (B, D)
        return self.proj(pooled) if self.proj is not None else pooled

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable
