"""Text transformer tower: CLIP's causal tower pooled at the end token, and SigLIP's bidirectional
tower pooled at the last position with a biased head, are configurations of this one class.

References: Radford et al. 2021 (``clip/model.py`` ``encode_text``); transformers ``CLIPTextTransformer``
and ``SiglipTextTransformer``; open_clip ``TextTransformer``.
"""

from __future__ import annotations

import torch
from torch import nn

from polyclip.layers import Transformer
from polyclip.models.config import TextConfig


class TextTransformer(nn.Module):
    def __init__(self, config: TextConfig, embed_dim: int):
        super().__init__()
        self.config = config
        width = config.width
        self.token_embedding = nn.Embedding(config.vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(config.context_length, width))
        self.transformer = Transformer(
            width, config.layers, config.heads, config.mlp_dim, config.act, config.norm_eps
        )
        self.norm = nn.LayerNorm(width, eps=config.norm_eps)
        self.proj = nn.Linear(width, embed_dim, bias=config.projection_bias) if config.projection else None
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        self.transformer.init_weights(self.config.width)
        if self.proj is not None:
            nn.init.normal_(self.proj.weight, std=self.config.width**-0.5)
            if self.proj.bias is not None:
                nn.init.zeros_(self.proj.bias)

    def pool_positions(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Index of the token each sequence is pooled at: (B,)."""
        if self.config.pool == "argmax":
            return token_ids.argmax(dim=-1)
        if self.config.pool == "eos":
            return (token_ids == self.config.eos_token_id).int().argmax(dim=-1)
        return torch.full(token_ids.shape[:1], token_ids.shape[1] - 1, device=token_ids.device)

    def forward_features(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Normalised token states: (B, L, D)."""
        L = token_ids.shape[1]
        if L > self.config.context_length:
            raise ValueError(
                f"{L} tokens exceed the text tower's context length {self.config.context_length}"
            )
        x = self.token_embedding(token_ids) + self.pos_embed[:L].to(self.token_embedding.weight.dtype)
        x = self.transformer(x, is_causal=self.config.causal)
        return self.norm(x)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        positions = self.pool_positions(token_ids)
        if self.config.causal:
            # A causal tower never looks past the pooled token: drop the padding columns every sequence
            # has after it. Same numbers, and zero-shot prompts of a few words cost a few tokens, not 77.
            token_ids = token_ids[:, : int(positions.max()) + 1]
        x = self.forward_features(token_ids)
        pooled = x[torch.arange(x.shape[0], device=x.device), positions]  # (B, D)
        return self.proj(pooled) if self.proj is not None else pooled

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable
