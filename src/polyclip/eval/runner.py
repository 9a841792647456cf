"""The evaluation protocols end to end, over one or several models, returning an ``EvalReport``.

Models are names or paths loaded with ``polyclip.load``, or already-loaded
``(model, preprocess, tokenizer)`` triples (``EvalModel``). Each protocol encodes the data once
per model (through the feature cache when ``RunConfig.cache_dir`` is set), computes the metrics
of its module and reports one column per model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from polyclip.eval.bias import BiasTest, EmbeddingSet, weat
from polyclip.eval.cache import FeatureCache, ModelFeatures
from polyclip.eval.data import CaptionedImages, FileImages, LabeledImages
from polyclip.eval.errors import EvalError
from polyclip.eval.features import EncodeConfig, EncodedImages
from polyclip.eval.few_shot import (
    TipAdapterConfig,
    model_logit_scale,
    nearest_centroid_scores,
    sample_k_shot,
    search_tip_adapter,
    tip_adapter_logits,
)
from polyclip.eval.hierarchy import MODES, Hierarchy, accuracy_per_rank
from polyclip.eval.metrics import ClassificationMetrics, classification_metrics
from polyclip.eval.probe import ProbeConfig, linear_probe
from polyclip.eval.protocols import zero_shot_protocol
from polyclip.eval.report import EvalReport, ModelResult
from polyclip.eval.retrieval import RetrievalConfig, evaluate_retrieval
from polyclip.eval.templates import load_templates
from polyclip.eval.zero_shot import top_k_classes, zero_shot_probabilities
from polyclip.images import is_image_file


@dataclass
class EvalModel:
    name: str
    model: torch.nn.Module
    preprocess: object
    tokenizer: object


@dataclass
class RunConfig:
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    cache_dir: str | Path | None = None  # feature cache; None = encode every time
    content_fingerprint: bool = False  # key image files by their bytes rather than size + mtime


def resolve_models(specs: Sequence, device: str | None = None) -> list[EvalModel]:
    """``EvalModel``s from names/paths (``polyclip.load``), triples, ``(name, model, preprocess, tokenizer)``."""
    if not specs:
        raise EvalError("no models given")
    models, seen = [], {}
    for position, spec in enumerate(specs):
        if isinstance(spec, EvalModel):
            entry = spec
        elif isinstance(spec, str | Path):
            entry = EvalModel(str(spec), *_load(str(spec), device))
        elif isinstance(spec, tuple | list) and len(spec) == 3:
            entry = EvalModel(f"model{position}", *spec)
        elif isinstance(spec, tuple | list) and len(spec) == 4:
            entry = EvalModel(*spec)
        else:
            raise EvalError(
                f"model {position}: expected a name, a path or a (model, preprocess, tokenizer) triple"
            )
        seen[entry.name] = seen.get(entry.name, 0) + 1
        if seen[entry.name] > 1:  # the same model twice gets two distinct columns
            entry = EvalModel(
                f"{entry.name}#{seen[entry.name]}", entry.model, entry.preprocess, entry.tokenizer
            )
        models.append(entry)
    return models


def _load(name: str, device: str | None):
    import polyclip

    load = getattr(polyclip, "load", None)
    if load is None:
        raise EvalError("polyclip.load is not available in this installation; pass loaded models instead")
    return load(name, device=device)


def _features(models: Sequence, run: RunConfig) -> list[ModelFeatures]:
    cache = FeatureCache(run.cache_dir) if run.cache_dir is not None else None
    return [
        ModelFeatures(m.name, m.model, m.preprocess, m.tokenizer, run.encode, cache, run.content_fingerprint)
        for m in resolve_models(models, run.encode.device)
    ]


def _skipped_note(model: str, encoded: EncodedImages, what: str) -> list[str]:
    if not encoded.skipped:
        return []
    return [
        f"{model}: {len(encoded.skipped)} unreadable {what} image(s) skipped, e.g. {encoded.skipped[0][1]}"
    ]


def _prompt_names(class_names: list[str], underscores_to_spaces: bool) -> list[str]:
    return [name.replace("_", " ") if underscores_to_spaces else name for name in class_names]


def _classification_result(
    model: str, metrics: ClassificationMetrics, extra: dict | None = None
) -> ModelResult:
    details = metrics.to_dict()
    return ModelResult(
        model,
        {**metrics.summary(), **(extra or {})},
        {
            "per_class": details["per_class"],
            "confusion_matrix": details["confusion_matrix"],
            "class_names": metrics.class_names,
        },
    )


# ----------------------------------------------------------------------------- zero-shot


@dataclass
class ZeroShotConfig:
    templates: str | list[str] = "openai_imagenet"  # built-in set name, file, or list
    underscores_to_spaces: bool = True  # folder names like "golden_retriever" read as "golden retriever"
    top_ks: tuple[int, ...] = (1, 5)
    chunk_size: int | None = None  # images scored at once; None = blocks of about 2**26 scores
    strip_names: bool = False  # strip spaces around class names (pybioclip)
    normalize_text: bool = True  # False: one template, raw text embeddings as weights (FashionCLIP)
    protocol: str = ""  # the reference protocol these settings reproduce, if any (``eval.protocols``)

    @classmethod
    def for_protocol(cls, name: str, **overrides) -> ZeroShotConfig:
        """The settings of a system's own zero-shot code (``polyclip.eval.protocols``)."""
        preset = zero_shot_protocol(name)
        settings = {
            "templates": preset.templates,
            "top_ks": preset.top_ks,
            "underscores_to_spaces": preset.underscores_to_spaces,
            "strip_names": preset.strip_names,
            "normalize_text": preset.normalize_text,
            "protocol": name,
        }
        settings.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**settings)


def run_zero_shot(
    models: Sequence, data: LabeledImages, config: ZeroShotConfig | None = None, run: RunConfig | None = None
) -> EvalReport:
    config, run = config or ZeroShotConfig(), run or RunConfig()
    templates = load_templates(config.templates)
    prompt_names = _prompt_names(data.class_names, config.underscores_to_spaces)
    if config.strip_names:
        prompt_names = [name.strip() for name in prompt_names]
    if not config.normalize_text and len(templates) != 1:
        raise EvalError("raw (unnormalised) text weights take exactly one template; ensembling normalises")
    results, notes = [], []
    for features in _features(models, run):
        encoded = features.images(data.images)
        if config.normalize_text:
            weights = features.class_weights(prompt_names, templates)  # (C, E) normalised, ensembled
        else:  # FashionCLIP: the normalised image against each label's raw text embedding
            weights = features.texts([templates[0].format(name) for name in prompt_names])  # (C, E)
        _, ranked = top_k_classes(encoded.features, weights, max(config.top_ks), config.chunk_size)
        metrics = classification_metrics(
            data.labels[encoded.indices],
            ranked[:, 0],
            len(data.class_names),
            data.class_names,
            ranked,
            config.top_ks,
        )
        results.append(_classification_result(features.name, metrics))
        notes += _skipped_note(features.name, encoded, "test")
    config_dict = {**asdict(config), "templates": templates}
    return EvalReport("zero-shot classification", data.name, config_dict, results, notes)


# ----------------------------------------------------------------------------- retrieval


def run_retrieval(
    models: Sequence,
    data: CaptionedImages,
    config: RetrievalConfig | None = None,
    run: RunConfig | None = None,
) -> EvalReport:
    config, run = config or RetrievalConfig(), run or RunConfig()
    results, notes = [], []
    for features in _features(models, run):
        encoded = features.images(data.images)
        text_embeds = features.texts(data.captions)
        # Captions of unreadable images leave with their image; the rest are re-indexed.
        new_index = np.full(len(data.images), -1, dtype=np.int64)
        new_index[encoded.indices] = np.arange(encoded.indices.size)
        kept = new_index[data.caption_to_image] >= 0
        result = evaluate_retrieval(
            encoded.features,
            text_embeds[torch.from_numpy(kept)],
            new_index[data.caption_to_image][kept],
            config,
        )
        results.append(
            ModelResult(
                features.name,
                result.summary(),
                {"num_images": int(encoded.indices.size), "num_captions": int(kept.sum())},
            )
        )
        notes += _skipped_note(features.name, encoded, "gallery")
    return EvalReport("image-text retrieval", data.name, asdict(config), results, notes)


# ----------------------------------------------------------------------------- linear probe


def _labeled_features(features: ModelFeatures, data: LabeledImages, notes: list[str], what: str):
    encoded = features.images(data.images)
    notes += _skipped_note(features.name, encoded, what)
    return encoded.features, data.labels[encoded.indices]


def _same_classes(reference: LabeledImages, other: LabeledImages | None, role: str) -> None:
    if other is not None and other.class_names != reference.class_names:
        raise EvalError(f"the {role} set's classes differ from the training set's; use the same class list")


def run_linear_probe(
    models: Sequence,
    train: LabeledImages,
    test: LabeledImages,
    config: ProbeConfig | None = None,
    run: RunConfig | None = None,
    val: LabeledImages | None = None,
) -> EvalReport:
    config, run = config or ProbeConfig(), run or RunConfig()
    _same_classes(train, test, "test")
    _same_classes(train, val, "validation")
    results, notes = [], []
    for features in _features(models, run):
        train_x, train_y = _labeled_features(features, train, notes, "training")
        test_x, test_y = _labeled_features(features, test, notes, "test")
        val_x = val_y = None
        if val is not None:
            val_x, val_y = _labeled_features(features, val, notes, "validation")
        probe = linear_probe(
            train_x, train_y, test_x, test_y, len(train.class_names), config, val_x, val_y, train.class_names
        )
        summary = probe.summary()
        extra = {key: value for key, value in summary.items() if key not in probe.metrics.summary()}
        result = _classification_result(features.name, probe.metrics, extra)
        result.details["search"] = probe.search
        if probe.per_value:
            result.details["per_alpha"] = {str(value): splits for value, splits in probe.per_value.items()}
        results.append(result)
        if not probe.converged:
            notes.append(f"{features.name}: scikit-learn reported a fit that did not converge")
    if config.protocol == "plip":
        selected_on = (
            "the validation set" if val is not None else f"a held-out {config.val_fraction:.0%} of train"
        )
        notes.append(
            f"headline metrics and chosen_alpha: alpha selected by macro F1 on {selected_on} (polyclip's "
            "default); alpha=..._test_* rows: the reference protocol, every alpha fit on all training "
            "features and scored on test (choosing the best of those selects alpha on the test set)"
        )
    config_dict = {**asdict(config), "seed": config.resolved_seed(), "normalize": config.resolved_normalize()}
    return EvalReport(f"linear probe ({config.protocol})", test.name, config_dict, results, notes)


# ----------------------------------------------------------------------------- few-shot


@dataclass
class FewShotConfig:
    method: str = "centroid"  # "centroid" (BioCLIP) or "tip_adapter"
    shots: tuple[int, ...] = (1, 5)
    folds: int = 5  # random support draws per k (BioCLIP averages 5)
    seed: int = 0
    templates: str | list[str] = "openai_imagenet"  # zero-shot half of the cache adapter
    underscores_to_spaces: bool = True
    tip: TipAdapterConfig = field(default_factory=TipAdapterConfig)


FEW_SHOT_METHODS = ("centroid", "tip_adapter")


def run_few_shot(
    models: Sequence,
    train: LabeledImages,
    test: LabeledImages | None = None,
    config: FewShotConfig | None = None,
    run: RunConfig | None = None,
    val: LabeledImages | None = None,
) -> EvalReport:
    """k-shot accuracy: supports drawn from ``train``; queries are ``test`` or the rest of ``train``.

    With a ``val`` set, the cache adapter's alpha and beta are searched on it for every draw.
    """
    config, run = config or FewShotConfig(), run or RunConfig()
    if config.method not in FEW_SHOT_METHODS:
        raise EvalError(
            f"unknown few-shot method {config.method!r}; choose one of {', '.join(FEW_SHOT_METHODS)}"
        )
    if config.folds < 1:
        raise EvalError("few-shot needs at least one fold")
    _same_classes(train, test, "test")
    _same_classes(train, val, "validation")
    num_classes = len(train.class_names)
    results, notes = [], []
    for features in _features(models, run):
        pool_x, pool_y = _labeled_features(features, train, notes, "support")
        fixed_queries = _labeled_features(features, test, notes, "query") if test is not None else None
        val_xy = _labeled_features(features, val, notes, "validation") if val is not None else None
        # the zero-shot classifier: the half of the cache adapter, and every report's baseline
        prompt_names = _prompt_names(train.class_names, config.underscores_to_spaces)
        weights = features.class_weights(prompt_names, load_templates(config.templates))
        scale = config.tip.zero_shot_scale or model_logit_scale(features.model)
        baseline_x, baseline_y = fixed_queries if fixed_queries is not None else (pool_x, pool_y)
        zero_shot = (baseline_x.float() @ weights.T).argmax(dim=1)
        metrics: dict[str, float] = {"0shot_accuracy": float((zero_shot.numpy() == baseline_y).mean())}
        if config.method == "tip_adapter":
            metrics["zero_shot_scale"] = scale
        for k in config.shots:
            fold_scores, chosen = [], []
            for fold in range(config.folds):
                support, rest = sample_k_shot(pool_y, k, config.seed + fold, num_classes)
                query_x, query_y = (
                    fixed_queries if fixed_queries is not None else (pool_x[rest], pool_y[rest])
                )
                if query_y.size == 0:
                    raise EvalError(
                        f"{k}-shot: no query samples left; give a test set or more samples per class"
                    )
                scores, alpha_beta = _few_shot_scores(
                    config, pool_x[support], pool_y[support], query_x, num_classes, weights, val_xy, scale
                )
                fold_metrics = classification_metrics(query_y, scores.argmax(dim=1).numpy(), num_classes)
                fold_scores.append((fold_metrics.accuracy, fold_metrics.macro_f1))
                chosen.append(alpha_beta)
            accuracy, macro_f1 = np.array(fold_scores).T
            metrics[f"{k}shot_accuracy"] = float(accuracy.mean())
            metrics[f"{k}shot_accuracy_std"] = float(accuracy.std())
            metrics[f"{k}shot_macro_f1"] = float(macro_f1.mean())
            if config.method == "tip_adapter":  # the alpha and beta used (searched per fold with val)
                metrics[f"{k}shot_alpha"] = float(np.mean([a for a, _ in chosen]))
                metrics[f"{k}shot_beta"] = float(np.mean([b for _, b in chosen]))
        results.append(ModelResult(features.name, metrics))
    dataset = test.name if test is not None else train.name
    return EvalReport(f"few-shot ({config.method})", dataset, asdict(config), results, notes)


def _few_shot_scores(
    config: FewShotConfig, support_x, support_y, query_x, num_classes, weights, val_xy, scale
):
    """(Q, C) scores and the (alpha, beta) used (None for the centroid method)."""
    if config.method == "centroid":
        return nearest_centroid_scores(support_x, support_y, query_x, num_classes), (None, None)
    alpha, beta = config.tip.alpha, config.tip.beta
    if val_xy is not None:
        alpha, beta, _ = search_tip_adapter(*val_xy, support_x, support_y, weights, config.tip, scale)
    return tip_adapter_logits(query_x, support_x, support_y, weights, alpha, beta, scale), (alpha, beta)


# ----------------------------------------------------------------------------- hierarchy


@dataclass
class HierarchyConfig:
    templates: str | list[str] = "bioclip"
    prompt_from: str = "leaf"  # "leaf": the leaf name; "path": all ranks joined (BioCLIP's taxonomic text)
    logit_scale: float | None = None  # None = the model's exp(logit_scale)


def run_hierarchical(
    models: Sequence,
    data: LabeledImages,
    hierarchy: Hierarchy,
    config: HierarchyConfig | None = None,
    run: RunConfig | None = None,
) -> EvalReport:
    """Zero-shot over the leaf classes, accuracy at every rank, rolled up and top-down."""
    config, run = config or HierarchyConfig(), run or RunConfig()
    if config.prompt_from not in ("leaf", "path"):
        raise EvalError(f"prompt_from must be 'leaf' or 'path', got {config.prompt_from!r}")
    hierarchy = hierarchy.aligned_to(data.class_names)
    templates = load_templates(config.templates)
    prompt_names = [
        path[-1] if config.prompt_from == "leaf" else " ".join(path) for path in hierarchy.leaf_paths
    ]
    results, notes = [], []
    for features in _features(models, run):
        encoded = features.images(data.images)
        weights = features.class_weights(prompt_names, templates)
        scale = config.logit_scale if config.logit_scale is not None else _model_scale(features.model)
        probabilities = zero_shot_probabilities(encoded.features, weights, scale)  # (N, leaves)
        true = data.labels[encoded.indices]
        metrics = {}
        for mode in MODES:
            for rank, value in accuracy_per_rank(probabilities, true, hierarchy, mode).items():
                metrics[f"{mode}_{rank}_accuracy"] = value
        results.append(ModelResult(features.name, metrics, {"logit_scale": scale}))
        notes += _skipped_note(features.name, encoded, "test")
    return EvalReport(
        "hierarchical zero-shot",
        data.name,
        {**asdict(config), "ranks": list(hierarchy.ranks)},
        results,
        notes,
    )


def _model_scale(model) -> float:
    logit_scale = getattr(model, "logit_scale", None)
    if logit_scale is None:
        return 100.0  # CLIP's clamp value, for models without a learned scale
    return float(torch.as_tensor(logit_scale).detach().float().exp().clamp(max=100.0))


# ----------------------------------------------------------------------------- bias


@dataclass
class BiasConfig:
    num_permutations: int = 10000  # sampled re-partitions when exact enumeration is too large
    max_exact: int = 100_000  # enumerate every partition up to this many
    seed: int = 0


def _embed(features: ModelFeatures, subset: EmbeddingSet, notes: list[str]) -> torch.Tensor:
    if subset.prompts is not None:
        return features.texts(subset.prompts)
    paths = sorted(p for p in subset.image_folder.rglob("*") if p.is_file() and is_image_file(p))
    if not paths:
        raise EvalError(f"bias set {subset.label!r}: no images in {subset.image_folder}")
    encoded = features.images(FileImages(paths))
    notes += _skipped_note(features.name, encoded, subset.label)
    return encoded.features


def run_bias(
    models: Sequence, tests: list[BiasTest], config: BiasConfig | None = None, run: RunConfig | None = None
) -> EvalReport:
    """WEAT effect size and permutation p-value of every test, per model."""
    config, run = config or BiasConfig(), run or RunConfig()
    if not tests:
        raise EvalError("no bias tests given")
    results, notes = [], []
    for features in _features(models, run):
        metrics, details = {}, {}
        for test in tests:
            embedded = [
                _embed(features, s, notes)
                for s in (test.targets_x, test.targets_y, test.attributes_a, test.attributes_b)
            ]
            outcome = weat(*embedded, config.num_permutations, config.seed, config.max_exact)
            metrics[f"{test.name}_effect_size"] = outcome.effect_size
            metrics[f"{test.name}_p_value"] = outcome.p_value
            metrics[f"{test.name}_p_value_two_sided"] = outcome.p_value_two_sided
            details[test.name] = asdict(outcome)
            if math.isnan(outcome.effect_size):
                notes.append(
                    f"{features.name}, {test.name}: all association scores are equal; effect size undefined"
                )
        results.append(ModelResult(features.name, metrics, details))
    return EvalReport(
        "association bias (WEAT)", ", ".join(t.name for t in tests), asdict(config), results, notes
    )
