"""Evaluation protocols of the papers polyclip serves, on any model, side by side.

Zero-shot classification with template ensembles, chunked image-text retrieval, linear probes
(CLIP's logistic regression, PLIP's SGD protocol), few-shot without training (BioCLIP's nearest
centroid, a Tip-Adapter-style cache), hierarchical roll-up (BioCLIP taxa, StreetCLIP places), and a
WEAT-style association bias probe. Features are cached on disk; reports are JSON, Markdown and PNG.
"""

from polyclip.eval.bias import BiasTest, load_bias_tests, weat
from polyclip.eval.cache import FeatureCache, ModelFeatures
from polyclip.eval.data import (
    CaptionedImages,
    LabeledImages,
    load_labeled,
    read_captions,
    read_idx,
    read_image_csv,
    read_image_folder,
    read_rsicd_labels,
)
from polyclip.eval.errors import DataError, EvalError
from polyclip.eval.features import EncodeConfig, encode_images
from polyclip.eval.few_shot import TipAdapterConfig, nearest_centroid_scores, tip_adapter_logits
from polyclip.eval.hierarchy import Hierarchy, accuracy_per_rank
from polyclip.eval.metrics import ClassificationMetrics, classification_metrics
from polyclip.eval.probe import ProbeConfig, linear_probe
from polyclip.eval.protocols import ZERO_SHOT_PROTOCOLS, ZeroShotProtocol, zero_shot_protocol
from polyclip.eval.report import EvalReport, ModelResult, write_report
from polyclip.eval.retrieval import RetrievalConfig, evaluate_retrieval, rank_gallery
from polyclip.eval.runner import (
    BiasConfig,
    EvalModel,
    FewShotConfig,
    HierarchyConfig,
    RunConfig,
    ZeroShotConfig,
    run_bias,
    run_few_shot,
    run_hierarchical,
    run_linear_probe,
    run_retrieval,
    run_zero_shot,
)
from polyclip.eval.templates import list_template_sets, load_templates
from polyclip.eval.zero_shot import build_zero_shot_weights, top_k_classes

__all__ = [
    "BiasConfig",
    "BiasTest",
    "CaptionedImages",
    "ClassificationMetrics",
    "DataError",
    "EncodeConfig",
    "EvalError",
    "EvalModel",
    "EvalReport",
    "FeatureCache",
    "FewShotConfig",
    "Hierarchy",
    "HierarchyConfig",
    "LabeledImages",
    "ModelFeatures",
    "ModelResult",
    "ProbeConfig",
    "RetrievalConfig",
    "RunConfig",
    "TipAdapterConfig",
    "ZERO_SHOT_PROTOCOLS",
    "ZeroShotProtocol",
    "ZeroShotConfig",
    "accuracy_per_rank",
    "build_zero_shot_weights",
    "classification_metrics",
    "encode_images",
    "evaluate_retrieval",
    "linear_probe",
    "list_template_sets",
    "load_bias_tests",
    "load_labeled",
    "load_templates",
    "nearest_centroid_scores",
    "rank_gallery",
    "read_captions",
    "read_idx",
    "read_image_csv",
    "read_image_folder",
    "read_rsicd_labels",
    "run_bias",
    "run_few_shot",
    "run_hierarchical",
    "run_linear_probe",
    "run_retrieval",
    "run_zero_shot",
    "tip_adapter_logits",
    "top_k_classes",
    "weat",
    "write_report",
    "zero_shot_protocol",
]
