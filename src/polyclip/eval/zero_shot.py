"""Zero-shot classification from class names and prompt templates.

Classifier weights follow the CLIP paper's prompt ensembling (section 3.1.4) as implemented in
openai/CLIP ``notebooks/Prompt_Engineering_for_ImageNet.ipynb``: every class name is put into every
template, the prompts are encoded, each embedding is L2-normalised, the class's embeddings are
averaged and the mean is normalised again. An image's class scores are cosine similarities with
these weights; ranking needs no logit scale, probabilities use the model's ``exp(logit_scale)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from polyclip.eval.errors import EvalError
from polyclip.eval.features import evaluation_mode
from polyclip.eval.templates import validate_templates
from polyclip.zero_shot import class_embeddings

_BLOCK_SCORES = 2**26  # default score-block size in elements (256 MiB of float32)


def build_zero_shot_weights(
    model, tokenizer, class_names: list[str], templates: list[str], batch_size: int = 256
) -> torch.Tensor:
    """(C, E) float32 L2-normalised class weights, the template-ensembled text embedding of each class.

    The arithmetic is the core's (``polyclip.zero_shot.class_embeddings``); this adds template
    validation (``{c}`` accepted, one placeholder required) and runs the model in eval mode.
    """
    if not class_names:
        raise EvalError("zero-shot classification needs at least one class name")
    templates = validate_templates(list(templates))
    with evaluation_mode(model):
        weights = class_embeddings(model, tokenizer, list(class_names), templates, batch_size)  # (C, E)
    return weights.float().clone()  # a normal tensor, usable outside inference mode


def class_scores(image_features: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """(N, C) cosine similarities; use for small C (the full matrix is returned)."""
    _check(image_features, class_weights)
    return F.normalize(image_features.float(), dim=-1) @ class_weights.float().T


def zero_shot_probabilities(
    image_features: torch.Tensor, class_weights: torch.Tensor, logit_scale: float = 100.0
) -> torch.Tensor:
    """(N, C) softmax over ``logit_scale * cos``; a sigmoid model's bias cancels in the softmax."""
    return (logit_scale * class_scores(image_features, class_weights)).softmax(dim=-1)


def top_k_classes(
    image_features: torch.Tensor,
    class_weights: torch.Tensor,
    k: int = 5,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``k`` classes per image, computed ``chunk_size`` images at a time.

    Returns (N, k) cosine scores and (N, k) class indices (best first). Memory is one
    (chunk_size, C) float32 score block; by default the chunk holds about 2**26 scores (256 MiB),
    so 10,000 classes over a million images stay bounded.
    """
    _check(image_features, class_weights)
    device = torch.device(device) if device is not None else class_weights.device
    weights_t = class_weights.to(device=device, dtype=torch.float32).T.contiguous()  # (E, C)
    num_classes = weights_t.shape[1]
    chunk_size = chunk_size or max(1, _BLOCK_SCORES // num_classes)
    k = min(k, num_classes)
    scores_out, indices_out = [], []
    with torch.no_grad():
        for start in range(0, image_features.shape[0], chunk_size):
            block = image_features[start : start + chunk_size].to(device=device, dtype=torch.float32)
            # Normalising the image rows does not change their ranking; it makes the scores cosines.
            scores = F.normalize(block, dim=-1) @ weights_t  # (chunk, C)
            values, indices = scores.topk(k, dim=1)
            del scores  # the next block is not allocated while this one is alive
            scores_out.append(values.cpu())
            indices_out.append(indices.cpu())
    return torch.cat(scores_out), torch.cat(indices_out)


def _check(image_features: torch.Tensor, class_weights: torch.Tensor) -> None:
    if image_features.ndim != 2 or class_weights.ndim != 2:
        raise EvalError("image features and class weights must both be 2-D (N, E) and (C, E)")
    if image_features.shape[1] != class_weights.shape[1]:
        raise EvalError(
            f"image features have dimension {image_features.shape[1]} but class weights {class_weights.shape[1]}"
            " (were they made by the same model?)"
        )
