"""Tar shards read exactly once per epoch over (shards, ranks, workers), on 2 real gloo processes; exact
and refused resumes; unreadable samples; and a dead rank named by the survivors.

One spawn of 2 processes serves every distributed case (process start-up dominates the run time).
"""

from __future__ import annotations

import functools
import io
import os
import tarfile
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port
from polyclip.tokenizers import ClipTokenizer
from polyclip.train.augment import build_train_augmentation
from polyclip.train.config import AugmentConfig, TrainConfigError
from polyclip.train.data import DataError
from polyclip.train.distributed import DistEnv, PeerFailure, _describe_failure, name_failed_ranks
from polyclip.train.shards import ShardStream, expand_shards, shard_sizes
from polyclip.train.state import SkipLog, check_resume
from polyclip.transforms import PreprocessConfig
from test_train_fixtures import COLOURS, single_thread, write_image  # noqa: F401 (autouse fixture)

WORLD = 2
# name -> (samples per shard, data-loader workers per rank, global batch)
CASES = {
    "6_shards_on_4_streams": ([16] * 6, 2, 8),  # whole shards cannot split evenly: 16 of 96 were read twice
    "uneven_3_shards": ([20, 7, 13], 2, 6),  # 40 samples, 6 batches of 6: 4 left over each epoch
    "8_shards_one_worker": ([5] * 8, 1, 8),
    "5_uneven_shards_3_workers": ([9, 3, 11, 1, 8], 3, 6),
    "1_shard_on_4_streams": ([30], 2, 4),
}
EPOCHS = 2


def write_sized_shards(folder: Path, sizes: list[int], corrupt: tuple[int, ...] = ()) -> list[str]:
    """Shards of the given sizes; sample keys ``shard-i/NNNN`` are unique over all of them."""
    folder.mkdir(parents=True, exist_ok=True)
    write_image(folder / "one.png", COLOURS["red"], 0, size=8)
    png = (folder / "one.png").read_bytes()
    paths, number = [], 0
    for shard, size in enumerate(sizes):
        path = folder / f"shard-{shard:03d}.tar"
        with tarfile.open(path, "w") as archive:
            for _ in range(size):
                data = b"garbage" if number in corrupt else png
                for name, payload in (
                    (f"{number:05d}.png", data),
                    (f"{number:05d}.txt", f"sample {number}".encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    archive.addfile(info, io.BytesIO(payload))
                number += 1
        paths.append(str(path))
    return paths


def _stream(shards, rank, world, batch, epoch, skip=0, shuffle_buffer=5, **kwargs) -> ShardStream:
    augmentation = build_train_augmentation(
        PreprocessConfig(image_size=8), AugmentConfig(random_resized_crop=None)
    )
    sizes = shard_sizes(shards)
    steps = sum(sizes) // batch
    return ShardStream(
        shards, sizes, augmentation, ClipTokenizer(context_length=8), batch // world, rank, world, seed=0,
        epoch=epoch, steps=steps, skip_batches=skip, shuffle_buffer=shuffle_buffer, **kwargs,
    )  # fmt: skip


def in_loader_order(stream: ShardStream, workers: int) -> list:
    """The batches in the order a DataLoader with ``workers`` workers yields them (round robin)."""
    iterators = [stream.batches(p, max(1, workers)) for p in range(max(1, workers))]
    batches, live = [], list(iterators)
    while live:
        for iterator in list(live):
            batch = next(iterator, None)
            if batch is None:
                live.remove(iterator)
            else:
                batches.append(batch)
    return batches


def _keys(batches) -> list[str]:
    return [key.rsplit(":", 1)[1] for batch in batches for key in batch.keys]


def _worker(rank: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    env = DistEnv(rank, WORLD, rank, torch.device("cpu"), "ddp")
    results = {}
    for name, (_, workers, batch) in CASES.items():
        shards = sorted(str(p) for p in Path(folder, name).glob("*.tar"))
        for epoch in range(EPOCHS):
            mine = _keys(in_loader_order(_stream(shards, rank, WORLD, batch, epoch), workers))
            everyone = [None] * WORLD
            dist.all_gather_object(everyone, mine)
            results[name, epoch] = everyone
    # the real DataLoader interleaves its workers as `in_loader_order` does
    _, workers, batch = CASES["6_shards_on_4_streams"]
    shards = sorted(str(p) for p in Path(folder, "6_shards_on_4_streams").glob("*.tar"))
    stream = _stream(shards, rank, WORLD, batch, 0)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    results["loader"] = (_keys(loader), _keys(in_loader_order(stream, workers)))
    # a skip seen on rank 1 only reaches rank 0, and a resume counts it once (not once per rank)
    skips = SkipLog()
    skips.record(["x.png: broken"] if rank == 1 else [])
    new = skips.gather(env)
    resumed = SkipLog()
    resumed.load(skips.state())
    resumed.record(["y.png: broken"] if rank == 0 else [])
    resumed.gather(env)
    results["skips"] = (new, skips.total, resumed.total, resumed.examples)
    # rank 1 dies without a word; rank 0's next collective names it
    dist.barrier()
    if rank == 1:
        os._exit(0)
    started = time.perf_counter()
    try:
        with name_failed_ranks(env, wait_s=1.0):
            dist.all_reduce(torch.ones(1))
        results["dead"] = "no error"
    except PeerFailure as error:
        results["dead"] = str(error)
    results["dead_seconds"] = time.perf_counter() - started
    torch.save(results, Path(folder) / "rank0.pt")
    os._exit(0)


@functools.cache
def run_world() -> dict:
    folder = Path(tempfile.mkdtemp(prefix="polyclip-shards-"))
    for name, (sizes, _, _) in CASES.items():
        write_sized_shards(folder / name, sizes)
    context = mp.spawn(_worker, args=(free_port(), str(folder)), nprocs=WORLD, join=False)
    for process in context.processes:
        process.join(120)
    return torch.load(folder / "rank0.pt")


@pytest.mark.parametrize("name", list(CASES))
def test_every_sample_exactly_once_per_epoch_over_shards_ranks_and_workers(name):
    sizes, workers, batch = CASES[name]
    results = run_world()
    total, steps = sum(sizes), sum(sizes) // batch
    epochs = []
    for epoch in range(EPOCHS):
        per_rank = results[name, epoch]
        assert [len(keys) for keys in per_rank] == [steps * batch // WORLD] * WORLD
        seen = [key for keys in per_rank for key in keys]
        assert len(seen) == len(set(seen)) == steps * batch  # nothing read twice
        assert set(seen) <= {f"{n:05d}" for n in range(total)}
        epochs.append(set(seen))
    if steps * batch < total:
        assert epochs[0] != epochs[1]  # the left-over samples differ between epochs


def test_the_real_data_loader_interleaves_workers_as_expected():
    loaded, expected = run_world()["loader"]
    assert loaded == expected and len(loaded) == len(set(loaded))


def test_skips_of_every_rank_are_gathered_and_counted_once_after_a_resume():
    new, total, resumed_total, examples = run_world()["skips"]
    assert new == ["rank 1: x.png: broken"] and total == 1
    assert resumed_total == 2 and examples == ["rank 1: x.png: broken", "rank 0: y.png: broken"]


def test_a_dead_rank_is_named_by_the_survivor():
    results = run_world()
    assert "rank(s) 1 stopped answering" in results["dead"], results["dead"]
    assert results["dead_seconds"] < 10


def test_a_failed_rank_leaves_its_reason_for_the_others():
    store = dist.HashStore()
    store.set("polyclip/failed/1", "DataError: cannot read shard x.tar")
    message = _describe_failure(
        DistEnv(0, 3, 0, torch.device("cpu"), "ddp"), store, 0.3, RuntimeError("Connection reset by peer")
    )
    assert "rank 1 failed: DataError: cannot read shard x.tar" in message
    assert "rank(s) 2 stopped answering" in message


def test_resume_mid_epoch_is_exact_and_refused_with_other_workers(tmp_path):
    shards = write_sized_shards(tmp_path, [16] * 6)
    for workers in (1, 2, 3):
        full = in_loader_order(_stream(shards, 0, 2, 8, epoch=1), workers)
        resumed = in_loader_order(_stream(shards, 0, 2, 8, epoch=1, skip=5), workers)
        assert len(resumed) == len(full) - 5
        for expected, got in zip(full[5:], resumed):
            assert expected.keys == got.keys and torch.equal(expected.pixels, got.pixels)
            assert torch.equal(expected.token_ids, got.token_ids)
    state = {"epoch": 1, "batch_in_epoch": 5, "rng": [{}, {}], "config": {"data": {"num_workers": 2}}}
    check_resume(state, "wds", 2, 2)
    check_resume(state, "jsonl", 4, 2)  # records are addressed by sample, whatever the workers
    check_resume({**state, "batch_in_epoch": 0}, "wds", 4, 1)  # at an epoch end anything goes
    with pytest.raises(TrainConfigError, match=r"data.num_workers=2 on 2 process"):
        check_resume(state, "wds", 3, 2)
    with pytest.raises(TrainConfigError, match="2 process"):
        check_resume(state, "wds", 2, 4)


def test_unreadable_samples_are_replaced_within_their_batch(tmp_path):
    shards = write_sized_shards(tmp_path / "some", [12], corrupt=(0, 1, 2, 3, 5))
    batches = in_loader_order(_stream(shards, 0, 1, 4, epoch=0), 1)
    skipped = [reason for batch in batches for reason in batch.skipped]
    assert len(skipped) == 5 and "00005" in " ".join(skipped)
    assert [len(b) for b in batches] == [4, 4, 4]
    assert set(_keys(batches)) == {f"{n:05d}" for n in range(12)} - {
        "00000",
        "00001",
        "00002",
        "00003",
        "00005",
    }
    # one readable sample in 8: a batch of 4 without it borrows it from further on in the stream
    shards = write_sized_shards(tmp_path / "most", [8], corrupt=(0, 1, 2, 3, 4, 6, 7))
    batches = in_loader_order(_stream(shards, 0, 1, 4, epoch=0), 1)
    assert _keys(batches) == ["00005"] * 8 and sum(len(b.skipped) for b in batches) == 7
    with pytest.raises(DataError, match="unreadable samples in a row"):
        in_loader_order(_stream(shards, 0, 1, 4, epoch=0, max_bad_in_a_row=3), 1)


def test_shard_names_and_counts(tmp_path):
    shards = write_sized_shards(tmp_path / "s", [3, 2])
    assert expand_shards(str(tmp_path / "s" / "shard-{000..001}.tar")) == shards
    assert expand_shards(str(tmp_path / "s" / "shard-{000,001}.tar")) == shards
    assert expand_shards(str(tmp_path / "s")) == shards
    assert shard_sizes(shards) == [3, 2]
    with pytest.raises(DataError, match="do not exist"):
        expand_shards(str(tmp_path / "s" / "shard-{000..009}.tar"))
    (tmp_path / "bad.tar").write_bytes(b"x" * 1000)
    with pytest.raises(DataError, match="cannot read shard"):
        shard_sizes([str(tmp_path / "bad.tar")])
