"""Consensus over sparsely sampled clips: aggregate per-clip logits into video-level predictions.

ClipBERT (Lei et al. 2021, section 3.2; jayleicn/ClipBERT ``src/tasks/run_video_retrieval.py`` and
``run_video_qa.py``) scores each clip independently and combines the clip logits of a video, class by
class, with mean pooling, max pooling or log-sum-exp; the combined logits then give the prediction
(retrieval score = softmax(logits)[1] for a 2-way head, sigmoid(logit) for a 1-output head).

Training with log-sum-exp uses the reference's loss: the probability of class y is the share of
``sum_c exp(l_cy)`` in ``sum_c sum_k exp(l_ck)``, i.e. a softmax over all (clip, class) pairs with the
clips of a class pooled:

    loss = logsumexp_{c,k} l_ck - logsumexp_c l_cy

Mean and max pooling train with cross-entropy on the pooled logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AGGREGATIONS = ("mean", "max", "lse")


def _check(method: str) -> None:
    if method not in AGGREGATIONS:
        raise ValueError(f"clip aggregation must be one of {AGGREGATIONS}, got {method!r}")


def aggregate_clip_logits(clip_logits: torch.Tensor, method: str = "mean") -> torch.Tensor:
    """(C, B, K) logits of C clips -> (B, K) video-level logits."""
    _check(method)
    if clip_logits.ndim != 3:
        raise ValueError(f"clip logits must be (clips, batch, classes), got shape {tuple(clip_logits.shape)}")
    if method == "mean":
        return clip_logits.mean(dim=0)
    if method == "max":
        return clip_logits.max(dim=0).values
    return torch.logsumexp(clip_logits, dim=0)


def match_scores(logits: torch.Tensor) -> torch.Tensor:
    """(B, K) matching logits -> (B,) match probability: softmax(.)[:, 1] for K = 2, sigmoid for K = 1."""
    if logits.ndim != 2 or logits.shape[1] not in (1, 2):
        raise ValueError(f"matching logits must be (B, 1) or (B, 2), got shape {tuple(logits.shape)}")
    if logits.shape[1] == 2:
        return F.softmax(logits.float(), dim=1)[:, 1]
    return torch.sigmoid(logits.float()[:, 0])


def clip_consensus_loss(clip_logits: torch.Tensor, labels: torch.Tensor, method: str = "lse") -> torch.Tensor:
    """(C, B, K) clip logits and (B,) class labels -> (B,) per-example training loss."""
    _check(method)
    if method == "lse":
        per_example = clip_logits.permute(1, 0, 2)  # (B, C, K)
        total = torch.logsumexp(per_example.flatten(1), dim=1)  # (B,)
        pooled = torch.logsumexp(per_example, dim=1)  # (B, K)
        return total - pooled.gather(1, labels.view(-1, 1)).squeeze(1)
    return F.cross_entropy(aggregate_clip_logits(clip_logits, method), labels, reduction="none")
