"""Few-shot: BioCLIP's centred nearest centroid and the cache adapter, against hand computations."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from polyclip.eval import runner
from polyclip.eval.data import read_image_folder
from polyclip.eval.errors import EvalError
from polyclip.eval.features import EncodeConfig
from polyclip.eval.few_shot import (
    TipAdapterConfig,
    nearest_centroid_scores,
    sample_k_shot,
    search_tip_adapter,
    tip_adapter_logits,
)
from test_eval_support import COLOURS, colour_folder, fake_triple, save_square


def bioclip_reference(support, support_labels, query, num_classes, k):
    """The published procedure in numpy: L2, centre on the support mean, L2, class means, nearest."""
    support = support / np.linalg.norm(support, axis=1, keepdims=True)
    query = query / np.linalg.norm(query, axis=1, keepdims=True)
    mean = support.mean(axis=0)
    support = support - mean
    support /= np.linalg.norm(support, axis=1, keepdims=True)
    query = query - mean
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    order = np.argsort(support_labels, kind="stable")
    centroids = support[order].reshape(num_classes, k, -1).mean(axis=1)
    distances = np.linalg.norm(centroids[:, None, :] - query[None], axis=-1)  # (C, Q)
    return distances.argmin(axis=0)


def test_nearest_centroid_matches_the_reference_procedure():
    rng = np.random.default_rng(0)
    num_classes, k = 5, 3
    features = rng.normal(size=(60, 12)) + np.repeat(rng.normal(size=(5, 12)) * 1.5, 12, axis=0)
    labels = np.repeat(np.arange(num_classes), 12)
    support, query = sample_k_shot(labels, k, seed=1)
    scores = nearest_centroid_scores(
        torch.tensor(features[support]), labels[support], torch.tensor(features[query]), num_classes
    )
    expected = bioclip_reference(features[support], labels[support], features[query], num_classes, k)
    np.testing.assert_array_equal(scores.argmax(dim=1).numpy(), expected)


def test_sample_k_shot():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    support, query = sample_k_shot(labels, 2, seed=0)
    assert np.bincount(labels[support]).tolist() == [2, 2, 2]
    assert sorted(np.concatenate([support, query]).tolist()) == list(range(9))
    assert sample_k_shot(labels, 2, seed=0)[0].tolist() == support.tolist()
    with pytest.raises(EvalError, match="fewer than 3 samples: 1 \\(2\\)"):
        sample_k_shot(labels, 3, seed=0)


def test_tip_adapter_formula():
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(7, 6, generator=generator)
    support = torch.randn(9, 6, generator=generator)
    support_labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    weights = F.normalize(torch.randn(3, 6, generator=generator), dim=-1)
    logits = tip_adapter_logits(query, support, support_labels, weights, alpha=2.0, beta=3.0)
    q, s = F.normalize(query, dim=-1), F.normalize(support, dim=-1)
    expected = 100 * q @ weights.T
    for c in range(3):
        expected[:, c] += 2.0 * torch.exp(-3.0 * (1 - q @ s[support_labels == c].T)).sum(dim=1)
    torch.testing.assert_close(logits, expected)
    zero_alpha = tip_adapter_logits(query, support, support_labels, weights, alpha=0.0, beta=3.0)
    torch.testing.assert_close(zero_alpha, 100 * q @ weights.T)


def test_tip_adapter_fixes_classes_the_prompts_confuse():
    # Zero-shot weights cannot tell class 0 from class 1; the support set can.
    generator = torch.Generator().manual_seed(0)
    directions = F.normalize(torch.randn(3, 16, generator=generator), dim=-1)
    weights = torch.stack([directions[0] + directions[1], directions[0] + directions[1], directions[2]])
    weights = F.normalize(weights, dim=-1)
    labels = torch.arange(3).repeat_interleave(20)
    features = directions[labels] + 0.1 * torch.randn(60, 16, generator=generator)
    support, query = sample_k_shot(labels, 4, seed=0)
    zero_shot_accuracy = float(((features[query] @ weights.T).argmax(1) == labels[query]).float().mean())
    alpha, beta, val_accuracy = search_tip_adapter(
        features[query], labels[query], features[support], labels[support], weights, TipAdapterConfig()
    )
    logits = tip_adapter_logits(features[query], features[support], labels[support], weights, alpha, beta)
    adapted_accuracy = float((logits.argmax(1) == labels[query]).float().mean())
    assert (
        zero_shot_accuracy < 0.75
        and adapted_accuracy == pytest.approx(val_accuracy)
        and adapted_accuracy > 0.95
    )


def test_few_shot_protocol_end_to_end(tmp_path):
    colours = ["red", "green", "blue", "yellow"]
    train = read_image_folder(colour_folder(tmp_path / "train", colours, per_class=4))
    run = runner.RunConfig(encode=EncodeConfig(batch_size=8, num_workers=0))
    config = runner.FewShotConfig(shots=(1, 2), folds=3)
    report = runner.run_few_shot([fake_triple()], train, config=config, run=run)
    metrics = report.results[0].metrics
    assert metrics["1shot_accuracy"] == 1.0 and metrics["2shot_accuracy_std"] == 0.0
    test = read_image_folder(colour_folder(tmp_path / "test", colours, per_class=2))
    save_square(tmp_path / "test" / "red" / "x.png", COLOURS["red"])
    tip = runner.FewShotConfig(method="tip_adapter", shots=(1,), folds=2, templates="simple")
    tip_report = runner.run_few_shot([fake_triple()], train, test, tip, run)
    assert tip_report.results[0].metrics["0shot_accuracy"] == 1.0
    assert tip_report.results[0].metrics["1shot_accuracy"] == 1.0
    with pytest.raises(EvalError, match="unknown few-shot method"):
        runner.run_few_shot([fake_triple()], train, config=runner.FewShotConfig(method="knn"), run=run)
    with pytest.raises(EvalError, match="no query samples"):
        runner.run_few_shot([fake_triple()], train, config=runner.FewShotConfig(shots=(4,)), run=run)


def test_tip_adapter_with_the_models_own_scale_is_not_inert():
    # Classes 0 and 1 share a prompt direction; class 0's prompt leans off it, so zero-shot calls every
    # class-0 image class 1 by a cosine margin of about 0.03: 3 logits at CLIP's 100, 0.3 at a scale of
    # 10, against a cache term of about 1 (alpha 1, one support sample at cosine ~1).
    generator = torch.Generator().manual_seed(1)
    directions = F.normalize(torch.randn(3, 16, generator=generator), dim=-1)
    shared = directions[0] + directions[1]
    weights = F.normalize(torch.stack([shared + 0.45 * directions[2], shared, directions[2]]), dim=-1)
    labels = torch.arange(3).repeat_interleave(10)
    features = directions[labels] + 0.02 * torch.randn(30, 16, generator=generator)
    support, query = sample_k_shot(labels, 1, seed=0)

    def accuracy(scale):
        logits = tip_adapter_logits(
            features[query], features[support], labels[support], weights, 1.0, 5.0, scale
        )
        return float((logits.argmax(1) == labels[query]).float().mean())

    zero_shot = float(((features[query] @ weights.T).argmax(1) == labels[query]).float().mean())
    assert zero_shot < 0.75
    assert accuracy(100.0) == pytest.approx(zero_shot)  # a fixed 100 swamps the cache term
    assert accuracy(10.0) == 1.0  # a demo-sized scale lets it work


def test_every_few_shot_report_holds_the_zero_shot_baseline_and_the_models_scale(tmp_path):
    colours = ["red", "green", "blue", "yellow"]
    train = read_image_folder(colour_folder(tmp_path / "train", colours, per_class=4))
    run = runner.RunConfig(encode=EncodeConfig(batch_size=8, num_workers=0))
    model, preprocess, tokenizer = fake_triple()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(12.5))
    centroid = runner.run_few_shot(
        [(model, preprocess, tokenizer)],
        train,
        None,
        runner.FewShotConfig(shots=(1,), folds=2, templates="simple"),
        run,
    )
    assert "0shot_accuracy" in centroid.results[0].metrics
    config = runner.FewShotConfig(method="tip_adapter", shots=(1,), folds=2, templates="simple")
    tip = runner.run_few_shot([(model, preprocess, tokenizer)], train, None, config, run).results[0].metrics
    assert tip["zero_shot_scale"] == pytest.approx(12.5) and tip["1shot_alpha"] == 1.0
    config.tip = TipAdapterConfig(zero_shot_scale=100.0)
    val = read_image_folder(colour_folder(tmp_path / "val", colours, per_class=2))
    searched = (
        runner.run_few_shot([(model, preprocess, tokenizer)], train, None, config, run, val)
        .results[0]
        .metrics
    )
    assert searched["zero_shot_scale"] == 100.0 and "1shot_beta" in searched
