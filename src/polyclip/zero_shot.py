"""Zero-shot classification from class names and prompt templates (Radford et al. 2021, section 3.1.4).

Each class's weight is the mean of its L2-normalised prompt embeddings, renormalised (template
ensembling). Probabilities are a softmax over classes for CLIP-style models and an independent
sigmoid per class for SigLIP-style models (which learn a logit bias).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources

import torch
import torch.nn.functional as F


@lru_cache(maxsize=1)
def template_sets() -> dict[str, list[str]]:
    data = json.loads(resources.files("polyclip").joinpath("data/templates.json").read_text())
    return {name: templates for name, templates in data.items() if not name.startswith("_")}


def resolve_templates(templates: str | Sequence[str] | None) -> list[str]:
    """A template set by name (``"openai_imagenet"``, ``"clip-rsicd"`` ...) or a list of templates."""
    if templates is None:
        return ["a photo of a {}."]
    if isinstance(templates, str):
        sets = template_sets()
        if templates in sets:
            return list(sets[templates])
        if "{}" in templates:
            return [templates]
        raise ValueError(f"unknown template set {templates!r}; known: {', '.join(sorted(sets))}")
    templates = list(templates)
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(
            f"every template needs a '{{}}' placeholder for the class name; got {bad or templates}"
        )
    return templates


@torch.inference_mode()
def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 256, normalize: bool = True):
    """Text embeddings (N, E) in input order, batching similar lengths together.

    Sorting by token count means each batch of a causal tower stops at its own longest prompt.
    """
    tokens = tokenizer(list(texts))  # (N, L)
    if len(tokens) == 0:
        return torch.zeros(0, model.config.embed_dim)
    lengths = (tokens != getattr(tokenizer, "pad_token_id", 0)).sum(dim=1)
    order = torch.argsort(lengths, descending=True, stable=True)
    out = torch.empty(len(texts), model.config.embed_dim)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        out[index] = model.encode_text(tokens[index], normalize=normalize).float().cpu()
    return out


def class_embeddings(model, tokenizer, class_names: Sequence[str], templates=None, batch_size: int = 256):
    """(C, E) classifier weights: per class, the renormalised mean of its normalised prompt embeddings."""
    templates = resolve_templates(templates)
    if not class_names:
        raise ValueError("zero-shot classification needs at least one class name")
    prompts = [template.format(name) for name in class_names for template in templates]
    embeddings = encode_texts(model, tokenizer, prompts, batch_size)  # (C*T, E)
    embeddings = embeddings.view(len(class_names), len(templates), -1).mean(dim=1)
    return F.normalize(embeddings, dim=-1)


class ZeroShotClassifier:
    """``predict(images)`` -> (B, C) probabilities; images as a (B, 3, H, W) tensor, or PIL images/paths
    when built with ``preprocess``."""

    def __init__(
        self,
        model,
        tokenizer,
        class_names: Sequence[str],
        templates=None,
        preprocess=None,
        batch_size: int = 256,
    ):
        self.model = model
        self.preprocess = preprocess
        self.class_names = list(class_names)
        self.templates = resolve_templates(templates)
        self.weights = class_embeddings(
            model, tokenizer, self.class_names, self.templates, batch_size
        )  # (C, E)
        self.sigmoid = model.logit_bias is not None

    def _pixels(self, images) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            # a batch of images (B, 3, H, W), or of NaFlex packed patches (B, N + 1, P*P*3)
            batch_rank = 3 if self.model.config.vision.kind == "naflex" else 4
            return images if images.dim() == batch_rank else images.unsqueeze(0)
        if self.preprocess is None:
            raise ValueError(
                "pass a (B, 3, H, W) tensor, or build the classifier with preprocess= for images"
            )
        return torch.stack([self.preprocess(image) for image in images])

    @torch.inference_mode()
    def logits(self, images) -> torch.Tensor:
        features = self.model.encode_image(self._pixels(images), normalize=True).float().cpu()
        return self._logits(features)

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        scale = (
            self.model.logit_scale.detach().float().cpu().clamp(max=self.model.config.logit_scale_max).exp()
        )
        logits = scale * features @ self.weights.T  # (B, C)
        if self.sigmoid:
            logits = logits + self.model.logit_bias.detach().float().cpu()
        return logits

    def predict(self, images) -> torch.Tensor:
        logits = self.logits(images)
        return torch.sigmoid(logits) if self.sigmoid else logits.softmax(dim=-1)

    def top_k(self, images, k: int = 5) -> list[list[tuple[str, float]]]:
        probs = self.predict(images)
        values, index = probs.topk(min(k, len(self.class_names)), dim=-1)
        return [
            [(self.class_names[i], float(v)) for v, i in zip(row_v, row_i)]
            for row_v, row_i in zip(values, index)
        ]


def zero_shot_classifier(
    model, tokenizer, class_names: Sequence[str], templates=None, preprocess=None, batch_size: int = 256
) -> ZeroShotClassifier:
    return ZeroShotClassifier(model, tokenizer, class_names, templates, preprocess, batch_size)
