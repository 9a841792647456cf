"""Evaluation reports: JSON, a Markdown table with one column per model, and PNG plots.

Plots (matplotlib, imported when plotting, Agg backend): a row-normalised confusion matrix per
model, per-class F1 with one bar per model, and recall@K curves for retrieval.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from polyclip.eval.errors import EvalError

_MAX_LABELLED_CLASSES = 40  # above this, plots drop per-class tick labels


@dataclass
class ModelResult:
    model: str
    metrics: dict[str, float]  # scalars, one table row each
    details: dict = field(default_factory=dict)  # per-class arrays, confusion matrix, skipped images


@dataclass
class EvalReport:
    protocol: str
    dataset: str
    config: dict
    results: list[ModelResult]
    notes: list[str] = field(default_factory=list)

    def metric_names(self) -> list[str]:
        names: dict[str, None] = {}
        for result in self.results:
            names.update(dict.fromkeys(result.metrics))
        return list(names)

    def markdown(self) -> str:
        models = [result.model for result in self.results]
        lines = [
            f"# {self.protocol}: {self.dataset}",
            "",
            "| metric | " + " | ".join(_escape(m) for m in models) + " |",
            "|---|" + "---:|" * len(models),
        ]
        for name in self.metric_names():
            cells = [_format(result.metrics.get(name)) for result in self.results]
            lines.append(f"| {_escape(name)} | " + " | ".join(cells) + " |")
        if self.notes:
            lines += ["", *[f"- {_escape(note)}" for note in self.notes]]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        return asdict(self)


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def _format(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int | np.integer):
        return str(int(value))
    value = float(value)
    if math.isnan(value):
        return "nan"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"


def _json_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.integer | np.floating):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _file_stem(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_") or "model"


def write_report(report: EvalReport, out_dir: str | Path, plots: bool = True) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and the plots that apply; returns name -> path."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise EvalError(f"cannot create the report directory {out_dir}: {error}") from error
    written = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    # NaN is written as null so the JSON stays standard.
    payload = json.dumps(_nan_to_none(report.to_dict()), indent=2, default=_json_default, allow_nan=False)
    written["json"].write_text(payload + "\n", encoding="utf-8")
    written["markdown"].write_text(report.markdown(), encoding="utf-8")
    if plots:
        written.update(_plot(report, out_dir))
    return written


def _nan_to_none(value):
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(v) for v in value]
    if isinstance(value, np.ndarray):
        return _nan_to_none(value.tolist())
    if isinstance(value, float | np.floating) and math.isnan(value):
        return None
    return value


def _plot(report: EvalReport, out_dir: Path) -> dict[str, Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise EvalError(
            "plots need matplotlib: pip install 'polyclip[eval]' (or pass plots=False)"
        ) from error
    written: dict[str, Path] = {}
    for result in report.results:
        confusion = result.details.get("confusion_matrix")
        if confusion is not None:
            path = out_dir / f"confusion_{_file_stem(result.model)}.png"
            _plot_confusion(
                plt, np.asarray(confusion), result.details.get("class_names", []), result.model, path
            )
            written[f"confusion:{result.model}"] = path
    per_class = [(r.model, r.details["per_class"]) for r in report.results if "per_class" in r.details]
    if per_class:
        path = out_dir / "per_class_f1.png"
        _plot_per_class_f1(plt, per_class, path)
        written["per_class_f1"] = path
    if any(name.endswith("_R@1") for name in report.metric_names()):
        path = out_dir / "recall_at_k.png"
        _plot_recall(plt, report, path)
        written["recall_at_k"] = path
    return written


def _plot_confusion(plt, confusion: np.ndarray, class_names: list[str], model: str, path: Path) -> None:
    rows = confusion.sum(axis=1, keepdims=True)
    normalised = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
    size = min(4 + 0.3 * len(confusion), 20)
    figure, axes = plt.subplots(figsize=(size, size))
    image = axes.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, fraction=0.046, label="share of true class")
    if class_names and len(class_names) <= _MAX_LABELLED_CLASSES:
        ticks = np.arange(len(class_names))
        axes.set_xticks(ticks, class_names, rotation=90, fontsize=7)
        axes.set_yticks(ticks, class_names, fontsize=7)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(f"confusion matrix: {model}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _plot_per_class_f1(plt, per_class: list[tuple[str, dict]], path: Path) -> None:
    class_names = per_class[0][1]["class_names"]
    count = len(class_names)
    figure, axes = plt.subplots(figsize=(min(4 + 0.35 * count * len(per_class), 24), 4.5))
    positions = np.arange(count)
    width = 0.8 / len(per_class)
    for i, (model, details) in enumerate(per_class):
        axes.bar(positions + i * width - 0.4 + width / 2, details["f1"], width=width, label=model)
    if count <= _MAX_LABELLED_CLASSES:
        axes.set_xticks(positions, class_names, rotation=90, fontsize=7)
    axes.set_ylim(0, 1)
    axes.set_ylabel("F1")
    axes.set_title("per-class F1")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _plot_recall(plt, report: EvalReport, path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, prefix, title in ((axes[0], "i2t", "image -> text"), (axes[1], "t2i", "text -> image")):
        for result in report.results:
            points = sorted(
                (int(name.split("@")[1]), value)
                for name, value in result.metrics.items()
                if name.startswith(f"{prefix}_R@")
            )
            if points:
                axis.plot([k for k, _ in points], [v for _, v in points], marker="o", label=result.model)
        axis.set_xscale("log")
        axis.set_xlabel("K")
        axis.set_title(f"recall@K, {title}")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("recall@K")
    axes[0].set_ylim(0, 1.02)
    axes[1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
