"""Contrastive losses for dual encoders: CLIP's softmax loss and SigLIP's sigmoid loss.

Papers:
- "Learning Transferable Visual Models From Natural Language Supervision" (CLIP, arXiv:2103.00020):
  symmetric cross-entropy over the image->text and text->image similarity logits.
- "Sigmoid Loss for Language Image Pre-Training" (SigLIP, arXiv:2303.15343): an independent
  binary classification per image-text pair, its chunked multi-device form (text features
  travel around a ring of devices) and the bias term.

Reference implementations matched: open_clip `src/open_clip/loss.py` (`ClipLoss`, `SigLipLoss`
and its neighbour exchange) and big_vision `big_vision/trainers/proj/image_text/siglip.py`.

Both losses take L2-normalised features and `logit_scale` as the scale itself (the exponential of
the log value the model stores), as open_clip does. Logits are always computed in at least fp32,
so bf16/fp16 features work; gradients come back in the features' own dtype.

Distributed convention (both losses). Inside an initialised `torch.distributed` process group each
rank passes its local batch of b pairs; the global batch is N = W * b on W ranks. Every rank's
return value is scaled so that

    mean over ranks of the returned values          == loss of the global batch
    mean over ranks of each rank's parameter grads  == gradient of the global-batch loss

DistributedDataParallel all-reduces gradients and divides by W, so one DDP step on W ranks equals one
single-process step on the concatenated batch, with no learning-rate rescaling. Seen from the
features: a rank's gradient w.r.t. its local features is W times the global-loss gradient w.r.t.
those rows (DDP's 1/W brings it back).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["ClipLoss", "LossConfigError", "LossError", "LossInputError", "SigLipLoss"]


class LossError(ValueError):
    """Base class of the errors the losses raise for unusable inputs or settings."""


class LossInputError(LossError):
    """Features, scale or bias that the loss cannot use (shapes, dtypes, batch sizes across ranks)."""


class LossConfigError(LossError):
    """A combination of loss settings that would give wrong gradients or cannot run."""


# ---------------------------------------------------------------------------------------------
# Input checks and process-group helpers
# ---------------------------------------------------------------------------------------------


def _check_features(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    for name, features in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(features, torch.Tensor):
            raise LossInputError(f"{name} must be a torch.Tensor, got {type(features).__name__}")
        if features.ndim != 2:
            raise LossInputError(f"{name} must have shape (batch, dim), got shape {tuple(features.shape)}")
        if not features.is_floating_point():
            raise LossInputError(f"{name} must be a floating-point tensor, got {features.dtype}")
    if image_features.shape != text_features.shape:
        raise LossInputError(
            "image_features and text_features must hold the same number of pairs and the same "
            f"dimension, got {tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    if image_features.shape[0] == 0:
        raise LossInputError("the batch is empty: the features have 0 rows")
    if image_features.device != text_features.device:
        raise LossInputError(
            f"image_features are on {image_features.device} but text_features are on {text_features.device}"
        )


def _as_scalar(name: str, value: torch.Tensor | float | None, like: torch.Tensor) -> torch.Tensor:
    """Return `value` as a 0-dim tensor on the features' device, keeping its autograd graph."""
    if value is None:
        raise LossInputError(f"{name} is required, got None")
    if isinstance(value, (int, float)):
        return torch.tensor(float(value), device=like.device, dtype=_compute_dtype(like.dtype))
    if not isinstance(value, torch.Tensor):
        raise LossInputError(f"{name} must be a tensor or a float, got {type(value).__name__}")
    if value.numel() != 1:
        raise LossInputError(f"{name} must hold a single value, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise LossInputError(f"{name} must be floating point, got {value.dtype}")
    return value.reshape(())


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # At least fp32: bf16 keeps ~3 significant digits, and t * cos with t up to 100 followed by
    # exp/log turns that into visibly wrong losses. fp64 inputs stay fp64.
    return torch.promote_types(dtype, torch.float32)


def _group_rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    # Point-to-point calls take global ranks; the ring is laid out in group ranks.
    if group is None or group is dist.group.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def _check_same_local_shape(features: torch.Tensor, group: dist.ProcessGroup | None, world_size: int) -> None:
    """All-gather the (batch, dim) of every rank and fail clearly if they differ.

    Collectives and the ring need equal shapes on every rank; without this check a mismatch shows
    up as a hang or an opaque backend error. Every rank sees the same list, so every rank raises.
    """
    shape = torch.tensor(list(features.shape), dtype=torch.long, device=features.device)  # (2,)
    shapes = [torch.empty_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape, group=group)
    per_rank = [tuple(int(v) for v in s.tolist()) for s in shapes]
    if len(set(per_rank)) != 1:
        raise LossInputError(
            "every rank must pass features of the same (local batch, dim); got "
            + ", ".join(f"rank {r}: {s}" for r, s in enumerate(per_rank))
        )


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by a constant in backward."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along the batch whose backward reduce-scatters (sums) the gradient.

    Every rank's loss uses every rank's rows, so the gradient of this rank's rows is the sum over
    ranks of their gradients for that slot. `torch.distributed.nn.functional.all_gather` does the
    same, but on gloo its backward passes group ranks where global ranks are expected and fails in
    any group other than the world (torch 2.13); this one works in sub-groups too.
    """

    @staticmethod
    def forward(ctx, features: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        world_size = dist.get_world_size(group)
        features = features.contiguous()  # (b, D)
        gathered = features.new_empty((world_size * features.shape[0], *features.shape[1:]))
        dist.all_gather_into_tensor(gathered, features, group=group)
        return gathered  # (W * b, D), rank r's rows at [r * b, (r + 1) * b)

    @staticmethod
    def backward(ctx, grad_gathered: torch.Tensor) -> tuple[torch.Tensor, None]:
        world_size = dist.get_world_size(ctx.group)
        grad_gathered = grad_gathered.contiguous()  # (W * b, D)
        grad_local = grad_gathered.new_empty((grad_gathered.shape[0] // world_size, *grad_gathered.shape[1:]))
        dist.reduce_scatter_tensor(grad_local, grad_gathered, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad_local, None


# ---------------------------------------------------------------------------------------------
# CLIP: symmetric softmax cross-entropy
# ---------------------------------------------------------------------------------------------


class ClipLoss(nn.Module):
    """Symmetric InfoNCE of CLIP: (CE(image -> text) + CE(text -> image)) / 2.

    With logits l_ij = t * x_i . y_j over the global batch of N pairs (x images, y texts):

        L = 1/2 * [ -1/N sum_i log softmax_j(l_ij)[i]  -  1/N sum_j log softmax_i(l_ij)[j] ]

    Distributed (see the module docstring for the gradient convention):
    - `local_loss=False`: every rank all-gathers the features and computes the full N x N loss.
      Without `gather_with_grad` the gathered copies are constants and the rank's own slot is
      replaced by its local tensor, so gradients reach only the local rows; every rank holds the
      same loss, so the sum over ranks of d(loss)/d(local rows) that DDP would need is W times the
      local one, which this class applies (a gradient-only scale). With `gather_with_grad` an
      autograd-aware all_gather (backward: reduce-scatter) sums those W contributions itself.
    - `local_loss=True`: rows of the local images (texts) against all texts (images), a b x N
      block, labels offset by rank * b. Rows of other ranks also use this rank's features as keys,
      so their gradients must travel back: this needs `gather_with_grad=True`; the combination with
      `gather_with_grad=False` gives wrong gradients and raises `LossConfigError` inside a group.

    `cache_labels` keeps the label tensor per (device, size, offset) between calls.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = True,
        group: dist.ProcessGroup | None = None,  # None: the default (world) group
    ) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.group = group
        self._labels: dict[tuple[torch.device, int, int], torch.Tensor] = {}

    def _labels_for(self, device: torch.device, num_rows: int, offset: int) -> torch.Tensor:
        key = (device, num_rows, offset)
        if key in self._labels:
            return self._labels[key]
        labels = torch.arange(offset, offset + num_rows, device=device, dtype=torch.long)
        if self.cache_labels:
            self._labels[key] = labels
        return labels

    def _gather(
        self, features: torch.Tensor, rank: int, world_size: int
    ) -> torch.Tensor:  # (b, D) -> (W * b, D)
        if self.gather_with_grad:
            return _AllGatherWithGrad.apply(features, self.group)
        gathered = [torch.empty_like(features) for _ in range(world_size)]
        dist.all_gather(gathered, features.contiguous(), group=self.group)
        gathered[rank] = _ScaleGradient.apply(features, float(world_size))
        return torch.cat(gathered, dim=0)

    def forward(
        self,
        image_features: torch.Tensor,  # (b, D), L2-normalised
        text_features: torch.Tensor,  # (b, D), L2-normalised
        logit_scale: torch.Tensor | float,  # the scale t itself, not its log
        output_dict: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        _check_features(image_features, text_features)
        compute_dtype = _compute_dtype(image_features.dtype)
        scale = _as_scalar("logit_scale", logit_scale, image_features).to(compute_dtype)
        rank, world_size = _group_rank_and_size(self.group)
        local_batch = image_features.shape[0]

        if world_size == 1:
            all_images, all_texts = image_features, text_features
        else:
            if self.local_loss and not self.gather_with_grad:
                raise LossConfigError(
                    "ClipLoss(local_loss=True) needs gather_with_grad=True in a process group: the "
                    "other ranks' rows use this rank's features, and without an autograd-aware "
                    "all_gather their gradients never come back"
                )
            _check_same_local_shape(image_features, self.group, world_size)
            all_images = self._gather(image_features, rank, world_size)  # (N, D)
            all_texts = self._gather(text_features, rank, world_size)  # (N, D)

        all_images = all_images.to(compute_dtype)
        all_texts = all_texts.to(compute_dtype)
        if self.local_loss and world_size > 1:
            local_images = image_features.to(compute_dtype)
            local_texts = text_features.to(compute_dtype)
            logits_per_image = scale * local_images @ all_texts.T  # (b, N)
            logits_per_text = scale * local_texts @ all_images.T  # (b, N)
            # Local row i is global row rank * b + i. Each rank averages over its b rows, which is
            # W times its share of the global mean: the convention of the module docstring.
            labels = self._labels_for(image_features.device, local_batch, rank * local_batch)
        else:
            logits_per_image = scale * all_images @ all_texts.T  # (N, N)
            logits_per_text = logits_per_image.T  # (N, N)
            labels = self._labels_for(image_features.device, all_images.shape[0], 0)

        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        return {"contrastive_loss": loss} if output_dict else loss


# ---------------------------------------------------------------------------------------------
# SigLIP: pairwise sigmoid loss
# ---------------------------------------------------------------------------------------------
#
# L = -1/N sum_ij log sigmoid(z_ij * l_ij),   l_ij = t * x_i . y_j + b,   z_ij = +1 if i == j else -1.
#
# Each term is -log sigmoid(z l) = softplus(v) with v = -z l, that is the logits with the positives
# negated:
#
#     v_ij = l_ij  (negative pair, wants l -> -inf),     v_ii = -l_ii  (positive pair, wants l -> +inf)
#
# so the labels never become a matrix: the logits are flipped on the diagonal in place. Splitting off
# the positives with softplus(-l) = softplus(l) - l would avoid the flip but cancels catastrophically
# for confident positives (sigmoid(l) - 1 computed as two O(1) terms), so every form flips instead.
# The derivative is dL/dl_ij = sigmoid(v_ij) * dv/dl, with dv/dl = -1 on the diagonal.


class _ChunkedSigmoidLossSum(torch.autograd.Function):
    """sum_ij softplus(v_ij) over blocks of C text rows, never holding M x N logits.

    Forward keeps one (M, C) tile of logits plus its softplus; backward recomputes each tile and
    turns it in place into G = dL/dl (sigmoid, times the incoming gradient, sign flip on positives):

        dx_i = t * sum_j G_ij y_j        dy_j = t * sum_i G_ij x_i
        dt = sum_ij G_ij x_i . y_j = sum_i x_i . (G y)_i         db = sum_ij G_ij

    so memory stays O(M * C + (M + N) * D) in both passes. Positives, when the block has them, sit
    at (i, i): in the tile of text rows [start, start + C) that is the diagonal at offset -start.
    """

    @staticmethod
    def forward(
        ctx,
        image_features: torch.Tensor,  # (M, D)
        text_features: torch.Tensor,  # (N, D)
        logit_scale: torch.Tensor,  # ()
        logit_bias: torch.Tensor,  # ()
        chunk_size: int,
        has_positives: bool,
    ) -> torch.Tensor:
        compute_dtype = _compute_dtype(image_features.dtype)
        images = image_features.to(compute_dtype)
        texts = text_features.to(compute_dtype)
        scale = logit_scale.to(compute_dtype)
        bias = logit_bias.to(compute_dtype)
        total = torch.zeros((), dtype=compute_dtype, device=images.device)
        for start in range(0, texts.shape[0], chunk_size):
            tile = images @ texts[start : start + chunk_size].T  # (M, C)
            tile.mul_(scale).add_(bias)  # l
            if has_positives:
                tile.diagonal(-start).neg_()  # v
            total += F.softplus(tile).sum()
            del tile
        ctx.chunk_size = chunk_size
        ctx.has_positives = has_positives
        ctx.save_for_backward(image_features, text_features, logit_scale, logit_bias)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        image_features, text_features, logit_scale, logit_bias = ctx.saved_tensors
        need_images, need_texts, need_scale, need_bias = ctx.needs_input_grad[:4]
        compute_dtype = _compute_dtype(image_features.dtype)
        images = image_features.to(compute_dtype)  # (M, D)
        texts = text_features.to(compute_dtype)  # (N, D)
        scale = logit_scale.to(compute_dtype)
        bias = logit_bias.to(compute_dtype)
        grad_total = grad_total.to(compute_dtype)

        # sum over chunks of G y, (M, D): dx = t * that and dt = <x, that>, so no per-chunk temporaries.
        tiles_times_texts = torch.zeros_like(images) if (need_images or need_scale) else None
        grad_texts = torch.empty_like(texts) if need_texts else None
        grad_bias = torch.zeros((), dtype=compute_dtype, device=images.device)
        for start in range(0, texts.shape[0], ctx.chunk_size):
            text_chunk = texts[start : start + ctx.chunk_size]  # (C, D)
            tile = images @ text_chunk.T  # (M, C)
            tile.mul_(scale).add_(bias)  # l
            if ctx.has_positives:
                tile.diagonal(-start).neg_()  # v
            tile.sigmoid_().mul_(grad_total)  # dL/dv
            if ctx.has_positives:
                tile.diagonal(-start).neg_()  # G = dL/dl
            if need_bias:
                grad_bias += tile.sum()
            if tiles_times_texts is not None:
                tiles_times_texts.addmm_(tile, text_chunk)
            if need_texts:
                torch.mm(tile.T, images, out=grad_texts[start : start + ctx.chunk_size])  # (C, D)
            del tile
        grad_images = grad_scale = None
        if need_scale:
            grad_scale = torch.dot(images.reshape(-1), tiles_times_texts.reshape(-1))
            grad_scale = grad_scale.to(logit_scale.dtype)
        if need_images:
            grad_images = tiles_times_texts.mul_(scale).to(image_features.dtype)
        if need_texts:
            grad_texts = grad_texts.mul_(scale).to(text_features.dtype)
        return (
            grad_images,
            grad_texts,
            grad_scale,
            grad_bias.to(logit_bias.dtype) if need_bias else None,
            None,
            None,
        )


def _sigmoid_loss_sum(
    image_features: torch.Tensor,  # (M, D)
    text_features: torch.Tensor,  # (N, D)
    logit_scale: torch.Tensor,  # ()
    logit_bias: torch.Tensor,  # ()
    chunk_size: int | None,
    has_positives: bool,  # pairs (i, i) are positives (the rank's own block); else all negatives
) -> torch.Tensor:
    """sum_ij -log sigmoid(z_ij l_ij) over one block: plain autograd, or chunked."""
    if chunk_size is not None:
        return _ChunkedSigmoidLossSum.apply(
            image_features, text_features, logit_scale, logit_bias, chunk_size, has_positives
        )
    compute_dtype = _compute_dtype(image_features.dtype)
    scaled_images = image_features.to(compute_dtype) * logit_scale.to(compute_dtype)  # (M, D)
    # addmm writes t * x @ y.T + b into one (M, N) buffer and does not need it for its backward,
    # so the sign flip can happen in place; softplus then saves only that buffer. Peak memory is
    # two (M, N) buffers in forward and in backward.
    signed_logits = torch.addmm(
        logit_bias.to(compute_dtype), scaled_images, text_features.to(compute_dtype).T
    )  # (M, N)
    if has_positives:
        signed_logits.diagonal().neg_()
    return F.softplus(signed_logits).sum()


class _NeighbourExchange(torch.autograd.Function):
    """Point-to-point exchange on a ring with gradients that travel back.

    Tensor k goes to group rank `routes[k][0]` and a tensor of the same shape arrives from
    `routes[k][1]`. Backward runs the same exchange reversed: the gradient of what arrived goes
    back to whoever sent it, and the gradient of what left arrives from whoever received it. All
    sends and receives are posted before any wait, so two ranks sending to each other cannot
    deadlock; the message tag is k so that two routes between the same pair stay apart.
    """

    @staticmethod
    def forward(
        ctx,
        routes: tuple[tuple[int, int], ...],
        group: dist.ProcessGroup | None,
        *tensors: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        ctx.routes = routes
        ctx.group = group
        return _exchange(tensors, routes, group)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        reversed_routes = tuple((source, destination) for destination, source in ctx.routes)
        grads_back = _exchange(grads, reversed_routes, ctx.group)
        return (None, None, *grads_back)


def _exchange(
    tensors: tuple[torch.Tensor, ...],
    routes: tuple[tuple[int, int], ...],
    group: dist.ProcessGroup | None,
) -> tuple[torch.Tensor, ...]:
    received = tuple(torch.empty_like(tensor) for tensor in tensors)
    requests = []
    for tag, (buffer, (_, source)) in enumerate(zip(received, routes, strict=True)):
        requests.append(dist.irecv(buffer, src=_global_rank(group, source), group=group, tag=tag))
    for tag, (tensor, (destination, _)) in enumerate(zip(tensors, routes, strict=True)):
        requests.append(
            dist.isend(tensor.contiguous(), dst=_global_rank(group, destination), group=group, tag=tag)
        )
    for request in requests:
        request.wait()
    return received


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss of SigLIP, single device (optionally chunked) or on a ring of ranks.

        L = -1/N sum_ij log sigmoid(z_ij (t x_i . y_j + b)),  z = +1 on the diagonal, -1 elsewhere

    normalised by the batch size N (not N^2), as in the paper and big_vision.

    `chunk_size=C` computes the logits in blocks of C text rows with a custom autograd function that
    recomputes each block in backward, so neither pass holds more than O(C x N) logits; the value
    and the gradients (features, logit_scale, logit_bias) equal the unchunked ones.

    Inside a process group of W ranks each rank passes its local b pairs. It computes its diagonal
    block (which holds the positives), then the text features travel around the ring with
    point-to-point sends; each arriving block adds negative-only terms. With `bidirectional=True`
    the local text goes left and right at once, so the W - 1 foreign blocks arrive in
    ceil((W - 1) / 2) rounds instead of W - 1. Gradients w.r.t. foreign text blocks travel back to
    their owners through the reversed exchange. Chunking applies to each block.

    Per-rank value: the rank's image rows, sum_{i local, all j} (...) / b. That is W times the rank's
    share of L, so the mean over ranks is L and the DDP-averaged gradient is the full-batch gradient
    (module docstring).
    """

    def __init__(
        self,
        chunk_size: int | None = None,  # None: one block; else text rows per block, O(C x N) memory
        bidirectional: bool = True,  # ring direction: both ways (W/2 rounds) or one way (W-1)
        group: dist.ProcessGroup | None = None,  # None: the default (world) group
    ) -> None:
        super().__init__()
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise LossConfigError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.bidirectional = bidirectional
        self.group = group

    def forward(
        self,
        image_features: torch.Tensor,  # (b, D), L2-normalised
        text_features: torch.Tensor,  # (b, D), L2-normalised
        logit_scale: torch.Tensor | float,  # the scale t itself, not its log
        logit_bias: torch.Tensor | float,  # b
        output_dict: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        _check_features(image_features, text_features)
        if logit_bias is None:
            raise LossInputError(
                "SigLipLoss needs logit_bias; a model without one (softmax CLIP) trains with ClipLoss"
            )
        scale = _as_scalar("logit_scale", logit_scale, image_features)
        bias = _as_scalar("logit_bias", logit_bias, image_features)
        rank, world_size = _group_rank_and_size(self.group)
        local_batch = image_features.shape[0]

        def block(texts: torch.Tensor, has_positives: bool) -> torch.Tensor:
            return _sigmoid_loss_sum(image_features, texts, scale, bias, self.chunk_size, has_positives)

        # Own block: the local images with the local texts, positives on its diagonal.
        total = block(text_features, has_positives=True)
        if world_size > 1:
            _check_same_local_shape(image_features, self.group, world_size)
            for foreign_texts in self._ring(text_features, rank, world_size):
                total = total + block(foreign_texts, has_positives=False)
        loss = total / local_batch
        return {"contrastive_loss": loss} if output_dict else loss

    def _ring(self, text_features: torch.Tensor, rank: int, world_size: int):
        """Yield the W - 1 foreign text blocks, each as it arrives (autograd-aware)."""
        left, right = (rank - 1) % world_size, (rank + 1) % world_size
        if not self.bidirectional:
            travelling = text_features
            for _ in range(world_size - 1):
                (travelling,) = _NeighbourExchange.apply(((right, left),), self.group, travelling)
                yield travelling  # texts of rank - k after k rounds
            return
        # Two streams: one moves towards lower ranks, one towards higher ranks. After k rounds this
        # rank holds the texts of rank + k and rank - k.
        going_left, going_right = text_features, text_features
        bidirectional_rounds, one_more = divmod(world_size - 1, 2)
        for _ in range(bidirectional_rounds):
            going_left, going_right = _NeighbourExchange.apply(
                ((left, right), (right, left)), self.group, going_left, going_right
            )
            yield going_left
            yield going_right
        if one_more:
            # Even W: the block of rank + W/2 (= rank - W/2) is still missing; one one-way round.
            (going_right,) = _NeighbourExchange.apply(((right, left),), self.group, going_right)
            yield going_right
