"""Training and evaluation of the medical VQA model, with the reference's recipe
(``MEVF_PubMedCLIP/train.py``, ``trainer.py``, ``run_pubmedclip.sh``): Adamax at lr 0.002, batch 32,
20 epochs; the learning rate is 0.5, 1, 1.5, 2 x lr over the first four epochs, then multiplied by
0.75 at epochs 10, 12, 14, 16 and 18; gradients clipped to a total norm of 0.25.

Loss (``trainer.py``): (BCE-with-logits summed over the batch and the answers
+ 0.001 x the autoencoder's mean squared reconstruction error) / batch size. The reconstruction
target is the clean grey image (the reference adds no noise during VQA training;
``autoencoder_noise`` adds MEVF's denoising corruption to the autoencoder's input if wanted).
The reference picks its best epoch on the test set; here the best epoch is chosen on ``eval_set``
when one is given.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from polyclip.domains.medvqa.autoencoder import add_noise
from polyclip.domains.medvqa.data import MedVQADataset
from polyclip.domains.medvqa.errors import MedVQAConfigError
from polyclip.domains.medvqa.metrics import AccuracyReport, accuracy_by_type, answer_scores
from polyclip.domains.medvqa.pipeline import MedVQA
from polyclip.progress import progress_bar

OPTIMIZERS = ("adamax", "adamw")


@dataclass
class TrainConfig:
    epochs: int = 20  # main.py --epochs
    batch_size: int = 32  # run_pubmedclip.sh (ViT-B/32 and RN50; RN50x4 used 16)
    lr: float = 0.002  # run_pubmedclip.sh --lr
    optimizer: str = "adamax"  # the reference's; "adamw" as an alternative
    weight_decay: float = 0.0  # adamw only; Adamax runs without
    warmup_factors: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)  # lr multipliers of the first epochs
    decay_epochs: tuple[int, ...] = (10, 12, 14, 16, 18)  # range(10, 20, 2)
    decay_rate: float = 0.75
    grad_clip: float = 0.25  # --clip_norm; 0 disables
    autoencoder_weight: float = 0.001  # --ae_alpha
    autoencoder_noise: float = 0.0  # std of Gaussian noise on the autoencoder input (MEVF pre-training: 0.1)
    freeze_clip: bool = False  # the reference trains the CLIP tower too
    seed: int = 1204  # main.py --seed
    device: str | None = None  # None: cuda when available, else cpu
    num_workers: int = 0
    keep_best: bool = True  # with an eval set, end with the weights of the best epoch

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise MedVQAConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise MedVQAConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise MedVQAConfigError(f"lr must be a positive number, got {self.lr}")
        if self.grad_clip < 0 or self.autoencoder_weight < 0 or self.autoencoder_noise < 0:
            raise MedVQAConfigError(
                "grad_clip, autoencoder_weight and autoencoder_noise must be non-negative"
            )


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """The reference's per-epoch learning rate (epochs count from 0)."""
    warmup = config.warmup_factors
    if epoch < len(warmup):
        return config.lr * warmup[epoch]
    after_warmup = config.lr * (warmup[-1] if warmup else 1.0)
    decays = sum(1 for e in config.decay_epochs if len(warmup) <= e <= epoch)
    return after_warmup * config.decay_rate**decays


@dataclass
class LossParts:
    total: torch.Tensor  # what is minimised
    answer: torch.Tensor  # BCE summed over the batch
    reconstruction: torch.Tensor  # mean squared error (0 without autoencoder)


def medvqa_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    reconstruction: torch.Tensor | None = None,
    clean_pixels: torch.Tensor | None = None,
    autoencoder_weight: float = 0.001,
) -> LossParts:
    """(BCE_sum(logits (B, A), targets (B, A)) + w * MSE(reconstruction, clean (B, 1, s, s))) / B."""
    answer = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="sum")
    if reconstruction is None:
        mse = logits.new_zeros(())
    else:
        mse = F.mse_loss(reconstruction.float(), clean_pixels.float())
    total = (answer + autoencoder_weight * mse) / logits.shape[0]
    return LossParts(total, answer, mse)


@dataclass
class EvaluationResult:
    report: AccuracyReport
    predictions: list[dict]  # qid, question, answer, predicted, score, correct per question


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # per epoch: lr, loss, accuracies
    best_epoch: int | None = None
    best_accuracy: float | None = None


def _device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _loader(dataset: MedVQADataset, batch_size: int, shuffle: bool, workers: int, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        generator=generator,
        drop_last=False,
    )


@torch.no_grad()
def evaluate(
    vqa: MedVQA,
    dataset: MedVQADataset,
    batch_size: int = 64,
    device: str | None = None,
    num_workers: int = 0,
    progress: bool = False,
) -> EvaluationResult:
    """Accuracy on closed, open and all questions of ``dataset``, with every prediction.

    ``progress``: a bar on a terminal (`polyclip.progress`)."""
    model = vqa.model.to(_device(device) if device else vqa.model.device).eval()
    predictions: list[dict] = []
    scores: list[float] = []
    loader = _loader(dataset, batch_size, False, num_workers, 0)
    for batch in progress_bar(loader, desc="answering", unit="batch", enabled=progress):
        logits = model(
            batch["clip_pixels"].to(model.device), batch["ae_pixels"].to(model.device),
            batch["question_ids"].to(model.device),
        ).logits.float().cpu()  # fmt: skip
        batch_scores = answer_scores(logits, batch["target"])
        best_scores, labels = logits.sigmoid().max(dim=1)
        for index, label, score, correct in zip(batch["index"], labels, best_scores, batch_scores):
            record = dataset.records[int(index)]
            scores.append(float(correct))
            predictions.append({
                "qid": record.qid, "image_name": record.image_name, "question": record.question,
                "answer": record.answer, "answer_type": record.answer_type,
                "question_type": record.question_type, "predicted": vqa.answers.answer(int(label)),
                "score": float(score), "correct": float(correct),
            })  # fmt: skip
    if not predictions:
        raise MedVQAConfigError("the evaluation set is empty")
    report = accuracy_by_type(
        scores, [p["answer_type"] for p in predictions], [p["question_type"] for p in predictions]
    )
    return EvaluationResult(report, predictions)


def train(
    vqa: MedVQA,
    train_set: MedVQADataset,
    eval_set: MedVQADataset | None = None,
    config: TrainConfig | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train ``vqa.model`` in place with the reference recipe; returns the per-epoch history.

    ``log`` gets a line per epoch; ``progress`` adds a bar over each epoch's batches on a terminal."""
    config = config or TrainConfig()
    if len(train_set) == 0:
        raise MedVQAConfigError("the training set is empty")
    torch.manual_seed(config.seed)
    model = vqa.model.to(_device(config.device))
    device = model.device
    for parameter in model.clip_visual.parameters():
        parameter.requires_grad_(not config.freeze_clip)
    parameters = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adamax":
        optimizer = torch.optim.Adamax(parameters, lr=config.lr)
    else:
        optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    loader = _loader(train_set, config.batch_size, True, config.num_workers, config.seed)
    noise = torch.Generator(device=device).manual_seed(config.seed)
    result = TrainResult()
    best_state = None
    for epoch in range(config.epochs):
        lr = learning_rate(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        if config.freeze_clip:
            model.clip_visual.eval()  # frozen batch-norm statistics for ResNet towers
        totals = {"loss": 0.0, "answer": 0.0, "reconstruction": 0.0, "correct": 0.0, "count": 0}
        bar = progress_bar(loader, desc=f"epoch {epoch + 1}", unit="batch", enabled=progress)
        for batch in bar:
            clean = batch["ae_pixels"].to(device)
            ae_input = (
                add_noise(clean, config.autoencoder_noise, noise) if config.autoencoder_noise else clean
            )
            targets = batch["target"].to(device)
            output = model(batch["clip_pixels"].to(device), ae_input, batch["question_ids"].to(device))
            loss = medvqa_loss(
                output.logits, targets, output.reconstruction, clean, config.autoencoder_weight
            )
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
            optimizer.step()
            size = targets.shape[0]
            totals["loss"] += float(loss.total.detach()) * size
            totals["answer"] += float(loss.answer.detach())
            totals["reconstruction"] += float(loss.reconstruction.detach()) * size
            totals["correct"] += float(answer_scores(output.logits.detach(), targets).sum())
            totals["count"] += size
        count = totals["count"]
        entry = {
            "epoch": epoch, "lr": lr, "loss": totals["loss"] / count, "answer_bce": totals["answer"] / count,
            "reconstruction_mse": totals["reconstruction"] / count, "train_accuracy": totals["correct"] / count,
        }  # fmt: skip
        if eval_set is not None:
            report = evaluate(vqa, eval_set, batch_size=max(config.batch_size, 32)).report
            entry.update(eval_overall=report.overall, eval_closed=report.closed, eval_open=report.open)
            if result.best_accuracy is None or report.overall > result.best_accuracy:
                result.best_epoch, result.best_accuracy = epoch, report.overall
                if config.keep_best:
                    best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        result.history.append(entry)
        if log is not None:
            log(
                " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in entry.items()
                    if v is not None
                )
            )
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return result


__all__ = [
    "EvaluationResult",
    "LossParts",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "learning_rate",
    "medvqa_loss",
    "train",
]
