"""Bilinear attention network ("Bilinear Attention Networks", NeurIPS 2018) as MEVF and
PubMedCLIP use it: weight-normalised FC layers, a low-rank bilinear attention map with k=3 and
2 glimpses, bilinear pooling per glimpse with residual updates of the question tokens, and the
answer classifier. Reference: jnhwkim/ban-vqa (``fc.py``, ``bc.py``, ``attention.py``,
``classifier.py``), copied into PubMedCLIP's ``MEVF_PubMedCLIP``. The optional counting module of BAN
is not built (the reference runs keep it off).

Attention logits (glimpse g, visual token i, question token j), with U, V the ReLU FC layers:
    A_g[i, j] = sum_d (U v_i)_d * p_g,d * (V q_j)_d + b_g      p_g: weight-normalised (rank k*H)
    att_g = softmax over all (i, j) of A_g
Pooled joint feature of glimpse g (BCNet ``forward_with_weights``):
    f_g,d = sum_ij (U' v_i)_d att_g[i, j] (V' q_j)_d, then summed over groups of k dims
Residual update: q_j <- W_g f_g + q_j for every question token j; output sum_j q_j.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """Linear layer with W = g * V / ||V||_F, one scalar g ("Weight Normalization", 2016; torch's
    ``weight_norm(..., dim=None)`` as the reference uses it). Initialised as ``nn.Linear`` with g = ||V||."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        linear = nn.Linear(in_features, out_features, bias=bias)
        self.weight_v = nn.Parameter(linear.weight.detach().clone())  # (out, in)
        self.weight_g = nn.Parameter(linear.weight.detach().norm())  # ()
        self.bias = nn.Parameter(linear.bias.detach().clone()) if bias else None

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class WeightNormFC(nn.Sequential):
    """ban-vqa's two-dimension ``FCNet``: dropout -> weight-normalised linear -> ReLU (optional)."""

    def __init__(self, in_features: int, out_features: int, dropout: float = 0.0, activation: bool = True):
        layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
        layers.append(WeightNormLinear(in_features, out_features))
        if activation:
            layers.append(nn.ReLU())
        super().__init__(*layers)


class BilinearAttentionMap(nn.Module):
    """(B, V, Dv) visual tokens x (B, Q, Dq) question tokens -> attention (B, G, V, Q) and its logits."""

    def __init__(
        self,
        visual_dim: int,
        question_dim: int,
        hidden_dim: int,
        glimpses: int = 2,
        k: int = 3,  # rank multiplier of the low-rank bilinear form (BAN's default)
        dropout: float = 0.2,  # before each FC layer
        attention_dropout: float = 0.5,  # on the projected visual tokens
    ):
        super().__init__()
        self.glimpses = glimpses
        self.visual_net = WeightNormFC(visual_dim, hidden_dim * k, dropout)
        self.question_net = WeightNormFC(question_dim, hidden_dim * k, dropout)
        self.dropout = nn.Dropout(attention_dropout)
        projection = torch.randn(
            glimpses, hidden_dim * k
        )  # the reference draws h_mat and h_bias from N(0, 1)
        self.projection_v = nn.Parameter(projection)  # (G, kH), weight-normalised over the whole tensor
        self.projection_g = nn.Parameter(projection.norm())
        self.bias = nn.Parameter(torch.randn(glimpses))  # (G,)

    @property
    def projection(self) -> torch.Tensor:
        return self.projection_g * self.projection_v / self.projection_v.norm()  # (G, kH)

    def logits(self, visual: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        v = self.dropout(self.visual_net(visual))  # (B, V, kH)
        q = self.question_net(question)  # (B, Q, kH)
        logits = torch.einsum("bvd,gd,bqd->bgvq", v, self.projection, q)  # (B, G, V, Q)
        return logits + self.bias.view(1, -1, 1, 1)

    def forward(
        self, visual: torch.Tensor, question: torch.Tensor, visual_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``visual_mask`` (B, V) is True for real visual tokens (the reference masks all-zero ones)."""
        logits = self.logits(visual, question)
        if visual_mask is not None:
            logits = logits.masked_fill(~visual_mask[:, None, :, None], float("-inf"))
        batch, glimpses, num_visual, num_question = logits.shape
        attention = logits.reshape(batch, glimpses, num_visual * num_question).softmax(-1)
        return attention.view(batch, glimpses, num_visual, num_question), logits


class BilinearPooling(nn.Module):
    """One glimpse's joint feature (BCNet ``forward_with_weights``): (B, V, Dv), (B, Q, Dq), (B, V, Q) -> (B, H)."""

    def __init__(self, visual_dim: int, question_dim: int, hidden_dim: int, k: int = 1, dropout: float = 0.2):
        super().__init__()
        self.k = k
        self.visual_net = WeightNormFC(visual_dim, hidden_dim * k, dropout)
        self.question_net = WeightNormFC(question_dim, hidden_dim * k, dropout)

    def forward(self, visual: torch.Tensor, question: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        v = self.visual_net(visual)  # (B, V, kH)
        q = self.question_net(question)  # (B, Q, kH)
        joint = torch.einsum("bvd,bvq,bqd->bd", v, attention, q)  # (B, kH)
        if self.k > 1:  # the reference's AvgPool1d(k, stride=k) * k: sum over consecutive groups of k
            joint = joint.view(joint.shape[0], -1, self.k).sum(-1)  # (B, H)
        return joint


class BilinearAttentionNetwork(nn.Module):
    """Visual tokens (B, V, Dv) and question token states (B, Q, H) -> joint representation (B, H)."""

    def __init__(
        self,
        visual_dim: int,
        hidden_dim: int = 1024,
        glimpses: int = 2,
        attention_k: int = 3,
        pooling_k: int = 1,  # the reference's residual BCNets use k=1
        dropout: float = 0.2,
        attention_dropout: float = 0.5,
    ):
        super().__init__()
        self.attention = BilinearAttentionMap(
            visual_dim, hidden_dim, hidden_dim, glimpses, attention_k, dropout, attention_dropout
        )
        self.pooling = nn.ModuleList(
            BilinearPooling(visual_dim, hidden_dim, hidden_dim, pooling_k, dropout) for _ in range(glimpses)
        )
        self.question_projections = nn.ModuleList(
            WeightNormFC(hidden_dim, hidden_dim, dropout, activation=False) for _ in range(glimpses)
        )

    def forward(
        self, visual: torch.Tensor, question: torch.Tensor, visual_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        attention, _ = self.attention(visual, question, visual_mask)  # (B, G, V, Q), from the initial q
        for glimpse, (pool, project) in enumerate(zip(self.pooling, self.question_projections)):
            joint = pool(visual, question, attention[:, glimpse])  # (B, H)
            question = project(joint).unsqueeze(1) + question  # (B, Q, H) residual
        return question.sum(1)  # (B, H)


class AnswerClassifier(nn.Sequential):
    """ban-vqa's ``SimpleClassifier``: WN linear -> ReLU -> dropout -> WN linear, (B, H) -> (B, A) logits."""

    def __init__(self, in_features: int, hidden_features: int, num_answers: int, dropout: float = 0.5):
        super().__init__(
            WeightNormLinear(in_features, hidden_features),
            nn.ReLU(),
            nn.Dropout(dropout),
            WeightNormLinear(hidden_features, num_answers),
        )


__all__ = [
    "AnswerClassifier",
    "BilinearAttentionMap",
    "BilinearAttentionNetwork",
    "BilinearPooling",
    "WeightNormFC",
    "WeightNormLinear",
]
