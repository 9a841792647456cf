"""ClipBERT: a ResNet grid-feature encoder and a BERT cross-encoder over text and visual tokens.

Lei et al. 2021, "Less is More: ClipBERT for Video-and-Language Learning via Sparse Sampling";
reference: jayleicn/ClipBERT ``src/modeling/modeling.py`` (``VisualInputEmbedding``,
``ClipBertBaseModel``, ``ClipBertForPreTraining``, ``ClipBertForSequenceClassification``,
``ClipBertForVideoTextRetrieval``) and ``src/modeling/e2e_model.py``.

What a faithful forward pass needs, as the reference does it:

- each frame of a clip -> ResNet res5 -> grid encoder -> (h, w, D); the clip's frames are mean-pooled;
- visual tokens = grid + row embedding + column embedding, flattened row-major, + the single visual
  token-type embedding, then their own LayerNorm (the unused ``position_embeddings`` table of the
  reference is never added);
- text tokens = BERT embeddings (word + position + token type 0, LayerNorm);
- the sequence is ``[text; visual]``; the attention mask is the text padding mask followed by ones;
- 12 post-norm BERT layers (exact GELU), then the BERT pooler (tanh(dense(h[CLS])));
- the pooled vector feeds the task head.

The text part with no visual tokens is exactly transformers' ``BertModel``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from polyclip.domains.clipbert.backbone import GridFeatureEncoder
from polyclip.domains.clipbert.config import ClipBertConfig, CrossEncoderConfig, HeadConfig
from polyclip.layers import Attention, Mlp


class ClipBertInputError(ValueError):
    """Inputs to a ClipBERT model have the wrong shape or do not fit its configuration."""


class PostNormLayer(nn.Module):
    """BERT's layer: ``LN(x + attn(x))`` then ``LN(x + mlp(x))``, dropout on both branch outputs."""

    def __init__(self, config: CrossEncoderConfig):
        super().__init__()
        D = config.hidden_size
        self.attn = Attention(D, config.num_heads, dropout=config.attention_dropout)
        self.attn_norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.mlp = Mlp(D, config.intermediate_size, config.activation)
        self.mlp_norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: torch.Tensor, attend: torch.Tensor | None) -> torch.Tensor:
        x = self.attn_norm(x + self.dropout(self.attn(x, attn_mask=attend)))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))


class TextEmbeddings(nn.Module):
    """BERT embeddings: word + learned position + token type, LayerNorm, dropout."""

    def __init__(self, config: CrossEncoderConfig):
        super().__init__()
        D = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, D, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, D)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, D)
        self.norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        B, L = input_ids.shape
        if L > self.position_embeddings.num_embeddings:
            raise ClipBertInputError(
                f"{L} text tokens exceed the model's {self.position_embeddings.num_embeddings} positions"
            )
        positions = torch.arange(L, device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.norm(x))  # (B, L, D)


class VisualEmbeddings(nn.Module):
    """Clip grid -> visual tokens: temporal mean, 2D row/column positions, token type, LayerNorm."""

    def __init__(self, config: CrossEncoderConfig):
        super().__init__()
        D = config.hidden_size
        self.row_position_embeddings = nn.Embedding(config.max_grid_rows, D)
        self.col_position_embeddings = nn.Embedding(config.max_grid_cols, D)
        self.token_type_embeddings = nn.Embedding(1, D)  # one visual token type
        self.norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        if grid.ndim != 5:
            raise ClipBertInputError(f"a clip grid is (B, T, h, w, D), got shape {tuple(grid.shape)}")
        B, T, h, w, D = grid.shape
        if h > self.row_position_embeddings.num_embeddings or w > self.col_position_embeddings.num_embeddings:
            raise ClipBertInputError(
                f"a {h}x{w} grid exceeds the model's {self.row_position_embeddings.num_embeddings}x"
                f"{self.col_position_embeddings.num_embeddings} grid positions; use smaller frames"
            )
        grid = grid.mean(dim=1)  # (B, h, w, D): frames of a clip are mean-pooled
        rows = self.row_position_embeddings(torch.arange(h, device=grid.device))  # (h, D)
        cols = self.col_position_embeddings(torch.arange(w, device=grid.device))  # (w, D)
        grid = grid + rows[:, None, :] + cols[None, :, :]
        tokens = grid.reshape(B, h * w, D) + self.token_type_embeddings.weight[0]
        return self.dropout(self.norm(tokens))  # (B, h*w, D)


class CrossEncoder(nn.Module):
    """BERT over ``[text tokens; visual tokens]`` with its pooler."""

    def __init__(self, config: CrossEncoderConfig):
        super().__init__()
        self.text_embeddings = TextEmbeddings(config)
        self.visual_embeddings = VisualEmbeddings(config)
        self.layers = nn.ModuleList(PostNormLayer(config) for _ in range(config.num_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.grad_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        visual_tokens: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Lt) ids, (B, Lt) 1/0 mask, (B, Lv, D) visual tokens -> sequence (B, Lt+Lv, D), pooled (B, D)."""
        if input_ids.ndim != 2:
            raise ClipBertInputError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
        if text_mask is None:
            text_mask = torch.ones_like(input_ids)
        if text_mask.shape != input_ids.shape:
            raise ClipBertInputError(
                f"text mask {tuple(text_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
            )
        x = self.text_embeddings(input_ids, token_type_ids)  # (B, Lt, D)
        attend = text_mask.bool()
        if visual_tokens is not None:
            if visual_tokens.shape[0] != x.shape[0]:
                raise ClipBertInputError(
                    f"{visual_tokens.shape[0]} visual sequences for {x.shape[0]} texts; expand them first"
                )
            x = torch.cat([x, visual_tokens.to(x.dtype)], dim=1)  # (B, Lt+Lv, D)
            visible = attend.new_ones(visual_tokens.shape[:2])
            attend = torch.cat([attend, visible], dim=1)  # (B, Lt+Lv)
        attend = attend[:, None, None, :]  # (B, 1, 1, L): every query sees the same keys
        for layer in self.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, attend, use_reentrant=False)
            else:
                x = layer(x, attend)
        pooled = torch.tanh(self.pooler(x[:, 0]))  # (B, D)
        return x, pooled


class ItmHead(nn.Module):
    """The pre-training image-text matching classifier: Linear(D, 2) on the pooled vector."""

    def __init__(self, hidden_size: int, config: HeadConfig):
        super().__init__()
        self.fc = nn.Linear(hidden_size, config.num_outputs)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(pooled)


class MlpHead(nn.Module):
    """The fine-tuning classifier: dropout -> Linear(D, sD) -> ReLU -> Linear(sD, K)."""

    def __init__(self, hidden_size: int, config: HeadConfig, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc1 = nn.Linear(hidden_size, hidden_size * config.hidden_scale)
        self.fc2 = nn.Linear(hidden_size * config.hidden_scale, config.num_outputs)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(self.dropout(pooled))))


@dataclass
class ClipBertOutput:
    logits: torch.Tensor  # (N, K) head outputs
    pooled: torch.Tensor  # (N, D) tanh-pooled [CLS]
    sequence: torch.Tensor  # (N, Lt+Lv, D) last layer


class ClipBert(nn.Module):
    """The whole model. Pixels are (B, T, 3, H, W), BGR minus the mean (see ``video.VideoPreprocess``)."""

    def __init__(self, config: ClipBertConfig):
        super().__init__()
        self.config = config
        self.vision = GridFeatureEncoder(config.vision)
        self.encoder = CrossEncoder(config.text)
        D = config.text.hidden_size
        if config.head.kind == "itm":
            self.head: nn.Module = ItmHead(D, config.head)
        else:
            self.head = MlpHead(D, config.head, config.text.hidden_dropout)
        self.init_text_weights()

    @torch.no_grad()
    def init_text_weights(self) -> None:
        """BERT's initialisation for the cross-encoder and head: N(0, 0.02), zero biases, unit LayerNorms."""
        for module in [*self.encoder.modules(), *self.head.modules()]:
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, 0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
            if isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vision.set_grad_checkpointing(enable)
        self.encoder.grad_checkpointing = enable

    def encode_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) frames of B clips -> (B, T, h, w, D) grids."""
        if pixels.ndim != 5 or pixels.shape[2] != 3:
            raise ClipBertInputError(f"clip pixels must be (B, T, 3, H, W), got shape {tuple(pixels.shape)}")
        B, T = pixels.shape[:2]
        grid = self.vision(pixels.flatten(0, 1))  # (B*T, h, w, D)
        return grid.unflatten(0, (B, T))

    def visual_tokens(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, T, h, w, D) clip grids -> (B, h*w, D) visual tokens."""
        return self.encoder.visual_embeddings(grid)

    def score_tokens(
        self, input_ids: torch.Tensor, text_mask: torch.Tensor, visual_tokens: torch.Tensor
    ) -> ClipBertOutput:
        """Cross-encode N texts with N visual token sequences (already paired) and apply the head."""
        sequence, pooled = self.encoder(input_ids, text_mask, visual_tokens)
        return ClipBertOutput(logits=self.head(pooled), pooled=pooled, sequence=sequence)

    def forward(
        self,
        pixels: torch.Tensor,
        input_ids: torch.Tensor,
        text_mask: torch.Tensor,
        texts_per_clip: list[int] | torch.Tensor | None = None,
    ) -> ClipBertOutput:
        """B clips (B, T, 3, H, W) and N texts (N, Lt) -> head logits (N, K).

        ``texts_per_clip`` (B,) says how many consecutive texts go with each clip (the reference's
        ``n_examples_list``); by default text i goes with clip i. The CNN runs once per clip.
        """
        grid = self.encode_frames(pixels)  # (B, T, h, w, D)
        if texts_per_clip is not None:
            counts = torch.as_tensor(texts_per_clip, device=grid.device)
            if counts.numel() != grid.shape[0] or int(counts.sum()) != input_ids.shape[0]:
                raise ClipBertInputError(
                    f"texts_per_clip {counts.tolist()} does not cover {grid.shape[0]} clips and "
                    f"{input_ids.shape[0]} texts"
                )
            grid = grid.repeat_interleave(counts, dim=0)  # (N, T, h, w, D)
        elif grid.shape[0] != input_ids.shape[0]:
            raise ClipBertInputError(
                f"{grid.shape[0]} clips and {input_ids.shape[0]} texts; pass texts_per_clip to pair them"
            )
        return self.score_tokens(input_ids, text_mask, self.visual_tokens(grid))
