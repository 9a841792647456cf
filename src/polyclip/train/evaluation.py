"""Evaluation during training, through ``polyclip.eval``'s protocols (no second implementation):

- zero-shot classification on a labelled folder (class names put into prompt templates,
  ``polyclip.eval.run_zero_shot``): top-1 / top-5 accuracy, balanced accuracy, macro F1;
- image-text retrieval on validation pairs (``polyclip.eval.run_retrieval``): R@1/5/10 in both
  directions, median rank.

The datasets are read once, when the trainer starts, so a wrong path fails before any training.
"""

from __future__ import annotations

from polyclip.train.config import EvalConfig


class TrainingEvaluator:
    def __init__(self, config: EvalConfig, preprocess, tokenizer) -> None:
        from polyclip.eval import load_labeled, read_captions

        self.config, self.preprocess, self.tokenizer = config, preprocess, tokenizer
        self.zero_shot = load_labeled(config.zero_shot) if config.zero_shot else None
        self.retrieval = (
            read_captions(config.retrieval, split=config.retrieval_split) if config.retrieval else None
        )

    @property
    def enabled(self) -> bool:
        return self.zero_shot is not None or self.retrieval is not None

    def __call__(self, model) -> dict[str, float]:
        """Metrics of ``model`` (a DualEncoder) as ``{"zero_shot/accuracy": ..., "retrieval/t2i_R@5": ...}``."""
        from polyclip.eval import (
            EncodeConfig,
            EvalModel,
            RunConfig,
            ZeroShotConfig,
            run_retrieval,
            run_zero_shot,
        )

        run = RunConfig(
            encode=EncodeConfig(
                batch_size=self.config.batch_size,
                num_workers=self.config.num_workers,
                text_batch_size=self.config.batch_size,
            )
        )
        models = [EvalModel("model", model, self.preprocess, self.tokenizer)]
        metrics: dict[str, float] = {}
        if self.zero_shot is not None:
            zero_shot = ZeroShotConfig(templates=list(self.config.zero_shot_templates), top_ks=(1, 5))
            report = run_zero_shot(models, self.zero_shot, zero_shot, run)
            metrics.update({f"zero_shot/{k}": v for k, v in report.results[0].metrics.items()})
        if self.retrieval is not None:
            report = run_retrieval(models, self.retrieval, run=run)
            metrics.update({f"retrieval/{k}": v for k, v in report.results[0].metrics.items()})
        return metrics
