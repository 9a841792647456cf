"""Chunked retrieval equals the full computation; known answers for R@K, ranks and P@K."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from polyclip.eval.errors import EvalError
from polyclip.eval.retrieval import (
    RetrievalConfig,
    evaluate_retrieval,
    positives_by_image,
    rank_gallery,
)


def full_ranking(queries, gallery, positives, k):
    """Reference: the whole score matrix, a stable descending sort, the first positive's position."""
    scores = queries @ gallery.T
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # ties: lower index first
    ranks = []
    for row in range(queries.shape[0]):
        wanted = positives[row][positives[row] >= 0]
        ranks.append(int(torch.isin(order[row], wanted).nonzero()[0, 0]))
    return torch.tensor(ranks), order[:, :k], torch.sort(scores, dim=1, descending=True).values[:, :k]


@pytest.mark.parametrize(
    ("query_chunk", "gallery_chunk", "cached"), [(7, 11, 0), (64, 1000, 2), (1, 3, 1), (50, 50, 5)]
)
def test_chunked_ranks_equal_full_computation_with_exact_ties(query_chunk, gallery_chunk, cached):
    generator = torch.Generator().manual_seed(0)
    queries = torch.randint(
        -1, 2, (60, 6), generator=generator
    ).float()  # integer dot products: many exact ties
    gallery = torch.randint(-1, 2, (90, 6), generator=generator).float()
    positives = torch.randint(0, 90, (60, 4), generator=generator)
    positives[::3, 2:] = -1
    config = RetrievalConfig(query_chunk=query_chunk, gallery_chunk=gallery_chunk, cached_blocks=cached)
    ranking = rank_gallery(queries, gallery, positives, 10, config)
    ranks, _, top_scores = full_ranking(queries, gallery, positives, 10)
    assert torch.equal(ranking.first_positive_rank, ranks)
    assert torch.equal(ranking.top_scores, top_scores)


def test_chunked_top_k_equals_full_computation_on_float_embeddings():
    generator = torch.Generator().manual_seed(1)
    queries = F.normalize(torch.randn(200, 32, generator=generator), dim=-1)
    gallery = F.normalize(torch.randn(700, 32, generator=generator), dim=-1)
    positives = torch.randint(0, 700, (200, 1), generator=generator)
    ranking = rank_gallery(
        queries, gallery, positives, 10, RetrievalConfig(query_chunk=64, gallery_chunk=128)
    )
    ranks, top_indices, _ = full_ranking(queries, gallery, positives, 10)
    assert torch.equal(ranking.first_positive_rank, ranks)
    assert torch.equal(ranking.top_indices, top_indices)


def test_known_answers_with_several_captions_per_image():
    # 3 images along the axes; 6 captions, two per image. Caption 5 of image 2 points at image 0.
    images = torch.eye(3)
    texts = torch.tensor([[1.0, 0, 0], [0.7, 0.7, 0], [0, 1.0, 0], [0.1, 0.9, 0], [0, 0, 1.0], [1.0, 0, 0.2]])
    text_to_image = [0, 0, 1, 1, 2, 2]
    result = evaluate_retrieval(
        images, texts, text_to_image, RetrievalConfig(recall_ks=(1, 2), precision_ks=(2,))
    )
    i2t, t2i = result.image_to_text, result.text_to_image
    assert i2t.recall_at == {1: 1.0, 2: 1.0}  # every image's best caption is its own
    # caption 1 ties between images 0 and 1 (the lower index wins); caption 5 finds image 0 first
    np.testing.assert_array_equal(t2i.ranks, [1, 1, 1, 1, 1, 2])
    assert t2i.recall_at[1] == pytest.approx(5 / 6)
    assert t2i.median_rank == 1.0 and t2i.mean_rank == pytest.approx(7 / 6)
    # image 0's top-2 are captions 0 and 5 (cos 0.98): one positive -> 0.5; images 1 and 2: both own -> 1
    assert i2t.precision_at[2] == pytest.approx((0.5 + 1.0 + 1.0) / 3)
    summary = result.summary()
    assert summary["i2t_R@1"] == 1.0 and summary["t2i_median_rank"] == 1.0


def test_image_to_text_rank_is_best_caption_rank():
    images = torch.tensor([[1.0, 0.0]])
    texts = torch.tensor([[0.0, 1.0], [1.0, 0.1], [1.0, 0.0], [-1.0, 0.0]])
    # only captions 0 and 3 belong to the image; caption 0 ranks third, caption 3 fourth
    ranking = rank_gallery(images, F.normalize(texts, dim=-1), torch.tensor([[0, 3]]), 4)
    assert int(ranking.first_positive_rank[0]) == 2


def test_positives_by_image_groups_captions():
    positives = positives_by_image(torch.tensor([1, 0, 1, 2, 1]), 3)
    assert positives.tolist() == [[1, -1, -1], [0, 2, 4], [3, -1, -1]]


@pytest.mark.parametrize(
    ("images", "texts", "mapping", "message"),
    [
        (torch.eye(3), torch.eye(3)[:2], [0, 1], "image 2 has no caption"),
        (torch.eye(2), torch.eye(2), [0, 5], "outside"),
        (torch.eye(2), torch.eye(2), [0], "caption image indices"),
        (torch.full((2, 2), float("nan")), torch.eye(2), [0, 1], "NaN"),
        (torch.eye(2), torch.ones(2, 3), [0, 1], "dimension"),
    ],
)
def test_bad_retrieval_inputs(images, texts, mapping, message):
    with pytest.raises(EvalError, match=message):
        evaluate_retrieval(images, texts, mapping)


def test_precision_needs_enough_top_k():
    from polyclip.eval.retrieval import direction_metrics

    ranking = rank_gallery(torch.eye(3), torch.eye(3), torch.arange(3)[:, None], top_k=2)
    with pytest.raises(EvalError, match="top_k"):
        direction_metrics(ranking, torch.arange(3)[:, None], RetrievalConfig(precision_ks=(5,)))


def test_precision_at_k_larger_than_the_gallery_divides_by_k():
    result = evaluate_retrieval(
        torch.eye(2), torch.eye(2), [0, 1], RetrievalConfig(recall_ks=(1, 5), precision_ks=(5,))
    )
    assert result.image_to_text.precision_at[5] == pytest.approx(1 / 5)
    assert result.text_to_image.recall_at[5] == 1.0
