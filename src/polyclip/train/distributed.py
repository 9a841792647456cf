"""Process groups and model wrapping: one code path from one CPU process to many GPUs on many machines.

Launch with torchrun (``torchrun --nproc-per-node 2 -m polyclip.train RECIPE``; several machines:
``--nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:PORT``). torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) is read by ``init_process_group("env://")``; the
backend is nccl on CUDA and gloo on CPU. Without torchrun the run is a single process.

- ``ddp``: DistributedDataParallel over `ContrastiveForward`; gradients are averaged over ranks,
  which together with the losses' convention (``polyclip.losses`` docstring) makes one step on W
  ranks equal one step on the concatenated batch.
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) on every transformer block / ResNet
  stage and on each tower. FSDP2 cannot shard 0-dim parameters, so the logit scale and bias stay
  replicated and their gradients are averaged by an explicit all-reduce.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from polyclip.train.config import DistributedConfig, TrainConfigError


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "none"  # "none" (one process), "ddp" or "fsdp"
    owns_group: bool = False  # this run created the process group (and destroys it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_distributed(config: DistributedConfig, device: str | None = None) -> DistEnv:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    owns_group = False
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    elif launched_by_torchrun():
        owns_group = True
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        backend = config.backend or ("nccl" if use_cuda else "gloo")
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=timedelta(seconds=collective_timeout(config, backend)))
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank, world_size, local_rank = 0, 1, 0
    if device is None:
        chosen = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        chosen = torch.device(device)
        if chosen.type == "cuda" and chosen.index is None:
            chosen = torch.device(f"cuda:{local_rank}")
    strategy = config.strategy if world_size > 1 else "none"
    return DistEnv(rank, world_size, local_rank, chosen, strategy, owns_group)


def collective_timeout(config: DistributedConfig, backend: str) -> int:
    """Seconds a collective waits for a missing peer: ``distributed.timeout_s``, or by default 30 minutes
    on NCCL (long compiles and checkpoint writes on big GPUs) and 5 minutes on gloo (CPU runs, where a
    hung peer should surface while someone is still watching)."""
    if config.timeout_s is not None:
        return config.timeout_s
    return 1800 if backend == "nccl" else 300


def wrap(forward: nn.Module, env: DistEnv) -> nn.Module:
    """DDP or FSDP2 around the `ContrastiveForward` (unchanged for a single process)."""
    if env.strategy == "none":
        return forward
    if env.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(forward, device_ids=device_ids)
    if env.strategy == "fsdp":
        return _fully_shard(forward)
    raise TrainConfigError(f"unknown distributed strategy {env.strategy!r}")


def _fully_shard(forward: nn.Module) -> nn.Module:
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as error:  # torch < 2.6
        raise TrainConfigError("distributed.strategy=fsdp needs torch >= 2.6 (FSDP2 fully_shard)") from error
    model = forward.model
    for tower in (model.visual, model.text):
        units = list(tower.transformer.blocks) if hasattr(tower, "transformer") else list(tower.stages)
        for unit in units:
            fully_shard(unit)
        fully_shard(tower)
    return forward


def replicated_parameters(forward: nn.Module, env: DistEnv) -> list[nn.Parameter]:
    """Parameters FSDP leaves unsharded (logit scale and bias), whose gradients need averaging."""
    if env.strategy != "fsdp":
        return []
    model = forward.model
    return [p for p in (model.logit_scale, model.logit_bias) if p is not None and p.requires_grad]


def average_gradients(parameters: list[nn.Parameter], env: DistEnv) -> None:
    for parameter in parameters:
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
            parameter.grad.div_(env.world_size)


def no_sync(forward: nn.Module, env: DistEnv):
    """A context that skips the gradient reduction (micro-batches before the last)."""
    if env.strategy == "ddp":
        return forward.no_sync()
    if env.strategy == "fsdp":
        return _fsdp_no_sync(forward)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(forward: nn.Module):
    towers = (forward.model.visual, forward.model.text)
    for tower in towers:
        tower.set_requires_gradient_sync(False, recurse=True)
    try:
        yield
    finally:
        for tower in towers:
            tower.set_requires_gradient_sync(True, recurse=True)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    if not env.distributed:
        return values
    tensor = torch.tensor(
        values, dtype=torch.float64, device=env.device if env.device.type == "cuda" else "cpu"
    )
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def cleanup(env: DistEnv) -> None:
    """Destroy the process group if this run created it (a group the caller made stays theirs)."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


class PeerFailure(RuntimeError):
    """Another rank died, hung or failed; the message names it."""


_COMMS_MARKERS = ("gloo", "nccl", "connection", "timed out", "timeout", "socket", "broken pipe", "peer")


@contextlib.contextmanager
def name_failed_ranks(env: DistEnv, wait_s: float = 5.0):
    """Turn a broken collective into an error that names the rank(s) that stopped answering.

    A collective on a rank whose peer died only says "Connection reset by peer" (gloo) or times out, and
    torchrun's surviving launcher only ``RendezvousConnectionError``. Here every rank that sees its own
    error records it in the process group's key-value store; a rank whose collective broke checks in
    there and waits ``wait_s`` for the others: those that neither check in nor recorded an error died
    or hung.
    """
    try:
        yield
    except Exception as error:
        if not env.distributed:
            raise
        store = _default_store()
        if not _is_comms_error(error):
            if store is not None:
                with contextlib.suppress(Exception):
                    store.set(f"polyclip/failed/{env.rank}", f"{type(error).__name__}: {error}"[:500])
            raise
        raise PeerFailure(_describe_failure(env, store, wait_s, error)) from error


def _is_comms_error(error: BaseException) -> bool:
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _COMMS_MARKERS)


def _default_store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # no group, or a torch without the helper
        return None


def _describe_failure(env: DistEnv, store, wait_s: float, error: BaseException) -> str:
    first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    if store is None:
        return f"rank {env.rank}: a collective failed ({first_line}); check the other ranks' logs"
    try:
        store.set(f"polyclip/alive/{env.rank}", "1")
        others = [r for r in range(env.world_size) if r != env.rank]
        failed, deadline = {}, time.monotonic() + wait_s
        silent = set(others)
        while silent and time.monotonic() < deadline:
            for rank in sorted(silent):
                if store.check([f"polyclip/failed/{rank}"]):
                    failed[rank] = store.get(f"polyclip/failed/{rank}").decode(errors="replace")
                    silent.discard(rank)
                elif store.check([f"polyclip/alive/{rank}"]):
                    silent.discard(rank)
            if silent:
                time.sleep(0.1)
    except Exception:  # the store went with the rank that hosted it (rank 0, or torchrun's agent)
        return (
            f"rank {env.rank}: a collective failed ({first_line}) and the rendezvous store is gone with it: "
            "the process hosting it (rank 0, or the first node's torchrun) died"
        )
    parts = [f"rank {rank} failed: {reason}" for rank, reason in sorted(failed.items())]
    if silent:
        names = ", ".join(str(r) for r in sorted(silent))
        parts.append(f"rank(s) {names} stopped answering (the process died or hung)")
    if not parts:
        parts.append("every other rank is alive; the network between them failed")
    return f"rank {env.rank}: a collective failed ({first_line}): " + "; ".join(parts)
