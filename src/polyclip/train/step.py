"""One optimisation step's forward and backward: in one piece, or with exact gradient accumulation.

Exact accumulation follows GradCache ("Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup", 2021; open_clip's accumulation in ``train_one_epoch`` does the same):

1. encode every micro-batch without gradients and keep only the features, (B, E) per tower;
2. compute the contrastive loss of the whole batch on those features as graph leaves, and its
   gradients dL/d(features) and dL/d(scale, bias);
3. encode each micro-batch again with gradients and back-propagate
   ``sum(features * dL/d(features))`` (plus ``scale * dL/dscale + bias * dL/dbias`` once), whose
   gradient with respect to every weight is that micro-batch's share of dL/dweights.

The loss therefore sees every negative of the full batch (unlike averaging per-micro-batch losses),
the weight gradients equal the one-step gradients, and activation memory is one micro-batch's. The
price is a second forward pass. Under DDP, micro-batches before the last skip the gradient all-reduce
(``no_sync``); the last one all-reduces the accumulated gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from polyclip.losses import ClipLoss, SigLipLoss
from polyclip.train.config import LossConfig, TrainConfigError


class ContrastiveForward(nn.Module):
    """The module DDP and FSDP wrap: (pixels, token ids) -> normalised features, scale and bias.

    Returning the scale and bias from the wrapped forward keeps them inside the graph DDP tracks.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor, token_ids: torch.Tensor):
        image = self.model.encode_image(pixels, normalize=True)  # (B, E)
        text = self.model.encode_text(token_ids, normalize=True)  # (B, E)
        scale = self.model.logit_scale.exp()  # () the temperature itself; the log is clamped after each step
        return image, text, scale, self.model.logit_bias


def build_loss(config: LossConfig, model: nn.Module) -> tuple[nn.Module, bool]:
    """(loss module, whether it takes the logit bias) for ``model``."""
    has_bias = getattr(model, "logit_bias", None) is not None
    kind = config.kind if config.kind != "auto" else ("siglip" if has_bias else "clip")
    if kind == "siglip":
        if not has_bias:
            raise TrainConfigError(
                "loss.kind=siglip needs a model with a logit bias (a SigLIP-style config, init_logit_bias set)"
            )
        return SigLipLoss(chunk_size=config.chunk_size, bidirectional=config.bidirectional), True
    if config.chunk_size is not None:
        raise TrainConfigError("loss.chunk_size applies to the sigmoid loss only")
    if has_bias:
        # The softmax loss ignores the bias; a trainable but unused bias breaks DDP (open_clip #1076).
        model.logit_bias.requires_grad_(False)
    return ClipLoss(local_loss=config.local_loss, gather_with_grad=config.gather_with_grad), False


@dataclass
class StepInputs:
    forward: nn.Module  # ContrastiveForward, possibly inside DDP
    loss_fn: nn.Module
    uses_bias: bool
    autocast: Callable[[], contextlib.AbstractContextManager]
    no_sync: Callable[[], contextlib.AbstractContextManager]  # skip the gradient all-reduce


def _loss(inputs: StepInputs, image, text, scale, bias) -> torch.Tensor:
    if inputs.uses_bias:
        return inputs.loss_fn(image, text, scale, bias)
    return inputs.loss_fn(image, text, scale)


def forward_backward(
    inputs: StepInputs, pixels: torch.Tensor, token_ids: torch.Tensor, micro_batch_size: int | None = None
) -> torch.Tensor:
    """Accumulate the gradients of one contrastive batch into ``.grad``; returns the loss (detached)."""
    batch = pixels.shape[0]
    if micro_batch_size is None or micro_batch_size >= batch:
        with inputs.autocast():
            image, text, scale, bias = inputs.forward(pixels, token_ids)
        loss = _loss(inputs, image, text, scale, bias)
        loss.backward()
        return loss.detach()
    if batch % micro_batch_size:
        raise TrainConfigError(f"micro-batch {micro_batch_size} does not divide the local batch {batch}")
    pixel_chunks = pixels.split(micro_batch_size)
    token_chunks = token_ids.split(micro_batch_size)

    # 1. features of the whole batch, no activations kept
    with torch.no_grad(), inputs.autocast():
        encoded = [inputs.forward(p, t) for p, t in zip(pixel_chunks, token_chunks)]
    image_all = torch.cat([e[0] for e in encoded]).requires_grad_()  # (B, E) graph leaf
    text_all = torch.cat([e[1] for e in encoded]).requires_grad_()  # (B, E)
    _, _, scale, bias = encoded[0]
    scale_leaf = scale.detach().requires_grad_()
    bias_leaf = bias.detach().requires_grad_() if bias is not None and inputs.uses_bias else None
    del encoded

    # 2. the full-batch loss and its gradients with respect to the features, scale and bias
    loss = _loss(inputs, image_all, text_all, scale_leaf, bias_leaf)
    loss.backward()
    image_grads = image_all.grad.split(micro_batch_size)
    text_grads = text_all.grad.split(micro_batch_size)

    # 3. recompute each micro-batch with gradients and push the cached feature gradients through it
    last = len(pixel_chunks) - 1
    for k, (p, t) in enumerate(zip(pixel_chunks, token_chunks)):
        with inputs.no_sync() if k < last else contextlib.nullcontext():
            with inputs.autocast():
                image, text, scale, bias = inputs.forward(p, t)
            surrogate = _dot(image, image_grads[k]) + _dot(text, text_grads[k])
            if k == last:  # the scale and bias enter once; the last pass is the one DDP reduces
                surrogate = surrogate + scale * scale_leaf.grad
                if bias_leaf is not None:
                    surrogate = surrogate + bias * bias_leaf.grad
            surrogate.backward()
    return loss.detach()


def _dot(features: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    if not features.requires_grad:  # a fully locked tower
        return features.new_zeros((), dtype=torch.float32)
    return (features.float() * grads.float()).sum()
