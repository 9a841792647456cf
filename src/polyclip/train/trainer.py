"""The training loop: one code path for a laptop CPU, one GPU, or many GPUs on many machines.

``Trainer(config).fit()`` builds the model (random, or ``polyclip.load`` of a checkpoint to fine-tune),
locks towers (LiT), wraps it for DDP or FSDP2, reads the data, and then for each step: draws this
rank's slice of the global batch, computes the contrastive loss of the whole batch (exactly, even
with micro-batches: `polyclip.train.step`), clips gradients, steps AdamW with warm-up + cosine, and
clamps the logit scale at ``log(100)`` as CLIP does. Around the loop it logs, evaluates, checkpoints
(exact resume) and at the end saves, exports and plots. The reference for the overall loop is
open_clip's ``open_clip_train/main.py`` and ``train.py``.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polyclip.train import checkpoint as ckpt
from polyclip.train.augment import build_train_augmentation
from polyclip.train.config import TrainConfig, TrainConfigError
from polyclip.train.data import (
    Collate,
    DataError,
    EpochBatchSampler,
    PairDataset,
    detect_format,
    read_records,
)
from polyclip.train.distributed import (
    DistEnv,
    all_reduce_sum,
    average_gradients,
    barrier,
    cleanup,
    init_distributed,
    no_sync,
    replicated_parameters,
    wrap,
)
from polyclip.train.evaluation import TrainingEvaluator
from polyclip.train.optim import (
    build_optimizer,
    keep_frozen_norms_in_eval,
    learning_rate,
    lock_tower,
    set_learning_rate,
)
from polyclip.train.reporting import RunLogger, plot_metrics
from polyclip.train.step import ContrastiveForward, StepInputs, build_loss, forward_backward

_SKIP_EXAMPLES = 5


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


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        self.config = config.validate()
        self.env: DistEnv = init_distributed(config.distributed, config.device)
        self.run_dir = config.run_dir
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        self.model, self.preprocess, self.tokenizer = self._build_model()
        self.frozen = self._lock_towers()
        self.loss_fn, uses_bias = build_loss(config.loss, self.model)
        if config.model.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.forward = wrap(ContrastiveForward(self.model), self.env)
        self.optimizer = build_optimizer(self.model, config.optim, sharded=self.env.strategy == "fsdp")
        self.replicated = replicated_parameters(self.forward, self.env)
        self.step_inputs = StepInputs(
            forward=self.forward,
            loss_fn=self.loss_fn,
            uses_bias=uses_bias,
            autocast=self._autocast,
            no_sync=lambda: no_sync(self.forward, self.env),
        )
        self._build_data()
        self.evaluator = (
            TrainingEvaluator(config.eval, self.preprocess, self.tokenizer)
            if config.eval.zero_shot or config.eval.retrieval
            else None
        )
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.skipped, self.skipped_examples = 0, []
        if config.checkpoint.resume:
            self._resume(ckpt.resolve_resume(config.checkpoint.resume, self.run_dir))

    # ----------------------------------------------------------------------------------------- set-up

    def _build_model(self):
        import polyclip
        from polyclip.tokenizers import ClipTokenizer, build_tokenizer
        from polyclip.transforms import PRESETS, ImageTransform, PreprocessConfig

        spec = self.config.model
        if spec.pretrained is not None:
            model, preprocess, tokenizer = polyclip.load(spec.pretrained)
            preprocess_config = preprocess.config
        else:
            model = polyclip.create_model(spec.architecture or spec.config)
            preset = PRESETS["siglip" if model.config.uses_sigmoid else "clip"]
            preprocess_config = PreprocessConfig(**{**preset.to_dict(), "image_size": model.image_size})
            tokenizer = None
        if spec.preprocess is not None:
            if spec.preprocess not in PRESETS:
                raise TrainConfigError(
                    f"model.preprocess must be one of {', '.join(PRESETS)}; got {spec.preprocess!r}"
                )
            preprocess_config = PreprocessConfig(
                **{**PRESETS[spec.preprocess].to_dict(), "image_size": model.image_size}
            )
        context = spec.context_length or model.config.text.context_length
        if context > model.config.text.context_length:
            raise TrainConfigError(
                f"model.context_length {context} exceeds the text tower's {model.config.text.context_length} positions"
            )
        if tokenizer is None:
            from polyclip.models import CLIP_VOCAB_SIZE

            if model.config.text.vocab_size != CLIP_VOCAB_SIZE:
                raise TrainConfigError(
                    f"a model trained from scratch with a {model.config.text.vocab_size}-token vocabulary needs its "
                    "own tokenizer files; only CLIP's BPE ("
                    f"{CLIP_VOCAB_SIZE} tokens) is built in. Fine-tune from a checkpoint "
                    "folder that holds its tokenizer (model.pretrained) instead"
                )
            tokenizer = ClipTokenizer(context_length=context)
        elif spec.context_length is not None:
            tokenizer = build_tokenizer({**tokenizer.config, "context_length": context})
        model = model.to(device=self.env.device, dtype=torch.float32).train()
        return model, ImageTransform(preprocess_config), tokenizer

    def _lock_towers(self) -> list[nn.Module]:
        spec, frozen = self.config.model, []
        if spec.lock_image:
            frozen += lock_tower(self.model.visual, spec.lock_image_unlocked_blocks)
        if spec.lock_text:
            frozen += lock_tower(self.model.text, spec.lock_text_unlocked_blocks)
        return frozen

    def _autocast(self):
        if self.config.precision == "bf16":
            return torch.autocast(device_type=self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _build_data(self) -> None:
        data = self.config.data
        self.format = detect_format(data)
        self.augmentation = build_train_augmentation(self.preprocess.config, self.config.augment)
        if data.batch_size % self.env.world_size:
            raise TrainConfigError(
                f"data.batch_size {data.batch_size} must be a multiple of the number of processes ({self.env.world_size})"
            )
        self.local_batch = data.batch_size // self.env.world_size
        micro = self.config.micro_batch_size
        if micro is not None and self.local_batch % micro:
            raise TrainConfigError(
                f"micro_batch_size {micro} must divide the per-process batch {self.local_batch} "
                f"(data.batch_size {data.batch_size} over {self.env.world_size} processes)"
            )
        if self.format == "wds":
            from polyclip.train.shards import count_samples, expand_shards

            self.shards = expand_shards(data.train)
            num_samples = data.samples_per_epoch or count_samples(self.shards)
            self.dataset = None
        else:
            records = read_records(data)
            self.dataset = PairDataset(
                records,
                self.augmentation,
                self.config.seed,
                data.captions,
                data.text_types,
                data.max_bad_in_a_row,
            )
            num_samples = len(records)
        self.num_samples = num_samples
        self.steps_per_epoch = num_samples // data.batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"the training data holds {num_samples} pairs, fewer than one batch of {data.batch_size}: "
                "lower data.batch_size or add data"
            )
        schedule = self.config.schedule
        self.total_steps = schedule.max_steps or max(1, math.ceil(schedule.epochs * self.steps_per_epoch))

    def _loader(self, epoch: int, start_batch: int):
        data = self.config.data
        pin = self.env.device.type == "cuda"
        if self.format == "wds":
            from polyclip.train.shards import ShardStream

            stream = ShardStream(
                self.shards, self.augmentation, self.tokenizer, self.local_batch, self.env.rank, self.env.world_size,
                self.config.seed, epoch, start_batch, data.shuffle_buffer, data.text_types, data.max_bad_in_a_row,
            )  # fmt: skip
            loader = torch.utils.data.DataLoader(
                stream, batch_size=None, num_workers=data.num_workers, pin_memory=pin
            )
            return _take(loader, self.steps_per_epoch - start_batch)
        sampler = EpochBatchSampler(
            len(self.dataset),
            data.batch_size,
            self.env.rank,
            self.env.world_size,
            self.config.seed,
            epoch,
            start_batch,
        )
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=data.num_workers,
            collate_fn=Collate(self.tokenizer),
            pin_memory=pin,
        )

    # ----------------------------------------------------------------------------------------- resume

    def _resume(self, path: Path) -> None:
        weights, state = ckpt.read_checkpoint(path)
        ckpt.load_full_state(
            self.model, self.optimizer, weights, state["optimizer"], self.env.strategy == "fsdp"
        )
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.skipped, self.skipped_examples = state["skipped"], list(state["skipped_examples"])
        rng = state["rng"][min(self.env.rank, len(state["rng"]) - 1)]
        ckpt.set_rng_state(rng)
        self.resumed_from = path

    def _trainer_state(self, optimizer_state: dict) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "skipped": self.skipped,
            "skipped_examples": self.skipped_examples,
            "optimizer": optimizer_state,
            "rng": self._gather_rng(),
            "config": self.config.to_dict(),
        }

    def _gather_rng(self) -> list[dict]:
        state = ckpt.rng_state()
        if not self.env.distributed:
            return [state]
        gathered = [None] * self.env.world_size
        torch.distributed.all_gather_object(gathered, state)
        return gathered

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step (collective: every rank must call it)."""
        model_state, optimizer_state = ckpt.full_state(
            self.model, self.optimizer, self.env.strategy == "fsdp"
        )
        trainer_state = self._trainer_state(optimizer_state)
        path = None
        if self.env.is_main:
            path = ckpt.save_checkpoint(
                self.run_dir, self.step, model_state, self.model.config, self.preprocess, self.tokenizer,
                trainer_state, self.config.checkpoint.keep_last,
            )  # fmt: skip
        barrier(self.env)
        return path

    # ----------------------------------------------------------------------------------------- steps

    def train_step(self, pixels: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, float]:
        """One optimiser step on this rank's batch; returns (loss, gradient norm before clipping)."""
        self.model.train()
        keep_frozen_norms_in_eval(self.frozen)
        device = self.env.device
        pixels = pixels.to(device, non_blocking=True)
        token_ids = token_ids.to(device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        set_learning_rate(self.optimizer, self.current_lr())
        loss = forward_backward(self.step_inputs, pixels, token_ids, self.config.micro_batch_size)
        average_gradients(self.replicated, self.env)
        grad_norm = clip_gradients(self.model.parameters(), self.config.optim.grad_clip_norm)
        self.optimizer.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, self.model.config.logit_scale_max)
        return loss, grad_norm

    def current_lr(self) -> float:
        return learning_rate(self.step, self.config.optim.lr, self.total_steps, self.config.schedule)

    def evaluate(self) -> dict[str, float]:
        """Evaluation metrics of the current weights (rank 0; every rank under FSDP)."""
        if self.evaluator is None:
            return {}
        metrics = {}
        if self.env.is_main or self.env.strategy == "fsdp":
            metrics = self.evaluator(self.model)
            self.model.train()
            keep_frozen_norms_in_eval(self.frozen)
        barrier(self.env)
        return metrics

    # ----------------------------------------------------------------------------------------- loop

    def fit(self) -> TrainResult:
        config, env = self.config, self.env
        started = time.perf_counter()
        logger = RunLogger(self.run_dir, config.log, self.total_steps, env.is_main, self.step)
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(config.to_json() + "\n")
            logger.write(
                f"training {self.total_steps} steps ({self.steps_per_epoch} per epoch over {self.num_samples} pairs), "
                f"batch {config.data.batch_size} on {env.world_size} process(es), {env.device}, {config.precision}"
            )
        eval_metrics: dict[str, float] = {}
        last_loss = float("nan")
        window_losses, window_start, window_samples = [], time.perf_counter(), 0
        saved_at = evaluated_at = -1
        try:
            while self.step < self.total_steps:
                for batch in self._loader(self.epoch, self.batch_in_epoch):
                    loss, grad_norm = self.train_step(batch.pixels, batch.token_ids)
                    self.step += 1
                    self.batch_in_epoch += 1
                    window_losses.append(loss)
                    window_samples += len(batch) * env.world_size
                    self._count_skips(batch.skipped, logger)
                    logger.advance()
                    if self.step % config.log.every_steps == 0 or self.step == self.total_steps:
                        last_loss = self._log_train(
                            logger, window_losses, window_samples, window_start, grad_norm
                        )
                        window_losses, window_start, window_samples = [], time.perf_counter(), 0
                    if config.eval.every_steps and self.step % config.eval.every_steps == 0:
                        eval_metrics, evaluated_at = self._log_eval(logger), self.step
                    if config.checkpoint.every_steps and self.step % config.checkpoint.every_steps == 0:
                        self.save_checkpoint()
                        saved_at = self.step
                    if self.step >= self.total_steps or self.batch_in_epoch >= self.steps_per_epoch:
                        break
                if self.batch_in_epoch >= self.steps_per_epoch:  # an epoch ended
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    every = config.eval.every_epochs
                    if every and self.epoch % every == 0 and evaluated_at != self.step:
                        eval_metrics, evaluated_at = self._log_eval(logger), self.step
                    if saved_at != self.step and self.step < self.total_steps:
                        self.save_checkpoint()
                        saved_at = self.step
            if window_losses:
                last_loss = self._log_train(logger, window_losses, window_samples, window_start, float("nan"))
            if self.evaluator is not None and evaluated_at != self.step:
                eval_metrics = self._log_eval(logger)
            if saved_at != self.step:
                self.save_checkpoint()
            result = self._finish(logger, eval_metrics, last_loss)
        finally:
            logger.close()
        result.seconds = time.perf_counter() - started
        return result

    def _count_skips(self, skipped: list[str], logger: RunLogger) -> None:
        if not skipped:
            return
        self.skipped += len(skipped)
        for reason in skipped:
            if len(self.skipped_examples) < _SKIP_EXAMPLES:
                self.skipped_examples.append(reason)
                logger.write(f"skipped an unreadable image: {reason}")

    def _log_train(self, logger: RunLogger, losses: list, samples: int, since: float, grad_norm) -> float:
        local_mean = float(torch.stack(losses).float().mean()) if losses else float("nan")
        total_loss, skipped = all_reduce_sum([local_mean, float(self.skipped)], self.env)
        # the losses' convention: the mean of the per-rank values is the loss of the global batch
        loss = total_loss / self.env.world_size
        elapsed = max(time.perf_counter() - since, 1e-9)
        metrics = {
            "loss": loss,
            "lr": learning_rate(self.step - 1, self.config.optim.lr, self.total_steps, self.config.schedule),
            "logit_scale": float(self.model.logit_scale.detach().exp()),
            "grad_norm": float(grad_norm),
            "epoch": self.epoch + self.batch_in_epoch / self.steps_per_epoch,
            "samples_per_second": samples / elapsed,
            "skipped_images": int(skipped),
        }
        if self.model.logit_bias is not None:
            metrics["logit_bias"] = float(self.model.logit_bias.detach())
        logger.log(self.step, "train", metrics)
        return loss

    def _log_eval(self, logger: RunLogger) -> dict[str, float]:
        metrics = self.evaluate()
        if metrics:
            logger.log(self.step, "eval", metrics)
            shown = ", ".join(
                f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith(("accuracy", "R@1", "R@5"))
            )
            logger.write(f"step {self.step}: {shown}")
        return metrics

    def _finish(self, logger: RunLogger, eval_metrics: dict, last_loss: float) -> TrainResult:
        import polyclip

        config, env = self.config, self.env
        sharded = env.strategy == "fsdp"
        model_state = ckpt.full_state(self.model, None, sharded)[0] if sharded else None  # collective
        skipped = int(all_reduce_sum([float(self.skipped)], env)[0])
        result = TrainResult(
            self.run_dir, None, self.step, last_loss, eval_metrics, skipped, self.skipped_examples
        )
        if env.is_main:
            final = self._cpu_model(model_state)
            result.model_dir = polyclip.save(final, self.preprocess, self.tokenizer, self.run_dir / "model")
            result.exports = self._export(final)
            for alpha in config.checkpoint.wise_ft_alphas:
                result.exports[f"wise_ft_{alpha:g}"] = self._save_wise_ft(final, alpha, logger)
            if config.log.plots:
                plot_metrics(self.run_dir)
            summary = {
                "steps": self.step, "loss": last_loss, "skipped_images": skipped,
                "skipped_examples": self.skipped_examples, "eval": eval_metrics,
                "model": str(result.model_dir), "exports": {k: str(v) for k, v in result.exports.items()},
            }  # fmt: skip
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            if skipped:
                logger.write(
                    f"{skipped} unreadable image(s) were skipped and replaced; e.g. {self.skipped_examples[0]}"
                )
        barrier(env)
        return result

    def _cpu_model(self, model_state: dict | None) -> nn.Module:
        """The trained model, whole: the model itself, or (FSDP) a copy built from the gathered weights."""
        import polyclip

        if model_state is None:
            return self.model
        model = polyclip.create_model(self.model.config)
        model.load_state_dict(model_state, strict=True)
        return model

    def _export(self, model: nn.Module) -> dict[str, Path]:
        checkpoint = self.config.checkpoint
        if not (checkpoint.export_hf or checkpoint.export_open_clip):
            return {}
        from polyclip.checkpoints.export import export_hf, export_open_clip

        exports = {}
        if checkpoint.export_hf:
            exports["hf"] = export_hf(model, self.run_dir / "export_hf", self.preprocess.config)
        if checkpoint.export_open_clip:
            exports["open_clip"] = export_open_clip(
                model, self.run_dir / "export_open_clip", self.preprocess.config
            )
        return exports

    def _save_wise_ft(self, model: nn.Module, alpha: float, logger: RunLogger) -> Path:
        import polyclip
        from polyclip.train.wise_ft import wise_ft

        zero_shot, _, _ = polyclip.load(self.config.model.pretrained)
        mixed = wise_ft(zero_shot, model, alpha)
        folder = polyclip.save(mixed, self.preprocess, self.tokenizer, self.run_dir / f"wise_ft_{alpha:g}")
        if self.evaluator is not None:
            metrics = self.evaluator(mixed.to(self.env.device))
            logger.log(self.step, "eval", {f"wise_ft_{alpha:g}/{k}": v for k, v in metrics.items()})
        return folder

    def close(self) -> None:
        cleanup(self.env)


def _take(loader, count: int):
    """The first ``count`` batches of an endless loader, then its workers are shut down."""
    iterator = iter(loader)
    try:
        for _ in range(count):
            yield next(iterator)
    finally:
        del iterator


def clip_gradients(parameters, max_norm: float | None) -> float:
    """Total gradient norm (over sharded and replicated parameters alike), clipped to ``max_norm``."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without the distributed package
        DTensor = ()  # noqa: N806
    squares = []
    for group in (
        [g for g in grads if isinstance(g, DTensor)],
        [g for g in grads if not isinstance(g, DTensor)],
    ):
        if group:
            norm = torch.nn.utils.get_total_norm(group, norm_type=2.0)
            norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
            squares.append(norm.float().cpu() ** 2)
    total = float(torch.stack(squares).sum().sqrt())
    if max_norm is not None and math.isfinite(total) and total > max_norm:
        coefficient = max_norm / (total + 1e-6)
        for grad in grads:
            grad.mul_(coefficient)
    return total


def train(config: TrainConfig) -> TrainResult:
    """Train with ``config`` and return the result (the final model is saved under the run folder)."""
    trainer = Trainer(config)
    try:
        return trainer.fit()
    finally:
        trainer.close()
