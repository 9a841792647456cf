"""Building blocks shared by every tower: attention, MLP, transformer blocks, pooling heads.

One implementation of each piece, configured by arguments, so that CLIP's and SigLIP's towers (and
OpenAI's ModifiedResNet attention pool) are configurations rather than copies. Attention always runs
through ``torch.nn.functional.scaled_dot_product_attention`` on a fused QKV projection.

References: OpenAI CLIP ``clip/model.py``; open_clip ``transformer.py``; timm ``layers/``;
transformers ``models/clip`` and ``models/siglip``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the activation OpenAI's CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)

    @staticmethod
    def forward_inplace(x: torch.Tensor) -> torch.Tensor:
        # x * sigmoid(1.702 x) == silu(1.702 x) / 1.702: three in-place passes with one fused kernel,
        # about three times faster than the literal form on CPU (equal to within float rounding)
        x.mul_(1.702)
        F.silu(x, inplace=True)
        return x.div_(1.702)


def _activation_inplace(activation: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply an activation overwriting ``x`` (inference only): one buffer instead of several.

    Large CPU buffers are fresh pages on every allocation, so at batch 32 a MLP's out-of-place
    activation spends more time faulting pages in than computing.
    """
    if isinstance(activation, QuickGELU):
        return QuickGELU.forward_inplace(x)
    if isinstance(activation, nn.ReLU):
        return x.relu_()
    return activation(x)


ACTIVATIONS = {
    "quick_gelu": QuickGELU,
    "gelu": nn.GELU,  # exact (erf) GELU: open_clip and timm
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),  # transformers' SigLIP ("gelu_pytorch_tanh")
    "relu": nn.ReLU,
}


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection.

    ``qkv.weight`` is ``(3D, D)`` with rows ordered q, k, v, the layout of ``nn.MultiheadAttention``'s
    ``in_proj_weight`` (and so of OpenAI's and open_clip's checkpoints).
    """

    def __init__(self, dim: int, num_heads: int, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dropout = dropout  # on the attention probabilities, in training only (BERT's attention dropout)
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    # On CPU three (D, D) products over row blocks of the fused weight run faster than one (3D, D)
    # product (the BLAS blocks the narrower output better) and leave q, k, v contiguous; on GPU one launch wins.
    split_on_cpu = True

    def forward(
        self, x: torch.Tensor, is_causal: bool = False, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``attn_mask``: boolean (B, 1, 1, L) keys to attend to (a padding mask), or an additive float mask."""
        B, L, D = x.shape
        if self.split_on_cpu and x.device.type == "cpu" and isinstance(self.qkv, nn.Linear):
            weights = self.qkv.weight.chunk(3)
            biases = self.qkv.bias.chunk(3) if self.qkv.bias is not None else (None,) * 3
            # each (B, L, D) -> (B, H, L, Dh)
            q, k, v = (
                F.linear(x, w, b).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
                for w, b in zip(weights, biases)
            )
        else:
            # (B, L, 3D) -> (3, B, H, L, Dh)
            q, k, v = (
                self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            )
        dropout = self.dropout if self.training else 0.0
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal
        )  # (B, H, L, Dh)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = make_activation(act)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        if torch.is_grad_enabled() and hidden.requires_grad:
            return self.fc2(self.act(hidden))
        return self.fc2(_activation_inplace(self.act, hidden))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, act: str, norm_eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_dim, act)

    def forward(
        self, x: torch.Tensor, is_causal: bool = False, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if torch.is_grad_enabled():
            # autograd may need every intermediate (also when only this block's weights train, as under LiT)
            x = x + self.attn(self.norm1(x), is_causal=is_causal, attn_mask=attn_mask)
            return x + self.mlp(self.norm2(x))
        # no_grad / inference_mode: the residual stream is the block's own tensor, updated in place
        x = x + self.attn(self.norm1(x), is_causal=is_causal, attn_mask=attn_mask)
        return x.add_(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    """A stack of pre-norm blocks, with optional activation checkpointing."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_dim: int, act: str, norm_eps: float):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_dim, act, norm_eps) for _ in range(depth))
        self.grad_checkpointing = False

    def forward(
        self, x: torch.Tensor, is_causal: bool = False, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``attn_mask``: as `Attention`'s, the same for every block (NaFlex's padded patches)."""
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, is_causal, attn_mask, use_reentrant=False)
            else:
                x = block(x, is_causal=is_causal, attn_mask=attn_mask)
        return x

    def init_weights(self, dim: int) -> None:
        # CLIP's scheme (open_clip): attention std D^-0.5, residual projections shrunk with depth.
        attn_std = dim**-0.5
        proj_std = attn_std * (2 * len(self.blocks)) ** -0.5
        fc_std = (2 * dim) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.fc1.weight, std=fc_std)
            nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
            for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)


class CrossAttention(nn.Module):
    """Queries attend over a sequence: separate Q and fused KV projections (timm's layout)."""

    def __init__(self, dim: int, num_heads: int, bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(
        self, query: torch.Tensor, x: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``attn_mask``: boolean (B, 1, 1, L), the positions of ``x`` to attend to (a padding mask)."""
        B, Lq, D = query.shape
        L = x.shape[1]
        q = self.q(query).view(B, Lq, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Lq, Dh)
        k, v = self.kv(x).view(B, L, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, Lq, Dh)
        return self.proj(out.transpose(1, 2).reshape(B, Lq, D))


class AttentionPoolingHead(nn.Module):
    """Multihead attention pooling (MAP), SigLIP's image head.

    A learned probe attends over all tokens; then LayerNorm and a residual MLP; token 0 is the output.
    (big_vision ``MAPHead``; transformers ``SiglipMultiheadAttentionPoolingHead``.)
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, act: str, norm_eps: float):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, dim))
        self.attn = CrossAttention(dim, num_heads)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_dim, act)
        nn.init.normal_(self.probe, std=dim**-0.5)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``attn_mask``: boolean (B, 1, 1, L) tokens the probe may attend to (NaFlex's real patches)."""
        x = self.attn(self.probe.expand(x.shape[0], -1, -1), x, attn_mask=attn_mask)  # (B, 1, D)
        x = x + self.mlp(self.norm(x))
        return x[:, 0]


class AttentionPool2d(nn.Module):
    """OpenAI ModifiedResNet's pooling: the mean token (plus positions) queries the spatial grid."""

    def __init__(self, spatial_dim: int, dim: int, num_heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spatial_dim**2 + 1, dim) / dim**0.5)
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # (B, HW+1, C)
        x = x + self.positional_embedding.to(x.dtype)
        Dh = C // self.num_heads
        q = self.q_proj(x[:, :1]).view(B, 1, self.num_heads, Dh).transpose(1, 2)  # (B, H, 1, Dh)
        k = self.k_proj(x).view(B, -1, self.num_heads, Dh).transpose(1, 2)  # (B, H, HW+1, Dh)
        v = self.v_proj(x).view(B, -1, self.num_heads, Dh).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, 1, Dh)
        return self.c_proj(out.transpose(1, 2).reshape(B, C))

    def init_weights(self) -> None:
        std = self.c_proj.in_features**-0.5
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.c_proj):
            nn.init.normal_(linear.weight, std=std)
