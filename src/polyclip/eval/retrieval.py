"""Image-text retrieval metrics computed in chunks, never holding the full similarity matrix.

Protocol: the CLIP paper (Learning Transferable Visual Models From Natural Language Supervision)
and the benchmarks it follows (Flickr30k 1k and COCO 5k test splits; reference implementation:
LAION-AI/CLIP_benchmark ``zeroshot_retrieval``): cosine similarity between L2-normalised embeddings;
image -> text counts a hit when *any* of the image's captions is retrieved, text -> image when the
caption's own image is; R@K, median and mean rank (ClipBERT reports MedR); precision@K (PLIP) is
the share of the first K results that are positives.

Ranks are exact and deterministic. The rank of a query's first positive is

    rank = #{j : s_j > s*} + #{j < g* : s_j == s*}

where s* is the best positive score and g* the lowest index among positives scoring s*: the
position of the first positive in a stable descending sort of the scores (0-based). The positive
scores are read from the same block products that the counting pass uses, so a positive is never
compared against a re-computed, rounding-different copy of itself.

Memory: one (query_chunk, gallery_chunk) block of scores plus boolean masks of that size, and at
most ``cached_blocks`` extra blocks holding positives; nothing of size (Q, G).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from polyclip.eval.errors import EvalError

_NO_POSITIVE = -1
_INDEX_SENTINEL = torch.iinfo(torch.int64).max


@dataclass
class RetrievalConfig:
    recall_ks: tuple[int, ...] = (1, 5, 10)
    precision_ks: tuple[int, ...] = (10,)  # PLIP reports precision@10 and @50
    query_chunk: int = 1024  # queries per block
    gallery_chunk: int = (
        16384  # gallery items per block; block memory = 4 * query_chunk * gallery_chunk bytes
    )
    cached_blocks: int = 2  # blocks holding positives kept between the two uses, beyond that recomputed
    device: str | None = None  # where the blocks are computed; None = where the embeddings are


@dataclass
class Ranking:
    """The result of ranking a gallery for every query."""

    first_positive_rank: torch.Tensor  # (Q,) int64, 0-based position of the best-ranked positive
    top_indices: torch.Tensor  # (Q, K) int64 gallery indices, best first; ties at place K broken arbitrarily
    top_scores: torch.Tensor  # (Q, K) float32
    gallery_size: int = 0


@dataclass
class DirectionMetrics:
    recall_at: dict[int, float]
    precision_at: dict[int, float]
    median_rank: float  # 1-based
    mean_rank: float  # 1-based
    ranks: np.ndarray = field(repr=False)  # (Q,) 1-based rank of the first positive

    def summary(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}_R@{k}": v for k, v in self.recall_at.items()}
        out.update({f"{prefix}_P@{k}": v for k, v in self.precision_at.items()})
        out[f"{prefix}_median_rank"] = self.median_rank
        out[f"{prefix}_mean_rank"] = self.mean_rank
        return out


@dataclass
class RetrievalResult:
    image_to_text: DirectionMetrics
    text_to_image: DirectionMetrics

    def summary(self) -> dict[str, float]:
        return {**self.image_to_text.summary("i2t"), **self.text_to_image.summary("t2i")}


def _check_embeddings(embeddings: torch.Tensor, name: str) -> None:
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise EvalError(f"{name} must be a non-empty (N, D) tensor, got shape {tuple(embeddings.shape)}")
    if not torch.isfinite(embeddings).all():
        raise EvalError(f"{name} holds NaN or infinite values; ranks would be meaningless")


def rank_gallery(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    positives: torch.Tensor,
    top_k: int = 10,
    config: RetrievalConfig | None = None,
) -> Ranking:
    """Rank ``gallery`` (G, D) for each of ``queries`` (Q, D) by dot product, block by block.

    ``positives`` (Q, P) int64 holds each query's positive gallery indices, padded with -1; every
    query needs at least one. Embeddings are used as given (normalise them first for cosine).
    """
    config = config or RetrievalConfig()
    _check_embeddings(queries, "queries")
    _check_embeddings(gallery, "gallery")
    if queries.shape[1] != gallery.shape[1]:
        raise EvalError(f"queries have dimension {queries.shape[1]}, gallery {gallery.shape[1]}")
    num_queries, num_gallery = queries.shape[0], gallery.shape[0]
    positives = torch.as_tensor(positives, dtype=torch.int64)
    if positives.ndim != 2 or positives.shape[0] != num_queries:
        raise EvalError(f"positives must be (Q={num_queries}, P), got {tuple(positives.shape)}")
    valid = positives != _NO_POSITIVE
    if not valid.any(dim=1).all():
        missing = int((~valid.any(dim=1)).nonzero()[0])
        raise EvalError(f"query {missing} has no positive in the gallery; every query needs one")
    if ((positives < _NO_POSITIVE) | (positives >= num_gallery)).any():
        raise EvalError(f"positives hold indices outside the gallery [0, {num_gallery})")
    if config.query_chunk < 1 or config.gallery_chunk < 1:
        raise EvalError("query_chunk and gallery_chunk must be positive")

    device = torch.device(config.device) if config.device else gallery.device
    gallery = gallery.to(device)
    top_k = min(top_k, num_gallery)
    chunk = config.gallery_chunk
    num_chunks = (num_gallery + chunk - 1) // chunk
    ranks = torch.empty(num_queries, dtype=torch.int64)
    top_indices = torch.empty(num_queries, top_k, dtype=torch.int64)
    top_scores = torch.empty(num_queries, top_k, dtype=torch.float32)

    with torch.no_grad():
        for q0 in range(0, num_queries, config.query_chunk):
            q1 = min(q0 + config.query_chunk, num_queries)
            block_queries = queries[q0:q1].to(device)
            block_positives = positives[q0:q1].to(device)  # (Qb, P)
            block_valid = block_positives != _NO_POSITIVE

            def scores_for(c: int, block_queries=block_queries) -> torch.Tensor:
                return block_queries @ gallery[c * chunk : (c + 1) * chunk].T  # (Qb, Cc)

            # Pass 1: the positives' scores, read from the blocks the counting pass will use.
            positive_scores = torch.full(block_positives.shape, -torch.inf, device=device)  # (Qb, P)
            positive_chunks = torch.unique(block_positives[block_valid] // chunk).tolist()
            cached: dict[int, torch.Tensor] = {}
            for c in positive_chunks:
                scores = scores_for(c)
                in_chunk = block_valid & (block_positives // chunk == c)
                rows, cols = in_chunk.nonzero(as_tuple=True)
                positive_scores[rows, cols] = scores[rows, block_positives[rows, cols] - c * chunk]
                if len(cached) < config.cached_blocks:
                    cached[c] = scores
                del scores  # so that the next block is not allocated while this one is alive
            best_score = positive_scores.max(dim=1).values  # (Qb,)
            is_best = block_valid & (positive_scores == best_score[:, None])
            best_index = torch.where(is_best, block_positives, _INDEX_SENTINEL).min(dim=1).values  # (Qb,)

            # Pass 2: count what ranks above the best positive, and keep a running top-k.
            block_ranks = torch.zeros(q1 - q0, dtype=torch.int64, device=device)
            running_scores = torch.empty(q1 - q0, 0, device=device)
            running_indices = torch.empty(q1 - q0, 0, dtype=torch.int64, device=device)
            first_best, last_best = int(best_index.min()), int(best_index.max())
            for c in range(num_chunks):
                scores = cached.pop(c) if c in cached else scores_for(c)
                start, end = c * chunk, c * chunk + scores.shape[1]
                threshold = best_score[:, None]  # (Qb, 1)
                if end <= first_best:  # the whole chunk precedes every best positive: its ties rank above
                    block_ranks += (scores >= threshold).sum(dim=1)
                elif start > last_best:  # the whole chunk follows: its ties rank below
                    block_ranks += (scores > threshold).sum(dim=1)
                else:
                    gallery_index = torch.arange(start, end, device=device)
                    tied_before = (scores == threshold) & (gallery_index[None, :] < best_index[:, None])
                    block_ranks += (scores > threshold).sum(dim=1) + tied_before.sum(dim=1)
                values, indices = scores.topk(min(top_k, scores.shape[1]), dim=1)
                running_scores, running_indices = _merge_top_k(
                    running_scores, running_indices, values, indices + start, top_k
                )
                del scores
            ranks[q0:q1] = block_ranks.cpu()
            top_indices[q0:q1] = running_indices.cpu()
            top_scores[q0:q1] = running_scores.float().cpu()
    return Ranking(
        first_positive_rank=ranks, top_indices=top_indices, top_scores=top_scores, gallery_size=num_gallery
    )


def _merge_top_k(
    scores_a: torch.Tensor, indices_a: torch.Tensor, scores_b: torch.Tensor, indices_b: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best k of two candidate lists, ordered by score (descending) then gallery index (ascending)."""
    scores = torch.cat([scores_a, scores_b], dim=1)
    indices = torch.cat([indices_a, indices_b], dim=1)
    by_index = indices.argsort(dim=1, stable=True)
    scores, indices = scores.gather(1, by_index), indices.gather(1, by_index)
    by_score = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, by_score), indices.gather(1, by_score)


def positives_by_image(text_to_image: torch.Tensor, num_images: int) -> torch.Tensor:
    """(num_images, P) caption indices of each image, padded with -1 (P = most captions per image)."""
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.int64)
    if text_to_image.numel() and (text_to_image.min() < 0 or text_to_image.max() >= num_images):
        raise EvalError(f"caption image indices fall outside [0, {num_images})")
    counts = torch.bincount(text_to_image, minlength=num_images)
    if (counts == 0).any():
        image = int((counts == 0).nonzero()[0])
        raise EvalError(f"image {image} has no caption; every image needs at least one for retrieval")
    order = torch.argsort(text_to_image, stable=True)  # captions grouped by image, in file order
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(order.numel()) - starts[text_to_image[order]]
    out = torch.full((num_images, int(counts.max())), _NO_POSITIVE, dtype=torch.int64)
    out[text_to_image[order], slot] = order
    return out


def direction_metrics(ranking: Ranking, positives: torch.Tensor, config: RetrievalConfig) -> DirectionMetrics:
    """R@K, P@K, median and mean rank from a ranking and the positives it was computed for."""
    ranks = ranking.first_positive_rank.numpy() + 1  # 1-based
    recall_at = {k: float((ranks <= k).mean()) for k in config.recall_ks}
    precision_at = {}
    for k in config.precision_ks:
        if ranking.top_indices.shape[1] < min(k, ranking.gallery_size):
            raise EvalError(f"precision@{k} needs the top {k} results; ask rank_gallery for top_k >= {k}")
        top = ranking.top_indices[:, :k]  # (Q, min(k, G)); a gallery smaller than k still divides by k
        hits = (top[:, :, None] == positives[:, None, :]).any(dim=2)  # (Q, k); -1 padding never matches
        precision_at[k] = float(hits.float().sum(dim=1).div(k).mean())
    return DirectionMetrics(
        recall_at=recall_at,
        precision_at=precision_at,
        median_rank=float(np.median(ranks)),
        mean_rank=float(ranks.mean()),
        ranks=ranks,
    )


def evaluate_retrieval(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_to_image,
    config: RetrievalConfig | None = None,
) -> RetrievalResult:
    """Both retrieval directions for images (N_img, D) and captions (N_txt, D).

    ``text_to_image`` (N_txt,) gives each caption's image index; an image may have several captions.
    Embeddings are L2-normalised here, so scores are cosine similarities.
    """
    config = config or RetrievalConfig()
    _check_embeddings(image_embeds, "image embeddings")
    _check_embeddings(text_embeds, "text embeddings")
    text_to_image = torch.as_tensor(np.asarray(text_to_image), dtype=torch.int64)
    if text_to_image.shape != (text_embeds.shape[0],):
        raise EvalError(
            f"{text_embeds.shape[0]} text embeddings but {tuple(text_to_image.shape)} caption image indices"
        )
    images = F.normalize(image_embeds.float(), dim=-1)
    texts = F.normalize(text_embeds.float(), dim=-1)
    top_k = max([*config.recall_ks, *config.precision_ks, 1])

    image_positives = positives_by_image(text_to_image, images.shape[0])  # (N_img, P)
    i2t = rank_gallery(images, texts, image_positives, top_k, config)
    text_positives = text_to_image[:, None]  # (N_txt, 1)
    t2i = rank_gallery(texts, images, text_positives, top_k, config)
    return RetrievalResult(
        image_to_text=direction_metrics(i2t, image_positives, config),
        text_to_image=direction_metrics(t2i, text_positives, config),
    )
