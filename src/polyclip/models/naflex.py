"""SigLIP 2's NaFlex image tower: native aspect ratio, a variable number of patches per image.

An image is resized (keeping its aspect ratio) to at most ``max_num_patches`` patches of P x P pixels and
cut into a grid of h x w patches, each flattened to P*P*3 values and embedded by a linear layer (not a
convolution). The learned positions form a square G x G grid that is resized to each image's h x w grid by
antialiased bilinear interpolation. Images are padded to a fixed number of patches; the encoder's
self-attention and the MAP head never attend to the padding. The rest is SigLIP's ViT (no class token, no
pre-norm, MAP head).

References: Tschannen et al. 2025, "SigLIP 2: Multilingual Vision-Language Encoders with Improved Semantic
Understanding, Localization, and Dense Features"; Dehghani et al. 2023 (NaViT); transformers
``models/siglip2/modeling_siglip2.py`` (Siglip2VisionEmbeddings, Siglip2VisionTransformer).

The tower's input is one tensor per batch so that everything that stacks, moves and casts image tensors
(batched encoding, the index, the server, the feature cache) handles NaFlex images unchanged: the
*packed* layout ``(B, max_num_patches + 1, P*P*3)``. Rows ``0 .. max_num_patches - 1`` are the patches
(row-major over the patch grid, each patch flattened as (row, column, channel)), zero after the image's
``h * w`` patches; the last row is a header holding ``h`` and ``w`` as base-256 digits, exact in every
floating-point dtype (bf16 included). `pack_patches` and `unpack_patches` are the one home of this layout;
`forward_patches` takes transformers' ``(pixel_values, pixel_attention_mask, spatial_shapes)`` as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polyclip.layers import AttentionPoolingHead, Transformer
from polyclip.models.config import VisionConfig

_BASE = 256  # each header digit is below 256: an integer every float dtype holds exactly
_DIGITS = 3  # up to 256**3 patches along one side


def pack_patches(patches: torch.Tensor, grid: tuple[int, int], max_num_patches: int) -> torch.Tensor:
    """(h*w, P*P*3) patches of an h x w grid -> the packed (max_num_patches + 1, P*P*3) layout."""
    height, width = grid
    count, features = patches.shape
    if count != height * width or count > max_num_patches:
        raise ValueError(f"{count} patches for a {height} x {width} grid (at most {max_num_patches})")
    if features < 2 * _DIGITS:
        raise ValueError(f"patches of {features} values cannot hold the {2 * _DIGITS}-value header")
    packed = torch.zeros(max_num_patches + 1, features, dtype=patches.dtype)
    packed[:count] = patches
    for offset, value in ((0, height), (_DIGITS, width)):
        for digit in range(_DIGITS):
            packed[-1, offset + digit] = (value // _BASE ** (_DIGITS - 1 - digit)) % _BASE
    return packed


def unpack_patches(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N + 1, P*P*3) packed -> patches (B, N, P*P*3), mask (B, N) bool, spatial_shapes (B, 2) long."""
    if packed.dim() != 3 or packed.shape[1] < 2:
        raise ValueError(
            f"a NaFlex tower takes packed patches (B, max_num_patches + 1, P*P*3), got shape {tuple(packed.shape)}"
        )
    header = packed[:, -1, : 2 * _DIGITS].round().long().view(-1, 2, _DIGITS)  # (B, 2, digits)
    weights = torch.tensor([_BASE ** (_DIGITS - 1 - d) for d in range(_DIGITS)], device=packed.device)
    spatial_shapes = (header * weights).sum(-1)  # (B, 2): patch rows, patch columns
    patches = packed[:, :-1]
    mask = torch.arange(patches.shape[1], device=packed.device) < spatial_shapes.prod(-1, keepdim=True)
    return patches, mask, spatial_shapes


class NaFlexVisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig, embed_dim: int):
        super().__init__()
        self.config = config
        width, patch = config.width, config.patch_size
        self.patch_embed = nn.Linear(3 * patch * patch, width, bias=config.patch_bias)
        self.pos_embed = nn.Parameter(torch.zeros(config.grid_size**2, width))  # a G x G grid, row-major
        self.transformer = Transformer(
            width, config.layers, config.heads, config.mlp_dim, config.act, config.norm_eps
        )
        self.norm = nn.LayerNorm(width, eps=config.norm_eps)
        self.head = AttentionPoolingHead(width, config.heads, config.mlp_dim, config.act, config.norm_eps)
        self.proj = nn.Linear(width, embed_dim, bias=False) if config.projection else None
        self.init_weights()

    def init_weights(self) -> None:
        width = self.config.width
        nn.init.normal_(self.pos_embed, std=width**-0.5)
        self.transformer.init_weights(width)
        if self.proj is not None:
            nn.init.normal_(self.proj.weight, std=width**-0.5)

    def position_embeddings(self, spatial_shapes: torch.Tensor, length: int) -> torch.Tensor:
        """The G x G grid resized to each image's (h, w) patch grid, zero over the padding: (B, length, D).

        Antialiased bilinear resizing with half-pixel centres (``F.interpolate(mode="bilinear",
        align_corners=False, antialias=True)``), computed in float32 as the reference does; once per
        distinct grid in the batch. (The reference fills the padding with the first position; masked
        keys make the value of the padding irrelevant.)
        """
        grid = self.config.grid_size
        table = self.pos_embed.float().T.reshape(1, -1, grid, grid)  # (1, D, G, G)
        out = torch.zeros(spatial_shapes.shape[0], length, table.shape[1], device=table.device)
        for height, width in torch.unique(spatial_shapes, dim=0).tolist():
            resized = F.interpolate(
                table, size=(height, width), mode="bilinear", align_corners=False, antialias=True
            )  # (1, D, h, w)
            rows = (spatial_shapes == torch.tensor([height, width], device=spatial_shapes.device)).all(-1)
            out[rows, : height * width] = resized.flatten(2)[0].T  # (h*w, D)
        return out.to(self.pos_embed.dtype)

    def forward_features(
        self, patches: torch.Tensor, mask: torch.Tensor, spatial_shapes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised tokens (B, L, D) and the key mask (B, 1, 1, L) (None when nothing is padding).

        ``patches`` (B, N, P*P*3); ``mask`` (B, N), true for real patches, which come first;
        ``spatial_shapes`` (B, 2) each image's patch grid (rows, columns). Padding columns that no image
        of the batch uses are dropped first: same numbers, fewer tokens.
        """
        spatial_shapes = spatial_shapes.to(device=patches.device, dtype=torch.long)
        mask = mask.to(device=patches.device, dtype=torch.bool)
        length = max(int(mask.sum(-1).max()), 1) if mask.numel() else 1
        patches, mask = patches[:, :length], mask[:, :length]
        x = self.patch_embed(patches.to(self.patch_embed.weight.dtype))  # (B, L, D)
        x = x + self.position_embeddings(spatial_shapes, length)
        attn_mask = None if bool(mask.all()) else mask[:, None, None, :]  # (B, 1, 1, L)
        x = self.transformer(x, attn_mask=attn_mask)
        return self.norm(x), attn_mask

    def forward_patches(
        self, patches: torch.Tensor, mask: torch.Tensor, spatial_shapes: torch.Tensor
    ) -> torch.Tensor:
        """(B, N, P*P*3) patches, (B, N) mask, (B, 2) grids -> (B, E): transformers' three inputs."""
        x, attn_mask = self.forward_features(patches, mask, spatial_shapes)
        pooled = self.head(x, attn_mask=attn_mask)  # (B, D)
        return self.proj(pooled) if self.proj is not None else pooled

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        """(B, N + 1, P*P*3) packed patches (see `pack_patches`) -> (B, E)."""
        features = 3 * self.config.patch_size**2
        if packed.dim() != 3 or packed.shape[-1] != features:
            raise ValueError(
                f"this NaFlex tower takes packed patches (B, max_num_patches + 1, {features}) from its own "
                f"preprocessing, got a tensor of shape {tuple(packed.shape)}"
            )
        patches, mask, spatial_shapes = unpack_patches(packed)
        if bool((spatial_shapes.prod(-1) > patches.shape[1]).any()) or bool((spatial_shapes < 1).any()):
            raise ValueError("packed patches with a header naming more patches than the tensor holds")
        return self.forward_patches(patches, mask, spatial_shapes)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable
