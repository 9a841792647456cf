"""Few-shot classification without training.

- Nearest centroid after centring and L2 normalisation, BioCLIP's few-shot protocol (BioCLIP,
  CVPR 2024; Imageomics/bioclip ``src/evaluation/few_shot.py``, after SimpleShot): features are
  L2-normalised, the support set's mean is subtracted from support and query features, both are
  normalised again, class centroids are the means of the support features, and a query takes the
  class of the nearest centroid (Euclidean).
- A training-free cache adapter in the style of Tip-Adapter (ECCV 2022; gaopengcuhk/Tip-Adapter):
  the normalised support features are keys, their one-hot labels values;
  ``logits = scale * x W^T + alpha * exp(-beta * (1 - x K^T)) V``. It mixes few-shot similarity
  into zero-shot logits, which helps fine-grained classes that prompts alone separate poorly.
  alpha and beta can be searched on a validation set over Tip-Adapter's ranges
  (beta in [0.1, 7), alpha in [0.1, 3)).

  ``scale`` is the model's own learned ``exp(logit_scale)``, as the zero-shot logits the model
  itself produces. Tip-Adapter writes ``100`` because that is CLIP's learned scale; a model with
  another scale (10.8 for the ``polyclip demo`` model) under a fixed 100 had its zero-shot logits
  swamp the cache term (alpha <= 3, cache values <= k), which left the adapter inert below 16 shots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from polyclip.eval.errors import EvalError
from polyclip.eval.metrics import to_numpy


def sample_k_shot(labels, k: int, seed: int, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(support, query) indices: ``k`` random samples of every class as support, the rest as queries."""
    labels = to_numpy(labels).astype(np.int64)
    if k < 1:
        raise EvalError(f"k-shot needs k >= 1, got {k}")
    num_classes = num_classes if num_classes is not None else int(labels.max()) + 1
    rng = np.random.default_rng(seed)
    support, query, short = [], [], []
    for label in range(num_classes):
        members = rng.permutation(np.flatnonzero(labels == label))
        if members.size < k:
            short.append(f"{label} ({members.size})")
            continue
        support.append(members[:k])
        query.append(members[k:])
    if short:
        raise EvalError(f"{k}-shot sampling: classes with fewer than {k} samples: {', '.join(short)}")
    return np.sort(np.concatenate(support)), np.sort(np.concatenate(query))


def _labels_tensor(labels, num_classes: int) -> torch.Tensor:
    labels = torch.as_tensor(to_numpy(labels).astype(np.int64))
    if labels.numel() == 0 or labels.min() < 0 or labels.max() >= num_classes:
        raise EvalError(f"support labels must be non-empty and lie in [0, {num_classes})")
    return labels


def nearest_centroid_scores(
    support_features, support_labels, query_features, num_classes: int
) -> torch.Tensor:
    """(Q, C) negative Euclidean distances to the centred, normalised class centroids.

    Classes without support samples score -inf.
    """
    support = F.normalize(torch.as_tensor(support_features).float(), dim=-1)  # (S, E)
    query = F.normalize(torch.as_tensor(query_features).float(), dim=-1)  # (Q, E)
    labels = _labels_tensor(support_labels, num_classes)
    if support.shape[0] != labels.shape[0]:
        raise EvalError("support features and labels differ in length")
    mean = support.mean(dim=0, keepdim=True)  # (1, E), from the support set only
    support = F.normalize(support - mean, dim=-1)
    query = F.normalize(query - mean, dim=-1)
    sums = torch.zeros(num_classes, support.shape[1]).index_add_(0, labels, support)  # (C, E)
    counts = torch.bincount(labels, minlength=num_classes).float()  # (C,)
    centroids = sums / counts.clamp(min=1)[:, None]
    scores = -torch.cdist(query, centroids)  # (Q, C)
    scores[:, counts == 0] = -torch.inf
    return scores


@dataclass
class TipAdapterConfig:
    alpha: float = 1.0  # weight of the cache logits (Tip-Adapter's initial value for most datasets)
    beta: float = 1.0  # sharpness of the affinity exp(-beta (1 - cos))
    # the zero-shot logits' scale; None: the model's own exp(logit_scale) (100 for OpenAI's CLIP, as
    # Tip-Adapter writes it)
    zero_shot_scale: float | None = None
    beta_grid: tuple[float, ...] = tuple(float(b) for b in np.linspace(0.1, 7.0, 70, endpoint=False))
    alpha_grid: tuple[float, ...] = tuple(float(a) for a in np.linspace(0.1, 3.0, 20, endpoint=False))


def model_logit_scale(model) -> float:
    """The scale a dual encoder applies to its cosine similarities: ``exp(logit_scale)``."""
    return float(model.logit_scale.detach().float().exp())


def tip_adapter_logits(
    query_features,
    support_features,
    support_labels,
    class_weights: torch.Tensor,
    alpha: float,
    beta: float,
    zero_shot_scale: float = 100.0,
) -> torch.Tensor:
    """(Q, C) zero-shot logits plus ``alpha`` times the cache-model logits."""
    query = F.normalize(torch.as_tensor(query_features).float(), dim=-1)  # (Q, E)
    keys = F.normalize(torch.as_tensor(support_features).float(), dim=-1)  # (S, E)
    num_classes = class_weights.shape[0]
    values = F.one_hot(_labels_tensor(support_labels, num_classes), num_classes).float()  # (S, C)
    if keys.shape[0] != values.shape[0]:
        raise EvalError("support features and labels differ in length")
    zero_shot = zero_shot_scale * query @ class_weights.float().T  # (Q, C)
    affinity = query @ keys.T  # (Q, S) cosine
    cache = torch.exp(-beta * (1.0 - affinity)) @ values  # (Q, C)
    return zero_shot + alpha * cache


def search_tip_adapter(
    val_features,
    val_labels,
    support_features,
    support_labels,
    class_weights: torch.Tensor,
    config: TipAdapterConfig,
    zero_shot_scale: float = 100.0,
) -> tuple[float, float, float]:
    """(alpha, beta, validation accuracy) maximising validation accuracy over the config's grids.

    ``zero_shot_scale`` is used when ``config.zero_shot_scale`` is None (the model's own scale).
    """
    query = F.normalize(torch.as_tensor(val_features).float(), dim=-1)
    keys = F.normalize(torch.as_tensor(support_features).float(), dim=-1)
    num_classes = class_weights.shape[0]
    values = F.one_hot(_labels_tensor(support_labels, num_classes), num_classes).float()
    labels = torch.as_tensor(to_numpy(val_labels).astype(np.int64))
    scale = config.zero_shot_scale if config.zero_shot_scale is not None else zero_shot_scale
    zero_shot = scale * query @ class_weights.float().T
    affinity = query @ keys.T
    best = (config.alpha, config.beta, -1.0)
    for beta in config.beta_grid:
        cache = torch.exp(-beta * (1.0 - affinity)) @ values  # (Q, C), shared by every alpha
        for alpha in config.alpha_grid:
            accuracy = float(((zero_shot + alpha * cache).argmax(dim=1) == labels).float().mean())
            if accuracy > best[2]:
                best = (alpha, beta, accuracy)
    return best
