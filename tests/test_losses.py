"""Tests of polyclip.losses: hand-written references, known answers, chunking, and real multi-process
groups (gloo on CPU) checked against the single-process loss on the concatenated batch.

Distributed convention under test: mean over ranks of the returned losses == global-batch loss, and
mean over ranks of the gradients (what DDP applies) == global-batch gradient. For the features, the
rank's gradient of its local rows divided by W equals the global gradient of those rows.
"""

from __future__ import annotations

import functools
import math
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import free_port
from polyclip.losses import ClipLoss, LossConfigError, LossInputError, SigLipLoss

TOLERANCE = 1e-5


# ---------------------------------------------------------------------------------------------
# Hand-written references (loops and explicit label matrices, independent of the implementation)
# ---------------------------------------------------------------------------------------------


def reference_clip_loss(images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor):
    logits = scale * images @ texts.T  # (N, N)
    n = logits.shape[0]
    image_to_text = torch.stack(
        [-(logits[i, i] - torch.logsumexp(logits[i, :], dim=0)) for i in range(n)]
    ).mean()
    text_to_image = torch.stack(
        [-(logits[j, j] - torch.logsumexp(logits[:, j], dim=0)) for j in range(n)]
    ).mean()
    return (image_to_text + text_to_image) / 2


def reference_siglip_loss(images, texts, scale, bias):
    logits = scale * images @ texts.T + bias  # (N, N)
    n = logits.shape[0]
    labels = 2 * torch.eye(n, dtype=logits.dtype) - 1  # +1 diagonal, -1 elsewhere
    return -F.logsigmoid(labels * logits).sum() / n


def random_pairs(n: int, dim: int, seed: int, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n, dim, generator=generator, dtype=dtype), dim=-1)
    # Texts correlated with their images so that the positives differ from the negatives.
    noise = torch.randn(n, dim, generator=generator, dtype=dtype)
    texts = F.normalize(images + 0.7 * noise, dim=-1)
    return images, texts


def loss_and_grads(loss_fn, images, texts, log_scale, bias=None):
    """Loss value and gradients w.r.t. features, the stored log scale and the bias."""
    leaves = [images.clone().requires_grad_(), texts.clone().requires_grad_()]
    log_scale = torch.tensor(log_scale, dtype=images.dtype, requires_grad=True)
    leaves.append(log_scale)
    args = [leaves[0], leaves[1], log_scale.exp()]
    if bias is not None:
        bias = torch.tensor(bias, dtype=images.dtype, requires_grad=True)
        leaves.append(bias)
        args.append(bias)
    loss = loss_fn(*args)
    loss.backward()
    grads = {"images": leaves[0].grad, "texts": leaves[1].grad, "log_scale": leaves[2].grad}
    if bias is not None:
        grads["bias"] = leaves[3].grad
    return loss.detach(), grads


def assert_close(actual, expected, tolerance=TOLERANCE):
    torch.testing.assert_close(actual, expected, atol=tolerance, rtol=tolerance)


# ---------------------------------------------------------------------------------------------
# Single process
# ---------------------------------------------------------------------------------------------


def test_clip_loss_matches_hand_written_reference():
    images, texts = random_pairs(6, 5, seed=0)
    for log_scale in (0.0, math.log(1 / 0.07)):
        loss, grads = loss_and_grads(ClipLoss(), images, texts, log_scale)
        expected, expected_grads = loss_and_grads(reference_clip_loss, images, texts, log_scale)
        assert_close(loss, expected)
        for name in grads:
            assert_close(grads[name], expected_grads[name])


def test_clip_loss_known_answer_for_aligned_orthogonal_features():
    # Identity features: diagonal logits t, off-diagonal 0, so each row's cross-entropy is
    # log(1 + (B - 1) exp(-t)) in both directions.
    batch = 5
    features = torch.eye(batch, 8)
    for scale in (1.0, 100.0):
        loss = ClipLoss()(features, features, torch.tensor(scale))
        expected = math.log1p((batch - 1) * math.exp(-scale))
        assert loss.item() == pytest.approx(expected, abs=1e-7)
    assert ClipLoss()(features, features, torch.tensor(100.0)).item() < 1e-6


def test_clip_loss_output_dict_and_local_loss_outside_a_group():
    images, texts = random_pairs(4, 3, seed=1)
    scale = torch.tensor(10.0)
    plain = ClipLoss()(images, texts, scale)
    as_dict = ClipLoss(local_loss=True)(images, texts, scale, output_dict=True)
    assert set(as_dict) == {"contrastive_loss"}
    assert_close(as_dict["contrastive_loss"], plain)


def test_siglip_loss_matches_hand_written_reference():
    images, texts = random_pairs(7, 5, seed=2)
    for log_scale, bias in ((math.log(10.0), -10.0), (0.0, 0.5)):
        loss, grads = loss_and_grads(SigLipLoss(), images, texts, log_scale, bias)
        expected, expected_grads = loss_and_grads(reference_siglip_loss, images, texts, log_scale, bias)
        assert_close(loss, expected)
        for name in expected_grads:
            assert_close(grads[name], expected_grads[name])


def test_siglip_loss_known_answer_for_aligned_orthogonal_features():
    # Identity features: l_ii = t + b, l_ij = b, so the loss is
    # softplus(-(t + b)) + (B - 1) softplus(b). With b = 0 every negative costs log 2, so the
    # loss is about 0 only with a negative bias; with t = 100, b = -50 it is below 1e-20.
    batch = 6
    features = torch.eye(batch, 9, dtype=torch.float64)
    for chunk_size in (None, 4):
        loss_fn = SigLipLoss(chunk_size=chunk_size)
        for scale, bias in ((100.0, 0.0), (100.0, -50.0), (2.0, -1.0)):
            loss = loss_fn(features, features, torch.tensor(scale), torch.tensor(bias))
            expected = math.log1p(math.exp(-(scale + bias))) + (batch - 1) * math.log1p(math.exp(bias))
            assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-30)
        loss = loss_fn(features, features, torch.tensor(100.0), torch.tensor(-50.0))
        assert loss.item() < 1e-20


@pytest.mark.parametrize("batch, chunk_size", [(13, 4), (13, 5), (13, 1), (13, 13), (11, 20)])
def test_siglip_chunked_equals_unchunked(batch, chunk_size):
    images, texts = random_pairs(batch, 6, seed=batch + chunk_size)
    log_scale, bias = math.log(10.0), -4.0
    loss, grads = loss_and_grads(SigLipLoss(), images, texts, log_scale, bias)
    chunked_loss, chunked_grads = loss_and_grads(
        SigLipLoss(chunk_size=chunk_size), images, texts, log_scale, bias
    )
    assert_close(chunked_loss, loss)
    assert set(chunked_grads) == {"images", "texts", "log_scale", "bias"}
    for name, grad in grads.items():
        assert chunked_grads[name] is not None, name
        assert_close(chunked_grads[name], grad)
    assert chunked_grads["bias"].abs().item() > 0


def test_siglip_chunked_skips_gradients_nobody_needs():
    images, texts = random_pairs(9, 4, seed=3)
    images.requires_grad_()
    bias = torch.tensor(-2.0, requires_grad=True)
    loss = SigLipLoss(chunk_size=4)(images, texts, torch.tensor(5.0), bias)
    loss.backward()
    reference = reference_siglip_loss(images, texts, torch.tensor(5.0), bias)
    expected_image_grad, expected_bias_grad = torch.autograd.grad(reference, [images, bias])
    assert_close(images.grad, expected_image_grad)
    assert_close(bias.grad, expected_bias_grad)


@pytest.mark.parametrize("loss_name", ["clip", "siglip", "siglip_chunked"])
def test_bf16_features_compute_in_fp32(loss_name):
    images, texts = random_pairs(10, 16, seed=4)
    images_bf16, texts_bf16 = images.bfloat16(), texts.bfloat16()
    if loss_name == "clip":
        loss_fn, extra = ClipLoss(), ()
    else:
        chunk_size = 3 if loss_name == "siglip_chunked" else None
        loss_fn, extra = SigLipLoss(chunk_size=chunk_size), (torch.tensor(-5.0),)
    scale = torch.tensor(20.0)
    images_bf16.requires_grad_()
    texts_bf16.requires_grad_()
    loss = loss_fn(images_bf16, texts_bf16, scale, *extra)
    loss.backward()
    assert loss.dtype == torch.float32
    assert images_bf16.grad.dtype == torch.bfloat16 and texts_bf16.grad.dtype == torch.bfloat16
    # Same loss as fp32 on the very same (bf16-rounded) values: the logits were computed in fp32.
    expected = loss_fn(images_bf16.detach().float(), texts_bf16.detach().float(), scale, *extra)
    assert_close(loss.detach(), expected, tolerance=1e-6)
    assert torch.isfinite(images_bf16.grad.float()).all()


def test_bad_inputs_raise_readable_errors():
    images, texts = random_pairs(4, 3, seed=5)
    scale, bias = torch.tensor(10.0), torch.tensor(-1.0)
    with pytest.raises(LossInputError, match="same number of pairs"):
        ClipLoss()(images, texts[:3], scale)
    with pytest.raises(LossInputError, match=r"shape \(batch, dim\)"):
        SigLipLoss()(images[0], texts[0], scale, bias)
    with pytest.raises(LossInputError, match="floating-point"):
        ClipLoss()(images.long(), texts.long(), scale)
    with pytest.raises(LossInputError, match="single value"):
        ClipLoss()(images, texts, torch.ones(2))
    with pytest.raises(LossInputError, match="needs logit_bias"):
        SigLipLoss()(images, texts, scale, None)
    with pytest.raises(LossInputError, match="empty"):
        SigLipLoss()(images[:0], texts[:0], scale, bias)
    for chunk_size in (0, -3, 2.5, True):
        with pytest.raises(LossConfigError, match="chunk_size"):
            SigLipLoss(chunk_size=chunk_size)


# ---------------------------------------------------------------------------------------------
# Real process groups (gloo on CPU)
# ---------------------------------------------------------------------------------------------
#
# One spawn of 4 processes (process start-up dominates the run time) serves every world size:
# W = 4 is the default world group, W = 2 and W = 3 are sub-groups whose group ranks differ from the
# global ranks, which also checks the losses' `group=` argument and their rank mapping.

LOCAL_BATCH = 5  # per rank; odd so that chunk 3 does not divide it
DIM = 8
LOG_SCALE = math.log(10.0)
BIAS = -4.0
TOTAL_PROCESSES = 4
GROUP_MEMBERS = {2: (0, 2), 3: (1, 2, 3), 4: None}  # world size -> global ranks (None: world)

CLIP_SETTINGS = {
    "clip_full_nograd": dict(local_loss=False, gather_with_grad=False),
    "clip_full_grad": dict(local_loss=False, gather_with_grad=True),
    "clip_local_grad": dict(local_loss=True, gather_with_grad=True),
}
SIGLIP_SETTINGS = {
    "siglip_bidir": dict(bidirectional=True),
    "siglip_onedir": dict(bidirectional=False),
    "siglip_bidir_chunked": dict(bidirectional=True, chunk_size=3),
    "siglip_onedir_chunked": dict(bidirectional=False, chunk_size=2),
}


def _build_loss(name: str, group=None):
    if name in CLIP_SETTINGS:
        return ClipLoss(**CLIP_SETTINGS[name], group=group), None
    return SigLipLoss(**SIGLIP_SETTINGS[name], group=group), BIAS


def _pairs_for_world(world_size: int):
    return random_pairs(world_size * LOCAL_BATCH, DIM, seed=100 + world_size)


def _run_cases_in_group(group, group_rank: int, world_size: int) -> dict:
    images, texts = _pairs_for_world(world_size)
    rows = slice(group_rank * LOCAL_BATCH, (group_rank + 1) * LOCAL_BATCH)
    local_images, local_texts = images[rows], texts[rows]
    results = {}
    for name in [*CLIP_SETTINGS, *SIGLIP_SETTINGS]:
        loss_fn, bias = _build_loss(name, group)
        results[name] = loss_and_grads(loss_fn, local_images, local_texts, LOG_SCALE, bias)
    # Settings and inputs that must fail identically on every rank (no hang).
    errors = {}
    try:
        ClipLoss(local_loss=True, gather_with_grad=False, group=group)(
            local_images, local_texts, torch.tensor(10.0)
        )
    except LossConfigError as error:
        errors["clip_local_nograd"] = str(error)
    kept_rows = LOCAL_BATCH - (group_rank % 2)
    uneven = local_images[:kept_rows], local_texts[:kept_rows]
    for name, loss_fn, extra in (
        ("clip_uneven", ClipLoss(group=group), ()),
        ("siglip_uneven", SigLipLoss(group=group), (torch.tensor(BIAS),)),
    ):
        try:
            loss_fn(*uneven, torch.tensor(10.0), *extra)
        except LossInputError as error:
            errors[name] = str(error)
    return {"results": results, "errors": errors}


def _distributed_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=TOTAL_PROCESSES,
        timeout=timedelta(seconds=30),
    )
    try:
        # new_group is collective over the world: every process creates every group, in order.
        groups = {
            world_size: None if members is None else dist.new_group(list(members))
            for world_size, members in GROUP_MEMBERS.items()
        }
        outcome = {}
        for world_size, members in GROUP_MEMBERS.items():
            if members is not None and rank not in members:
                continue
            group_rank = rank if members is None else members.index(rank)
            outcome[world_size] = (
                group_rank,
                _run_cases_in_group(groups[world_size], group_rank, world_size),
            )
        torch.save(outcome, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()



@functools.cache
def _spawn_once() -> dict[int, list[dict]] | BaseException:
    # A failure is cached too: a broken loss must fail every distributed test after one spawn,
    # not spawn again (and wait for the gloo timeout again) for each test.
    try:
        return _spawn_groups()
    except Exception as error:  # re-raised by run_groups
        return error


def run_groups() -> dict[int, list[dict]]:
    """Per world size, the results of every rank in group-rank order (one spawn per session)."""
    outcome = _spawn_once()
    if isinstance(outcome, BaseException):
        raise RuntimeError("the distributed workers failed; see the cause below") from outcome
    return outcome


def _spawn_groups() -> dict[int, list[dict]]:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(
            _distributed_worker,
            args=(free_port(), out_dir),
            nprocs=TOTAL_PROCESSES,
            join=True,
        )
        outcomes = [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(TOTAL_PROCESSES)]
    per_world: dict[int, list[dict]] = {}
    for world_size in GROUP_MEMBERS:
        ranked = sorted(outcome[world_size] for outcome in outcomes if world_size in outcome)
        assert [group_rank for group_rank, _ in ranked] == list(range(world_size))
        per_world[world_size] = [result for _, result in ranked]
    return per_world


def _assert_matches_full_batch(world_size: int, name: str):
    per_rank = run_groups()[world_size]
    images, texts = _pairs_for_world(world_size)
    _, bias = _build_loss(name)
    reference = reference_clip_loss if bias is None else reference_siglip_loss
    expected_loss, expected_grads = loss_and_grads(reference, images, texts, LOG_SCALE, bias)
    results = [rank_result["results"][name] for rank_result in per_rank]
    # DDP-style average over ranks: mean of the values, mean of the (replicated) scalar grads.
    mean_loss = torch.stack([loss for loss, _ in results]).mean()
    assert_close(mean_loss, expected_loss)
    for scalar in ["log_scale"] + ([] if bias is None else ["bias"]):
        mean_grad = torch.stack([grads[scalar] for _, grads in results]).mean()
        assert_close(mean_grad, expected_grads[scalar])
    # Feature gradients: the rows each rank owns, divided by W (DDP's average).
    for features in ("images", "texts"):
        gathered = torch.cat([grads[features] for _, grads in results]) / world_size
        assert_close(gathered, expected_grads[features])


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("name", list(CLIP_SETTINGS))
def test_clip_loss_in_a_group_equals_full_batch(world_size, name):
    _assert_matches_full_batch(world_size, name)


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("name", list(SIGLIP_SETTINGS))
def test_siglip_loss_ring_equals_full_batch(world_size, name):
    # W = 2: one one-way round; W = 3: one two-way round; W = 4: a two-way round plus a one-way one.
    _assert_matches_full_batch(world_size, name)


def test_clip_local_loss_without_gather_grad_is_refused_in_a_group():
    for rank_result in run_groups()[2]:
        assert "gather_with_grad=True" in rank_result["errors"]["clip_local_nograd"]


@pytest.mark.parametrize("world_size", [2, 3])
def test_uneven_local_batches_fail_on_every_rank(world_size):
    for rank_result in run_groups()[world_size]:
        for name in ("clip_uneven", "siglip_uneven"):
            assert "same (local batch, dim)" in rank_result["errors"][name]
