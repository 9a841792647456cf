"""Zero-shot classification from class names and prompt templates (Radford et al. 2021, section 3.1.4).

Each class's weight is the mean of its L2-normalised prompt embeddings, renormalised (template
ensembling). Probabilities are a softmax over classes for CLIP-style models and an independent
sigmoid per class for SigLIP-style models (which learn a logit bias).
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F


@lru_cache(maxsize=1)
def template_sets() -> dict[str, list[str]]:
    data = json.loads(resources.files("polyclip").joinpath("data/templates.json").read_text())
    return {name: templates for name, templates in data.items() if not name.startswith("_")}


class TemplateError(ValueError):
    """Prompt templates that cannot be used: an unknown set, a bad file, a template without ``{}``."""


_PLACEHOLDER = "{}"


def validate_templates(templates: Sequence[str], origin: str = "templates") -> list[str]:
    """Templates with ``{c}`` rewritten to ``{}``; an error names any template without exactly one placeholder."""
    templates = list(templates)
    if not templates:
        raise TemplateError(f"{origin}: no templates given")
    checked = []
    for number, template in enumerate(templates, 1):
        if not isinstance(template, str):
            raise TemplateError(f"{origin}: template {number} is not a string: {template!r}")
        template = template.replace("{c}", _PLACEHOLDER)
        if template.count(_PLACEHOLDER) != 1 or template.replace(_PLACEHOLDER, "").count("{") > 0:
            raise TemplateError(
                f"{origin}: template {number} {template!r} must hold exactly one '{{}}' for the class name"
            )
        checked.append(template)
    return checked


def read_template_file(path: str | os.PathLike) -> list[str]:
    """A user's template set: plain text (one per line, ``#`` comments), JSON (a list, or
    ``{"templates": [...]}``) or TOML (``templates = [...]``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise TemplateError(f"cannot read template file {path}: {error}") from error
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(text)
            return data["templates"] if isinstance(data, dict) else data
        if suffix == ".toml":
            return tomllib.loads(text)["templates"]
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError) as error:
        raise TemplateError(
            f"template file {path} is malformed ({error}); expected a list of templates"
        ) from error
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def resolve_templates(templates: str | os.PathLike | Sequence[str] | None) -> list[str]:
    """The one resolver of prompt templates, for the API, ``classify --template`` and ``eval --templates``.

    - ``None``: CLIP's single default prompt;
    - a built-in set name (``"openai_imagenet"``, ``"clip-rsicd"`` ... see `template_sets`);
    - one literal template holding ``{}`` (or ``{c}``), e.g. ``"a photo of a {}."``;
    - a file of templates (a path, or a string naming an existing file; see `read_template_file`);
    - a list of literal templates (never read as names or files: what a request to a server sends).
    """
    if templates is None:
        return ["a photo of a {}."]
    if isinstance(templates, os.PathLike):
        return validate_templates(read_template_file(templates), origin=str(templates))
    if isinstance(templates, str):
        sets = template_sets()
        if templates in sets:
            return validate_templates(sets[templates], origin=f"template set {templates!r}")
        if _PLACEHOLDER in templates or "{c}" in templates:
            return validate_templates([templates])
        if Path(templates).is_file():
            return validate_templates(read_template_file(templates), origin=templates)
        raise TemplateError(
            f"unknown template set {templates!r}: not a file, not a template with '{{}}' and not one of "
            f"{', '.join(sorted(sets))}"
        )
    return validate_templates(templates)


@torch.inference_mode()
def encode_texts(
    model,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 256,
    normalize: bool = True,
    progress: bool = False,
):
    """Text embeddings (N, E) in input order, batching similar lengths together.

    Sorting by token count means each batch of a causal tower stops at its own longest prompt.
    ``progress``: a bar on a terminal (`polyclip.progress`).
    """
    from polyclip.progress import progress_bar

    tokens = tokenizer(list(texts))  # (N, L)
    if len(tokens) == 0:
        return torch.zeros(0, model.config.embed_dim)
    lengths = (tokens != getattr(tokenizer, "pad_token_id", 0)).sum(dim=1)
    order = torch.argsort(lengths, descending=True, stable=True)
    out = torch.empty(len(texts), model.config.embed_dim)
    starts = range(0, len(order), batch_size)
    for start in progress_bar(starts, desc="encoding texts", unit="batch", enabled=progress):
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
