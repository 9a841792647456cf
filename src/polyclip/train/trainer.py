"""The training loop: one code path for a laptop CPU, one GPU, or many GPUs on many machines.

``Trainer(config).fit()`` builds the model (`polyclip.train.setup`), wraps it for DDP or FSDP2,
reads the data (`polyclip.train.loaders`), resumes if asked, and then for each step: draws this
rank's slice of the global batch, computes the contrastive loss of the whole batch (exactly, even
with micro-batches: `polyclip.train.step`), clips gradients, steps AdamW with warm-up + cosine, and
clamps the logit scale at ``log(100)`` as CLIP does. Around the loop it logs (with the time spent
waiting for data beside the throughput), evaluates and checkpoints (exact resume); the end of the run
is `polyclip.train.finish`. The reference for the overall loop is open_clip's
``open_clip_train/main.py`` and ``train.py``.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch

from polyclip.train import checkpoint as ckpt
from polyclip.train.config import TrainConfig
from polyclip.train.distributed import (
    DistEnv,
    all_reduce_sum,
    average_gradients,
    barrier,
    cleanup,
    init_distributed,
    name_failed_ranks,
    no_sync,
    replicated_parameters,
    wrap,
)
from polyclip.train.evaluation import TrainingEvaluator
from polyclip.train.finish import TrainResult, finish_run
from polyclip.train.loaders import TrainingData
from polyclip.train.optim import (
    build_optimizer,
    clip_gradients,
    keep_frozen_norms_in_eval,
    learning_rate,
    set_learning_rate,
)
from polyclip.train.reporting import RunLogger
from polyclip.train.setup import build_model, lock_towers
from polyclip.train.state import SkipLog, check_resume
from polyclip.train.step import ContrastiveForward, StepInputs, build_loss, forward_backward

__all__ = ["Trainer", "TrainResult", "train"]


class _Window:
    """What happened since the last log line: losses, samples, and the seconds spent waiting for data."""

    def __init__(self) -> None:
        self.losses, self.samples, self.data_wait, self.start = [], 0, 0.0, time.perf_counter()


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        self.config = config.validate()
        self.env: DistEnv = init_distributed(config.distributed, config.device)
        self.run_dir = config.run_dir
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        self.model, self.preprocess, self.tokenizer = build_model(config.model, self.env.device)
        self.frozen = lock_towers(self.model, config.model)
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
        self.data = TrainingData(config, self.env, self.preprocess.config, self.tokenizer)
        self.steps_per_epoch, self.total_steps = self.data.steps_per_epoch, self.data.total_steps
        self.evaluator = (
            TrainingEvaluator(config.eval, self.preprocess, self.tokenizer)
            if config.eval.zero_shot or config.eval.retrieval
            else None
        )
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.skips = SkipLog()
        if config.checkpoint.resume:
            self._resume(ckpt.resolve_resume(config.checkpoint.resume, self.run_dir))

    def _autocast(self):
        if self.config.precision == "bf16":
            return torch.autocast(device_type=self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ----------------------------------------------------------------------------------------- resume

    def _resume(self, path: Path) -> None:
        weights, state = ckpt.read_checkpoint(path)
        check_resume(state, self.data.format, self.config.data.num_workers, self.env.world_size)
        ckpt.load_full_state(
            self.model, self.optimizer, weights, state["optimizer"], self.env.strategy == "fsdp"
        )
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.skips.load(state)
        rng = state["rng"][min(self.env.rank, len(state["rng"]) - 1)]
        ckpt.set_rng_state(rng)
        self.resumed_from = path

    def _trainer_state(self, optimizer_state: dict) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            **self.skips.state(),
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

    def save_checkpoint(self, logger: RunLogger | None = None) -> Path | None:
        """Write a checkpoint of the current step (collective: every rank must call it)."""
        self._gather_skips(logger)
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
                f"training {self.total_steps} steps ({self.steps_per_epoch} per epoch over "
                f"{self.data.num_samples} pairs), batch {config.data.batch_size} on {env.world_size} "
                f"process(es), {env.device}, {config.precision}"
            )
        try:
            with name_failed_ranks(env):
                result = self._loop(logger)
        finally:
            logger.close()
        result.seconds = time.perf_counter() - started
        return result

    def _loop(self, logger: RunLogger) -> TrainResult:
        config = self.config
        eval_metrics: dict[str, float] = {}
        last_loss = float("nan")
        window = _Window()
        saved_at = evaluated_at = -1
        while self.step < self.total_steps:
            batches = iter(self.data.loader(self.epoch, self.batch_in_epoch))
            while True:
                waited = time.perf_counter()
                batch = next(batches, None)
                window.data_wait += time.perf_counter() - waited
                if batch is None:
                    break
                loss, grad_norm = self.train_step(batch.pixels, batch.token_ids)
                self.step += 1
                self.batch_in_epoch += 1
                window.losses.append(loss)
                window.samples += len(batch) * self.env.world_size
                self.skips.record(batch.skipped)
                logger.advance()
                if self.step % config.log.every_steps == 0 or self.step == self.total_steps:
                    last_loss = self._log_train(logger, window, grad_norm)
                    window = _Window()
                if config.eval.every_steps and self.step % config.eval.every_steps == 0:
                    eval_metrics, evaluated_at = self._log_eval(logger), self.step
                if config.checkpoint.every_steps and self.step % config.checkpoint.every_steps == 0:
                    self.save_checkpoint(logger)
                    saved_at = self.step
                if self.step >= self.total_steps or self.batch_in_epoch >= self.steps_per_epoch:
                    break
            del batches  # shuts the epoch's workers down
            if self.batch_in_epoch >= self.steps_per_epoch:  # an epoch ended
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                every = config.eval.every_epochs
                if every and self.epoch % every == 0 and evaluated_at != self.step:
                    eval_metrics, evaluated_at = self._log_eval(logger), self.step
                if saved_at != self.step and self.step < self.total_steps:
                    self.save_checkpoint(logger)
                    saved_at = self.step
        if window.losses:
            last_loss = self._log_train(logger, window, float("nan"))
        if self.evaluator is not None and evaluated_at != self.step:
            eval_metrics = self._log_eval(logger)
        if saved_at != self.step:
            self.save_checkpoint(logger)
        return finish_run(
            config, self.env, self.model, self.preprocess, self.tokenizer, self.evaluator, self.skips,
            logger, self.step, eval_metrics, last_loss,
        )  # fmt: skip

    def _gather_skips(self, logger: RunLogger | None) -> None:
        for reason in self.skips.gather(self.env):  # collective
            if logger is not None:
                logger.write(f"skipped an unreadable image: {reason}")

    def _log_train(self, logger: RunLogger, window: _Window, grad_norm) -> float:
        local_mean = float(torch.stack(window.losses).float().mean()) if window.losses else float("nan")
        total_loss, data_wait = all_reduce_sum([local_mean, window.data_wait], self.env)
        self._gather_skips(logger)
        # the losses' convention: the mean of the per-rank values is the loss of the global batch
        loss = total_loss / self.env.world_size
        elapsed = max(time.perf_counter() - window.start, 1e-9)
        metrics = {
            "loss": loss,
            "lr": learning_rate(self.step - 1, self.config.optim.lr, self.total_steps, self.config.schedule),
            "logit_scale": float(self.model.logit_scale.detach().exp()),
            "grad_norm": float(grad_norm),
            "epoch": self.epoch + self.batch_in_epoch / self.steps_per_epoch,
            "samples_per_second": window.samples / elapsed,
            # the share of the time the training loop waited for the data loader (mean over ranks):
            # near 0 the loader keeps up; near 1 add data.num_workers or faster storage
            "data_wait_fraction": min(1.0, data_wait / self.env.world_size / elapsed),
            "skipped_images": self.skips.total,
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

    def close(self) -> None:
        cleanup(self.env)


def train(config: TrainConfig) -> TrainResult:
    """Train with ``config`` and return the result (the final model is saved under the run folder)."""
    trainer = Trainer(config)
    try:
        return trainer.fit()
    finally:
        trainer.close()
