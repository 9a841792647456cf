"""Choose a model for your own data: every candidate evaluated on a labelled sample, measured on this machine.

``choose(data, task, models)`` evaluates each candidate (registry names that are cached or downloadable,
``hf-hub:`` ids, local checkpoint folders or files, exported ONNX folders) with the protocol that fits
the task, through the evaluation runner:

    zeroshot   ``run_zero_shot`` on a labelled image folder (or CSV); headline: top-1 accuracy
    fewshot    ``run_few_shot`` (nearest class centroid, BioCLIP's protocol) on the same kind of data,
               supports drawn from the sample, the rest are queries; headline: k-shot accuracy
    retrieval  ``run_retrieval`` on a captions file (CSV, JSONL, ``dataset_*.json``); headline:
               text-to-image recall@1

and measures, in a fresh process per candidate, images per second of ``encode_image`` at one batch size
and the peak resident memory the model adds (loading plus evaluation) over the process before loading.

User samples are small, so each headline comes with a percentile bootstrap confidence interval over the
evaluated samples (Efron & Tibshirani 1993). Every headline is the mean of a 0/1 outcome per sample
(correct class, caption's image at rank 1), and the mean of a resample with replacement of n such
outcomes, h of them ones, is Binomial(n, h/n) / n: the interval is drawn from that distribution, which
is the bootstrap exactly, without materialising the resamples. (For few-shot, n is one fold's queries.)

The recommendation is the best headline among the candidates within the budget (milliseconds per image
at the measured batch size), ties broken by speed. Registry candidates that are neither cached nor
downloadable (offline) are listed as not tried, with the reason.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from polyclip.eval.errors import DataError, EvalError

TASKS = ("zeroshot", "fewshot", "retrieval")
HEADLINES = {"zeroshot": "accuracy", "fewshot": "k-shot accuracy", "retrieval": "text-to-image R@1"}


@dataclass
class ChooseConfig:
    task: str = "zeroshot"
    budget_ms: float | None = None  # milliseconds per image at ``batch_size``; None = no budget
    batch_size: int = 16  # images per forward pass for the throughput measurement (and for evaluation)
    timing_rounds: int = 3  # timed passes after one warm-up; the median is kept
    templates: str | list[str] = "openai_imagenet"  # zero-shot prompt templates (set name or list)
    shots: int | None = None  # few-shot k; None = 5, or fewer when a class has too few samples
    folds: int = 5  # few-shot support draws
    resamples: int = 2000  # bootstrap resamples
    confidence: float = 0.95
    seed: int = 0
    offline: bool | None = None  # True: only the hub cache; None: the cache, then the hub if reachable
    timeout_s: float = 3600.0  # per candidate
    # a fresh process per candidate: its peak memory is the model's alone and a crash is its own; False
    # measures in this process (faster; peak memory is then only what raises this process's high-water mark)
    isolate: bool = True


@dataclass
class Candidate:
    name: str  # as given: registry name, hf-hub id or path
    source: str  # "registry", "hub" or "local"
    license: str = "unknown"
    status: str = "pending"  # "tried", "not tried" or "failed"
    reason: str = ""  # why not tried / why it failed
    accuracy: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    samples: int | None = None  # n of the headline's outcomes
    images_per_second: float | None = None
    ms_per_image: float | None = None
    peak_memory_mib: float | None = None
    within_budget: bool | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # the protocol's other numbers


@dataclass
class ChooseResult:
    task: str
    headline: str
    data: str
    config: dict
    candidates: list[Candidate]  # tried ones ranked first (best headline, then speed), then the rest
    recommendation: str | None
    reason: str

    @property
    def tried(self) -> list[Candidate]:
        return [c for c in self.candidates if c.status == "tried"]

    @property
    def not_tried(self) -> list[Candidate]:
        return [c for c in self.candidates if c.status == "not tried"]

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- statistics


def bootstrap_interval(
    hits: int, total: int, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``total`` 0/1 outcomes of which ``hits`` are ones."""
    if total <= 0:
        raise EvalError("a confidence interval needs at least one evaluated sample")
    rng = np.random.default_rng(seed)
    means = rng.binomial(total, hits / total, size=resamples) / total  # each: one resample's mean
    tail = (1 - confidence) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


# ----------------------------------------------------------------------------- candidates


def resolve_candidates(models: list[str] | str) -> list[Candidate]:
    """``"all"`` (every registry entry), names, ``hf-hub:`` ids and paths, in order, without repeats."""
    from polyclip.hub import registry

    specs = [models] if isinstance(models, str) else list(models)
    if not specs:
        raise EvalError("no candidate models given (use 'all' for the registry)")
    entries = registry()
    candidates: dict[str, Candidate] = {}
    for spec in specs:
        if spec == "all":
            for name, entry in sorted(entries.items()):
                candidates.setdefault(name, Candidate(name, "registry", entry.license))
            continue
        spec = str(spec)
        if Path(spec).expanduser().exists():
            candidates.setdefault(spec, Candidate(spec, "local", "unknown (local checkpoint)"))
        elif spec in entries:
            candidates.setdefault(spec, Candidate(spec, "registry", entries[spec].license))
        elif spec.startswith("hf-hub:"):
            candidates.setdefault(spec, Candidate(spec, "hub", "see the model card"))
        else:
            raise EvalError(
                f"{spec!r} is not a local path, a registry name or an 'hf-hub:org/repo' id "
                "(`polyclip models` lists the registry)"
            )
    return list(candidates.values())


def _availability(candidate: Candidate) -> str | None:
    """None when the candidate's files are here (local, cached, or downloaded now); else the reason."""
    if candidate.source == "local":
        return None
    from polyclip.hub import ModelNotFoundError, download, registry

    if candidate.source == "registry":
        entry = registry()[candidate.name]
        repo, format = entry.hub_id, entry.format
    else:
        repo, format = candidate.name.removeprefix("hf-hub:").strip("/"), "hf"
    try:
        download(repo, format, name=candidate.name)
    except ModelNotFoundError:
        return f"not in the local Hugging Face cache and the hub is not reachable ({repo})"
    return None


# ----------------------------------------------------------------------------- one candidate, in its own process


def _data_for(task: str, data: str):
    from polyclip.eval.data import load_labeled, read_captions

    path = Path(data).expanduser()
    if task in ("zeroshot", "fewshot"):
        return load_labeled(path)
    if path.is_dir():
        files = sorted(
            p
            for p in path.iterdir()
            if p.suffix.lower() in (".csv", ".jsonl") or p.name.startswith("dataset_")
        )
        if len(files) != 1:
            raise DataError(
                f"{path}: retrieval needs one captions file (.csv, .jsonl or dataset_*.json) in the folder, "
                f"found {len(files)}; pass the file itself"
            )
        path = files[0]
    return read_captions(path)


def _few_shot_k(labels: np.ndarray, requested: int | None) -> int:
    smallest = int(np.bincount(labels).min()) if labels.size else 0
    if smallest < 2:
        raise DataError("few-shot needs at least two samples of every class (one support, one query)")
    k = requested if requested is not None else min(5, smallest - 1)
    if not 1 <= k < smallest:
        raise DataError(
            f"{k}-shot needs more than {k} samples of every class; the smallest class has {smallest}"
        )
    return k


def _evaluate(task: str, data, loaded, name: str, config: ChooseConfig) -> tuple[float, int, dict]:
    """(headline, n outcomes, all metrics) through the evaluation runner's protocol for ``task``."""
    from polyclip.eval.features import EncodeConfig
    from polyclip.eval.runner import (
        EvalModel,
        FewShotConfig,
        RunConfig,
        ZeroShotConfig,
        run_few_shot,
        run_retrieval,
        run_zero_shot,
    )

    run = RunConfig(encode=EncodeConfig(batch_size=config.batch_size))
    models = [EvalModel(name, *loaded)]
    if task == "zeroshot":
        result = run_zero_shot(
            models, data, ZeroShotConfig(templates=config.templates, top_ks=(1,)), run
        ).results[0]
        total = int(np.asarray(result.details["confusion_matrix"]).sum())
        return result.metrics["accuracy"], total, result.metrics
    if task == "fewshot":
        k = _few_shot_k(data.labels, config.shots)
        few = FewShotConfig(shots=(k,), folds=config.folds, seed=config.seed)
        result = run_few_shot(models, data, None, few, run).results[0]
        queries = len(data.labels) - k * len(data.class_names)  # one fold's queries: the rest of the sample
        return result.metrics[f"{k}shot_accuracy"], queries, {"shots": k, **result.metrics}
    result = run_retrieval(models, data, None, run).results[0]
    return result.metrics["t2i_R@1"], int(result.details["num_captions"]), result.metrics


def _peak_rss_mib() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS, KiB elsewhere


def _throughput(model, batch_size: int, rounds: int) -> float:
    """Images per second of ``encode_image`` on random pixels of the model's size (median of ``rounds``)."""
    import time

    import torch

    size = model.image_size
    pixels = torch.randn(batch_size, 3, size, size)
    with torch.inference_mode():
        model.encode_image(pixels)  # warm-up: allocator, kernels, graph optimisations
        times = []
        for _ in range(max(1, rounds)):
            start = time.perf_counter()
            model.encode_image(pixels)
            times.append(time.perf_counter() - start)
    return batch_size / float(np.median(times))


def measure_candidate(name: str, task: str, data: str, config: ChooseConfig) -> dict[str, Any]:
    """Load, evaluate and time one candidate in this process; returns the numbers as a dict."""
    import polyclip

    dataset = _data_for(task, data)
    before = _peak_rss_mib()
    loaded = polyclip.load(name)
    headline, total, metrics = _evaluate(task, dataset, loaded, name, config)
    images_per_second = _throughput(loaded[0], config.batch_size, config.timing_rounds)
    return {
        "accuracy": float(headline),
        "samples": total,
        "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)},
        "images_per_second": images_per_second,
        "peak_memory_mib": max(0.0, _peak_rss_mib() - before),
    }


def _worker_main() -> None:
    """The child process: one request on stdin, one JSON line on stdout (an error is reported, not raised)."""
    request = json.loads(sys.stdin.read())
    result = _measure_safely(request["name"], request["data"], ChooseConfig(**request["config"]))
    sys.stdout.write("\n" + json.dumps(result) + "\n")


def _measure_safely(name: str, data: str, config: ChooseConfig) -> dict[str, Any]:
    """``{"ok": numbers}``, or ``{"error": reason}``: one candidate's failure never stops the others."""
    try:
        return {"ok": measure_candidate(name, config.task, data, config)}
    except Exception as error:  # the candidate is reported as failed with this reason
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}


def _run_isolated(name: str, data: str, config: ChooseConfig) -> dict[str, Any]:
    """``measure_candidate`` in a fresh interpreter: its peak memory is the model's alone, a crash is its own."""
    request = json.dumps({"name": name, "data": str(data), "config": asdict(config)})
    code = "from polyclip.eval.choose import _worker_main; _worker_main()"
    env = dict(os.environ)
    if config.offline:
        env["HF_HUB_OFFLINE"] = "1"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            input=request,
            capture_output=True,
            text=True,
            env=env,
            timeout=config.timeout_s,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {config.timeout_s:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"the evaluation process exited with status {done.returncode}: {tail}"}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- ranking


def _rank_key(candidate: Candidate) -> tuple:
    return (-(candidate.accuracy or 0.0), -(candidate.images_per_second or 0.0))


def recommend(candidates: list[Candidate], budget_ms: float | None) -> tuple[str | None, str]:
    """(name, reason): the best headline within the budget; equal headlines go to the faster model."""
    tried = sorted((c for c in candidates if c.status == "tried"), key=_rank_key)
    if not tried:
        return None, "no candidate could be evaluated"
    eligible = [c for c in tried if c.within_budget is not False]
    if not eligible:
        fastest = min(tried, key=lambda c: c.ms_per_image)
        return None, (
            f"no candidate meets the budget of {budget_ms:g} ms per image; the fastest, {fastest.name}, "
            f"takes {fastest.ms_per_image:.1f} ms"
        )
    best = eligible[0]
    where = f"within {budget_ms:g} ms per image" if budget_ms is not None else "tried"
    reason = (
        f"best accuracy among the {len(eligible)} candidate(s) {where}: {best.accuracy:.3f} "
        f"(95% interval {best.ci_low:.3f}-{best.ci_high:.3f}), {best.images_per_second:.1f} images/s"
    )
    tied = [c for c in eligible[1:] if c.accuracy == best.accuracy]
    if tied:
        reason += f"; tied with {', '.join(c.name for c in tied)} and faster"
    overlapping = [
        c for c in eligible[1:] if c not in tied and c.ci_high is not None and c.ci_high >= best.ci_low
    ]
    if overlapping:
        reason += (
            f"; the intervals of {', '.join(c.name for c in overlapping)} overlap its own: "
            "a larger sample would separate them"
        )
    excluded = [c for c in tried if c.within_budget is False]
    if excluded:
        reason += f"; over the budget: {', '.join(c.name for c in excluded)}"
    return best.name, reason


def choose(data: str | Path, task: str = "zeroshot", models: list[str] | str = "all", config: ChooseConfig | None = None,
           progress=None) -> ChooseResult:  # fmt: skip
    """Evaluate and measure every candidate on ``data``; the ranking and a recommendation with its reason.

    ``progress(candidate)`` is called after each candidate (for a command-line progress line).
    """
    config = ChooseConfig(**{**asdict(config or ChooseConfig()), "task": task})
    if task not in TASKS:
        raise EvalError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if config.batch_size < 1 or config.resamples < 1 or not 0 < config.confidence < 1:
        raise EvalError("batch_size and resamples must be positive and confidence in (0, 1)")
    if config.budget_ms is not None and not config.budget_ms > 0:
        raise EvalError(f"the budget must be a positive number of milliseconds, got {config.budget_ms}")
    _data_for(task, str(data))  # a bad dataset fails here, once, not once per candidate
    candidates = resolve_candidates(models)
    previous = os.environ.get("HF_HUB_OFFLINE")
    if config.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        for candidate in candidates:
            missing = _availability(candidate)
            if missing is not None:
                candidate.status, candidate.reason = "not tried", missing
            else:
                measure = _run_isolated if config.isolate else _measure_safely
                _fill(candidate, measure(candidate.name, str(data), config), config)
            if progress is not None:
                progress(candidate)
    finally:
        if config.offline:
            if previous is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = previous
    order = {"tried": 0, "failed": 1, "not tried": 2}
    tried = sorted((c for c in candidates if c.status == "tried"), key=_rank_key)
    rest = sorted((c for c in candidates if c.status != "tried"), key=lambda c: (order[c.status], c.name))
    name, reason = recommend(tried, config.budget_ms)
    return ChooseResult(task, HEADLINES[task], str(data), asdict(config), tried + rest, name, reason)


def _fill(candidate: Candidate, outcome: dict[str, Any], config: ChooseConfig) -> None:
    if "error" in outcome:
        candidate.status, candidate.reason = "failed", outcome["error"]
        return
    numbers = outcome["ok"]
    candidate.status = "tried"
    candidate.accuracy, candidate.samples = numbers["accuracy"], numbers["samples"]
    hits = round(candidate.accuracy * candidate.samples)
    candidate.ci_low, candidate.ci_high = bootstrap_interval(
        hits, candidate.samples, config.resamples, config.confidence, config.seed
    )
    candidate.images_per_second = numbers["images_per_second"]
    candidate.ms_per_image = 1000.0 / candidate.images_per_second
    candidate.peak_memory_mib = numbers["peak_memory_mib"]
    candidate.metrics = numbers["metrics"]
    candidate.within_budget = None if config.budget_ms is None else candidate.ms_per_image <= config.budget_ms


# ----------------------------------------------------------------------------- plot


def plot_choice(result: ChooseResult, path: str | Path) -> Path:
    """Headline (with its interval) against images per second, one point per tried candidate; PNG."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("the plot needs matplotlib: pip install 'polyclip[eval]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tried = result.tried
    if not tried:
        raise EvalError("no candidate was evaluated: nothing to plot")
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for candidate in tried:
        chosen = candidate.name == result.recommendation
        axes.errorbar(
            candidate.images_per_second,
            candidate.accuracy,
            yerr=[[candidate.accuracy - candidate.ci_low], [candidate.ci_high - candidate.accuracy]],
            fmt="*" if chosen else "o",
            markersize=14 if chosen else 7,
            capsize=4,
            color="tab:red" if chosen else "tab:blue",
        )
        label = f"{Path(candidate.name).name or candidate.name}\n{candidate.peak_memory_mib:.0f} MiB"
        axes.annotate(label, (candidate.images_per_second, candidate.accuracy), textcoords="offset points",
                      xytext=(8, 4), fontsize=8)  # fmt: skip
    budget = result.config.get("budget_ms")
    if budget:
        axes.axvline(1000.0 / budget, color="gray", linestyle="--", linewidth=1)
        axes.text(1000.0 / budget, axes.get_ylim()[0], f" budget {budget:g} ms", color="gray", fontsize=8)
    speeds = [c.images_per_second for c in tried]
    if max(speeds) / max(min(speeds), 1e-9) > 20:
        axes.set_xscale("log")
    axes.set_xlabel(f"images per second (batch {result.config['batch_size']}, this machine)")
    axes.set_ylabel(f"{result.headline} ({result.config['confidence']:.0%} bootstrap interval)")
    axes.set_title(f"polyclip choose: {result.task} on {Path(result.data).name}; red star = recommended")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _format_interval(candidate: Candidate) -> str:
    if candidate.accuracy is None or math.isnan(candidate.accuracy):
        return ""
    return f"{candidate.accuracy:.3f} [{candidate.ci_low:.3f}, {candidate.ci_high:.3f}]"


def table_rows(result: ChooseResult) -> list[list[str]]:
    """The rows the command prints: model, status, headline [interval], images/s, ms/image, MiB, licence."""
    rows = []
    for candidate in result.candidates:
        tried = candidate.status == "tried"
        rows.append(
            [
                candidate.name + (" *" if candidate.name == result.recommendation else ""),
                candidate.status if not candidate.reason else f"{candidate.status}: {candidate.reason}",
                _format_interval(candidate) if tried else "",
                f"{candidate.images_per_second:.1f}" if tried else "",
                f"{candidate.ms_per_image:.1f}" if tried else "",
                f"{candidate.peak_memory_mib:.0f}" if tried else "",
                candidate.license,
            ]
        )
    return rows


TABLE_COLUMNS = ("model", "status", "headline [95% CI]", "images/s", "ms/image", "peak MiB", "licence")

__all__ = [
    "TASKS",
    "Candidate",
    "ChooseConfig",
    "ChooseResult",
    "bootstrap_interval",
    "choose",
    "measure_candidate",
    "plot_choice",
    "recommend",
    "resolve_candidates",
    "table_rows",
]
