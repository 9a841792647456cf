"""Text-video retrieval with ClipBERT's cross-encoder: every (text, video) pair is scored jointly.

Protocol (jayleicn/ClipBERT ``src/tasks/run_video_retrieval.py`` ``inference_retrieval`` and
``eval_retrieval``): for each video, the CNN runs once on each of its sparsely sampled clips; every
text is cross-encoded with every clip; the clip logits of a (text, video) pair are aggregated (mean,
max or log-sum-exp) and turned into a match probability. The (texts x videos) score matrix is ranked
in both directions; metrics are R@K and the median rank (1-based), as in the paper's tables.

Cost is texts x videos x clips cross-encoder passes (the price of a cross-encoder); the CNN cost is
videos x clips x frames. A video's visual tokens are computed once and shared by every text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from polyclip.domains.clipbert.aggregate import aggregate_clip_logits, match_scores
from polyclip.domains.clipbert.model import ClipBert
from polyclip.domains.clipbert.tokenizer import TextBatch
from polyclip.eval.errors import EvalError
from polyclip.eval.retrieval import (
    DirectionMetrics,
    Ranking,
    RetrievalConfig,
    direction_metrics,
    positives_by_image,
)


@dataclass
class VideoRetrievalConfig:
    aggregation: str = "lse"  # ClipBERT's MSRVTT/DiDeMo/ActivityNet configs use log-sum-exp
    pair_batch_size: int = 64  # (text, clip) pairs per cross-encoder pass, drawn across clips and texts
    frame_batch_size: int = 32  # frames per CNN pass
    # bfloat16 autocast: on an H200 the cross-encoder ran 6.8x faster than fp32 (25,210 vs 3,717
    # pairs/s) with match probabilities within 0.003 of fp32 (benchmarks/clipbert.py)
    bf16: bool = False
    recall_ks: tuple[int, ...] = (1, 5, 10)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _autocast(model: torch.nn.Module, bf16: bool):
    return torch.autocast(device_type=_device(model).type, dtype=torch.bfloat16, enabled=bf16)


@torch.no_grad()
def video_tokens(
    model: ClipBert, pixels: torch.Tensor, frame_batch_size: int = 32, bf16: bool = False
) -> torch.Tensor:
    """(C, T, 3, S, S) clips of one video -> (C, Lv, D) visual tokens, the CNN run in frame batches."""
    if pixels.ndim != 5:
        raise EvalError(f"video clips must be (clips, frames, 3, H, W), got shape {tuple(pixels.shape)}")
    if frame_batch_size < 1:
        raise EvalError(f"frame_batch_size must be positive, got {frame_batch_size}")
    C, T = pixels.shape[:2]
    parameter = next(model.parameters())
    frames = pixels.flatten(0, 1)  # (C*T, 3, S, S)
    with _autocast(model, bf16):
        grids = [
            model.vision(frames[i : i + frame_batch_size].to(parameter.device, parameter.dtype))
            for i in range(0, frames.shape[0], frame_batch_size)
        ]
        grid = torch.cat(grids).unflatten(0, (C, T))  # (C, T, h, w, D)
        return model.visual_tokens(grid)


@torch.no_grad()
def clip_logits_for_texts(
    model: ClipBert, tokens: torch.Tensor, texts: TextBatch, pair_batch_size: int = 64, bf16: bool = False
) -> torch.Tensor:
    """(C, Lv, D) visual tokens of one video and M texts -> (C, M, K) head logits for every (clip, text).

    The C x M pairs are cut into batches regardless of clip boundaries, so that one query against a
    video still fills a batch with its clips.
    """
    if pair_batch_size < 1:
        raise EvalError(f"pair_batch_size must be positive, got {pair_batch_size}")
    device = _device(model)
    input_ids = texts.input_ids.to(device)
    mask = texts.attention_mask.to(device)
    C, M = tokens.shape[0], input_ids.shape[0]
    chunks = []
    with _autocast(model, bf16):
        for start in range(0, C * M, pair_batch_size):
            pair = torch.arange(start, min(start + pair_batch_size, C * M), device=device)
            clip, text = pair // M, pair % M
            output = model.score_tokens(input_ids[text], mask[text], tokens[clip])  # (m, K)
            chunks.append(output.logits.float())
    return torch.cat(chunks).view(C, M, -1)  # (C, M, K)


@torch.no_grad()
def score_videos(
    model: ClipBert,
    videos: Iterable[torch.Tensor],
    texts: TextBatch,
    config: VideoRetrievalConfig | None = None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """(num_texts, num_videos) match probabilities; each video is (C, T, 3, S, S) preprocessed clips.

    ``videos`` may be a generator, so that only one video's pixels are in memory at a time.
    """
    config = config or VideoRetrievalConfig()
    if model.config.head.num_outputs not in (1, 2):
        raise EvalError(
            f"retrieval needs a matching head (1 or 2 outputs); this model's head has {model.config.head.num_outputs}"
        )
    model.eval()
    columns = []
    for index, pixels in enumerate(videos):
        tokens = video_tokens(model, pixels, config.frame_batch_size, config.bf16)
        clip_logits = clip_logits_for_texts(
            model, tokens, texts, config.pair_batch_size, config.bf16
        )  # (C, M, K)
        columns.append(match_scores(aggregate_clip_logits(clip_logits, config.aggregation)).cpu())
        if progress is not None:
            progress(index + 1)
    if not columns:
        raise EvalError("no videos to score")
    return torch.stack(columns, dim=1)  # (M, N)


def rank_score_matrix(scores: torch.Tensor, positives: torch.Tensor, top_k: int = 10) -> Ranking:
    """Rank the columns of ``scores`` (Q, G) for each row; ``positives`` (Q, P) padded with -1.

    Ties follow ``polyclip.eval.retrieval.rank_gallery``: the rank of the best positive is the number of
    items scoring higher plus the tied items with a lower index.
    """
    scores = torch.as_tensor(scores, dtype=torch.float32)
    if scores.ndim != 2 or 0 in scores.shape:
        raise EvalError(f"a score matrix must be a non-empty (Q, G) tensor, got shape {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise EvalError("the score matrix holds NaN or infinite values")
    positives = torch.as_tensor(positives, dtype=torch.int64)
    valid = positives >= 0
    if positives.shape[0] != scores.shape[0] or not valid.any(dim=1).all():
        raise EvalError("every query needs at least one positive")
    if (positives >= scores.shape[1]).any():
        raise EvalError(f"positives hold indices outside [0, {scores.shape[1]})")
    positive_scores = torch.where(valid, scores.gather(1, positives.clamp(min=0)), -torch.inf)  # (Q, P)
    best = positive_scores.max(dim=1).values  # (Q,)
    best_index = (
        torch.where(valid & (positive_scores == best[:, None]), positives, scores.shape[1]).min(dim=1).values
    )
    columns = torch.arange(scores.shape[1])
    above = (scores > best[:, None]).sum(dim=1)
    tied_before = ((scores == best[:, None]) & (columns[None, :] < best_index[:, None])).sum(dim=1)
    order = torch.sort(scores, dim=1, descending=True, stable=True)
    k = min(top_k, scores.shape[1])
    return Ranking(
        first_positive_rank=above + tied_before,
        top_indices=order.indices[:, :k],
        top_scores=order.values[:, :k],
    )


@dataclass
class VideoRetrievalMetrics:
    text_to_video: DirectionMetrics
    video_to_text: DirectionMetrics

    def summary(self) -> dict[str, float]:
        return {**self.text_to_video.summary("t2v"), **self.video_to_text.summary("v2t")}


def retrieval_metrics(
    scores: torch.Tensor, text_to_video: Iterable[int] | torch.Tensor, recall_ks: tuple[int, ...] = (1, 5, 10)
) -> VideoRetrievalMetrics:
    """R@K, median and mean rank in both directions from a (num_texts, num_videos) score matrix.

    ``text_to_video`` gives each text's video index. Video -> text counts a hit when any of the video's
    texts is retrieved (MSRVTT 1k-A has one text per video, so this equals the reference there).
    """
    scores = torch.as_tensor(scores, dtype=torch.float32)
    text_to_video = torch.as_tensor(np.asarray(list(text_to_video)), dtype=torch.int64)
    if scores.ndim != 2 or text_to_video.shape != (scores.shape[0],):
        raise EvalError(
            f"{tuple(text_to_video.shape)} ground-truth indices for a score matrix of shape {tuple(scores.shape)}"
        )
    if (text_to_video < 0).any() or (text_to_video >= scores.shape[1]).any():
        raise EvalError(f"ground-truth video indices fall outside [0, {scores.shape[1]})")
    config = RetrievalConfig(recall_ks=recall_ks, precision_ks=())
    top_k = max(recall_ks)
    text_positives = text_to_video[:, None]  # (M, 1)
    t2v = rank_score_matrix(scores, text_positives, top_k)
    # video -> text over the videos that have texts (distractor videos have nothing to retrieve)
    queried = torch.unique(text_to_video)  # (N', ) sorted
    row_of_video = torch.full((scores.shape[1],), -1, dtype=torch.int64)
    row_of_video[queried] = torch.arange(queried.numel())
    video_positives = positives_by_image(row_of_video[text_to_video], queried.numel())  # (N', P)
    v2t = rank_score_matrix(scores.T[queried], video_positives, top_k)
    return VideoRetrievalMetrics(
        text_to_video=direction_metrics(t2v, text_positives, config),
        video_to_text=direction_metrics(v2t, video_positives, config),
    )
