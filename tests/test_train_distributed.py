"""Real 2-process gloo groups: one DDP step (and one FSDP2 step) on two halves of a batch equals the
one-process step on the whole batch, with and without exact accumulation; and the trainer itself,
started as torchrun starts it, ends with the weights of the one-process run.

One spawn of 2 processes serves every case (process start-up dominates the run time).
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import polyclip
from conftest import free_port
from polyclip.train.config import LossConfig, TrainConfig, apply_overrides
from polyclip.train.distributed import DistEnv, average_gradients, no_sync, replicated_parameters, wrap
from polyclip.train.step import ContrastiveForward, StepInputs, build_loss, forward_backward
from test_train_fixtures import colour_pairs, single_thread, write_jsonl  # noqa: F401 (autouse fixture)

WORLD = 2
BATCH = 8  # global
CASES = {  # name -> (architecture, loss kind, strategy, micro-batch)
    "ddp_clip": ("tiny-vit", "clip", "ddp", None),
    "ddp_siglip": ("tiny-siglip", "siglip", "ddp", None),
    "ddp_siglip_accumulated": ("tiny-siglip", "siglip", "ddp", 2),
    "ddp_clip_accumulated": ("tiny-vit", "clip", "ddp", 2),
    "fsdp_clip": ("tiny-vit", "clip", "fsdp", None),
    "fsdp_siglip_accumulated": ("tiny-siglip", "siglip", "fsdp", 2),
}


def _inputs(architecture: str):
    generator = torch.Generator().manual_seed(7)
    pixels = torch.randn(BATCH, 3, 32, 32, generator=generator)
    tokens = torch.randint(1, 5000, (BATCH, 12), generator=generator)
    tokens[:, -1] = 49407 if architecture == "tiny-vit" else tokens[:, -1]  # CLIP pools at its end token
    return pixels, tokens


def _model(architecture: str):
    torch.manual_seed(0)
    return polyclip.create_model(architecture)


def _full_grads(model) -> dict[str, torch.Tensor]:
    grads = {}
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            grad = parameter.grad
            grads[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().clone()
    return grads


def _step(architecture, kind, strategy, micro, env: DistEnv | None, rows: slice):
    model = _model(architecture)
    loss_fn, uses_bias = build_loss(LossConfig(kind=kind), model)
    forward = ContrastiveForward(model)
    if env is not None:
        forward = wrap(forward, env)
    inputs = StepInputs(
        forward, loss_fn, uses_bias, contextlib.nullcontext,
        (lambda: no_sync(forward, env)) if env is not None else contextlib.nullcontext,
    )  # fmt: skip
    pixels, tokens = _inputs(architecture)
    loss = forward_backward(inputs, pixels[rows], tokens[rows], micro)
    if env is not None:
        average_gradients(replicated_parameters(forward, env), env)
    return float(loss), _full_grads(model)


def _trainer_config(data: Path, out: Path) -> TrainConfig:
    config = TrainConfig(output_dir=str(out), device="cpu")
    apply_overrides(
        config,
        [
            "model.architecture=tiny-vit",
            f"data.train={data}",
            f"data.batch_size={BATCH}",
            "data.num_workers=0",
            "schedule.max_steps=3",
            "schedule.warmup_steps=1",
            "optim.lr=1e-3",
            "micro_batch_size=2",
            "augment.hflip=0.5",
            "log.every_steps=1",
            "log.progress=false",
            "log.plots=false",
        ],
    )
    return config


def _worker(rank: int, port: int, out_dir: str, data: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    try:
        local = BATCH // WORLD
        rows = slice(rank * local, (rank + 1) * local)
        results = {}
        for name, (architecture, kind, strategy, micro) in CASES.items():
            env = DistEnv(rank, WORLD, rank, torch.device("cpu"), strategy)
            results[name] = _step(architecture, kind, strategy, micro, env, rows)
        # The trainer as torchrun would start it: it finds the initialised group and joins it.
        from polyclip.train.trainer import train

        result = train(_trainer_config(Path(data), Path(out_dir) / "trainer"))
        sharded = _trainer_config(Path(data), Path(out_dir) / "trainer_fsdp")
        apply_overrides(sharded, ["distributed.strategy=fsdp"])
        result_fsdp = train(sharded)
        results["trainer_steps"] = (result.steps, result_fsdp.steps)
        results["trainer_skips"] = (result.skipped_images, result.skipped_examples)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()



@functools.cache
def run_world() -> tuple[list[dict], Path, Path]:
    folder = Path(tempfile.mkdtemp(prefix="polyclip-ddp-"))
    # image 0 is read on rank 0 and image 1 on rank 1 (seed 0): both are corrupt
    data = write_jsonl(folder / "pairs.jsonl", colour_pairs(folder, 24, corrupt=2))
    mp.spawn(_worker, args=(free_port(), str(folder), str(data)), nprocs=WORLD, join=True)
    return [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)], folder, data


@pytest.mark.parametrize("name", list(CASES))
def test_one_distributed_step_equals_the_one_process_step(name):
    per_rank, _, _ = run_world()
    architecture, kind, _, micro = CASES[name]
    expected_loss, expected_grads = _step(architecture, kind, "none", None, None, slice(None))
    losses = [ranked[name][0] for ranked in per_rank]
    # the losses' convention: the mean over ranks of the per-rank values is the global loss
    assert sum(losses) / WORLD == pytest.approx(expected_loss, abs=1e-5)
    for grads, _ in ((ranked[name][1], ranked) for ranked in per_rank):
        assert grads.keys() == expected_grads.keys()
        for key, expected in expected_grads.items():
            torch.testing.assert_close(grads[key], expected, atol=1e-5, rtol=1e-4, msg=f"{name}: {key}")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_trainer_on_two_processes_matches_one_process(tmp_path, strategy):
    per_rank, folder, data = run_world()
    assert [ranked["trainer_steps"] for ranked in per_rank] == [(3, 3), (3, 3)]
    from polyclip.train.trainer import train

    single = train(_trainer_config(data, tmp_path / "single"))
    run = folder / ("trainer" if strategy == "ddp" else "trainer_fsdp")
    two, _, _ = polyclip.load(run / "model")
    one, _, _ = polyclip.load(single.model_dir)
    for (name, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items()):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4, msg=name)
    # unreadable images on either rank are counted once and named, whichever rank read them
    for ranked in per_rank:
        count, examples = ranked["trainer_skips"]
        assert count == single.skipped_images >= 2
        assert any("0000.png" in e for e in examples) and any(
            "rank 1: " in e and "0001.png" in e for e in examples
        )
    # the checkpoint gathered on rank 0 resumes: its weights are the final ones
    checkpoint, _, _ = polyclip.load(run / "checkpoints" / "step_00000003")
    for (name, a), (_, b) in zip(two.state_dict().items(), checkpoint.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_torchrun_launches_a_recipe_on_two_processes(tmp_path):
    import shutil
    import subprocess

    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on the PATH")
    data = write_jsonl(tmp_path / "pairs.jsonl", colour_pairs(tmp_path, 24))
    command = [
        torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "polyclip.train", "clip",
        "--smoke", "--set", f"data.train={data}", "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert "2 process(es)" in completed.stdout + completed.stderr
