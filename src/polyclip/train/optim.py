"""Optimiser, learning-rate schedule and locked towers.

- AdamW ("Decoupled Weight Decay Regularization", 2019) with two parameter groups, as open_clip's ``main.py``: weight
  decay on matrices, none on norms, biases, embeddings (token, position, class token, attention-pool
  probe) or the logit scale and bias. ``name="adam"`` adds the decay to the gradient instead
  (torch.optim.Adam's L2 penalty), which is what PubMedCLIP trained with.
- Linear warm-up from 0 to the base rate, then cosine decay to ``min_lr`` (open_clip's
  ``cosine_lr``), linear decay (transformers' ``linear`` schedule) or a constant rate, as a pure function of the step so that resuming needs only the step number.
- LiT ("LiT: Zero-Shot Transfer with Locked-image text Tuning", 2022): a locked tower's
  weights do not train; ``unlocked_blocks=N`` lets its last N blocks and everything after them
  (final norm, pooling head, projection) train, as open_clip's ``lock_image(unlocked_groups)``.
  BatchNorm layers of locked parts stay in eval mode, keeping their running statistics.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from polyclip.train.config import OptimConfig, ScheduleConfig, TrainConfigError

_EMBEDDING_NAMES = (
    "pos_embed",
    "positional_embedding",
    "class_embedding",
    "probe",
    "logit_scale",
    "logit_bias",
)


def no_decay(name: str, parameter: nn.Parameter, embedding_weights: set[int]) -> bool:
    """Norm weights, biases, embeddings, logit scale/bias: trained without weight decay."""
    return parameter.ndim < 2 or id(parameter) in embedding_weights or name.split(".")[-1] in _EMBEDDING_NAMES


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, plain = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (plain if no_decay(name, parameter, embedding_weights) else decay).append(parameter)
    if not decay and not plain:
        raise TrainConfigError("every parameter is locked: nothing would train (check model.lock_*)")
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": plain, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(model: nn.Module, config: OptimConfig, sharded: bool = False) -> torch.optim.Optimizer:
    """AdamW/Adam over the trainable parameters; "auto" picks the fused kernel (one pass over the
    weights, several times faster on CPU than the per-tensor loop), and foreach for sharded weights."""
    groups = parameter_groups(model, config.weight_decay)
    options = {}
    if config.implementation == "fused" or (config.implementation == "auto" and not sharded):
        options["fused"] = True
    elif config.implementation == "foreach" or config.implementation == "auto":
        options["foreach"] = True
    elif config.implementation == "for-loop":
        options["foreach"] = False
    optimizer_class = torch.optim.AdamW if config.name == "adamw" else torch.optim.Adam
    return optimizer_class(groups, lr=config.lr, betas=config.betas, eps=config.eps, **options)


def learning_rate(step: int, base_lr: float, total_steps: int, schedule: ScheduleConfig) -> float:
    """The rate for optimiser step ``step`` (0-based): warm-up, then cosine or constant."""
    warmup = min(schedule.warmup_steps, total_steps)
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule.decay == "constant":
        return base_lr
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    if schedule.decay == "linear":
        return base_lr + (schedule.min_lr - base_lr) * progress
    return schedule.min_lr + 0.5 * (base_lr - schedule.min_lr) * (1 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---------------------------------------------------------------------------------------------------------
# LiT


def tower_parts(tower: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(blocks in order, the modules after them) of an image or text tower."""
    if hasattr(tower, "transformer"):
        blocks = list(tower.transformer.blocks)
        after = [getattr(tower, name, None) for name in ("norm", "head", "proj")]
    elif hasattr(tower, "stages"):  # ModifiedResNet: its stages are the blocks, attention pooling after
        blocks = list(tower.stages)
        after = [tower.attnpool]
    else:
        raise TrainConfigError(f"cannot lock a {type(tower).__name__}: unknown tower layout")
    return blocks, [m for m in after if isinstance(m, nn.Module)]


def lock_tower(tower: nn.Module, unlocked_blocks: int = 0) -> list[nn.Module]:
    """Freeze ``tower`` except its last ``unlocked_blocks`` blocks (and what follows them).

    Returns the modules that stay frozen, so that the trainer keeps their BatchNorm layers in eval mode.
    """
    blocks, after = tower_parts(tower)
    if unlocked_blocks > len(blocks):
        raise TrainConfigError(f"cannot unlock {unlocked_blocks} blocks: the tower has {len(blocks)}")
    for parameter in tower.parameters():
        parameter.requires_grad_(False)
    if unlocked_blocks == 0:
        return [tower]
    trainable = blocks[len(blocks) - unlocked_blocks :] + after
    for module in trainable:
        for parameter in module.parameters():
            parameter.requires_grad_(True)
    trainable_ids = {id(m) for module in trainable for m in module.modules()}
    return [m for m in tower.modules() if id(m) not in trainable_ids and not list(m.children())]


def keep_frozen_norms_in_eval(frozen: list[nn.Module]) -> None:
    """Call after ``model.train()``: frozen BatchNorms keep using (and keeping) their running statistics."""
    for module in frozen:
        for sub in module.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                sub.eval()


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
