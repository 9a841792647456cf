"""The end of a run: the final model saved (gathered first under FSDP), exported, mixed with the
pretrained weights (WiSE-FT), plotted and summarised in ``summary.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from polyclip.train import checkpoint as ckpt
from polyclip.train.config import TrainConfig
from polyclip.train.distributed import DistEnv, barrier
from polyclip.train.reporting import RunLogger, plot_metrics
from polyclip.train.state import SkipLog


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path | None  # the final model, a polyclip folder (None on ranks other than 0)
    steps: int
    last_loss: float
    eval_metrics: dict[str, float] = field(default_factory=dict)
    skipped_images: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    exports: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0


def finish_run(
    config: TrainConfig, env: DistEnv, model: nn.Module, preprocess, tokenizer, evaluator, skips: SkipLog,
    logger: RunLogger, step: int, eval_metrics: dict, last_loss: float,
) -> TrainResult:  # fmt: skip
    """Save, export, mix and summarise (collective: every rank calls it; rank 0 writes)."""
    import polyclip

    run_dir = config.run_dir
    sharded = env.strategy == "fsdp"
    model_state = ckpt.full_state(model, None, sharded)[0] if sharded else None  # collective
    for reason in skips.gather(env):  # collective
        logger.write(f"skipped an unreadable image: {reason}")
    result = TrainResult(run_dir, None, step, last_loss, eval_metrics, skips.total, list(skips.examples))
    if env.is_main:
        final = _whole_model(model, model_state)
        result.model_dir = polyclip.save(final, preprocess, tokenizer, run_dir / "model")
        result.exports = export_model(config, final, preprocess, run_dir)
        for alpha in config.checkpoint.wise_ft_alphas:
            result.exports[f"wise_ft_{alpha:g}"] = save_wise_ft(
                config, final, preprocess, tokenizer, evaluator, alpha, logger, step, env
            )
        if config.log.plots:
            plot_metrics(run_dir)
        summary = {
            "steps": step, "loss": last_loss, "skipped_images": skips.total,
            "skipped_examples": skips.examples, "eval": eval_metrics,
            "model": str(result.model_dir), "exports": {k: str(v) for k, v in result.exports.items()},
        }  # fmt: skip
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if skips.total:
            logger.write(
                f"{skips.total} unreadable image(s) were skipped and replaced; e.g. {skips.examples[0]}"
            )
    barrier(env)
    return result


def _whole_model(model: nn.Module, model_state: dict | None) -> nn.Module:
    """The trained model, whole: the model itself, or (FSDP) a copy built from the gathered weights."""
    import polyclip

    if model_state is None:
        return model
    whole = polyclip.create_model(model.config)
    whole.load_state_dict(model_state, strict=True)
    return whole


def export_model(config: TrainConfig, model: nn.Module, preprocess, run_dir: Path) -> dict[str, Path]:
    """The final model as transformers and/or open_clip folders, as ``checkpoint.export_*`` ask."""
    checkpoint = config.checkpoint
    if not (checkpoint.export_hf or checkpoint.export_open_clip):
        return {}
    from polyclip.checkpoints.export import export_hf, export_open_clip

    exports = {}
    if checkpoint.export_hf:
        exports["hf"] = export_hf(model, run_dir / "export_hf", preprocess.config)
    if checkpoint.export_open_clip:
        exports["open_clip"] = export_open_clip(model, run_dir / "export_open_clip", preprocess.config)
    return exports


def save_wise_ft(
    config: TrainConfig, model: nn.Module, preprocess, tokenizer, evaluator, alpha: float, logger: RunLogger,
    step: int, env: DistEnv,
) -> Path:  # fmt: skip
    """The WiSE-FT mix of the pretrained and the final weights at ``alpha``, saved and evaluated."""
    import polyclip
    from polyclip.train.wise_ft import wise_ft

    zero_shot, _, _ = polyclip.load(config.model.pretrained)
    mixed = wise_ft(zero_shot, model, alpha)
    folder = polyclip.save(mixed, preprocess, tokenizer, config.run_dir / f"wise_ft_{alpha:g}")
    if evaluator is not None:
        metrics = evaluator(mixed.to(env.device))
        logger.log(step, "eval", {f"wise_ft_{alpha:g}/{k}": v for k, v in metrics.items()})
    return folder
