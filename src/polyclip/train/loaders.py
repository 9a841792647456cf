"""The training data of a run: its source read once, its size in steps, and one data loader per epoch.

Records (CSV, JSONL, Parquet, an image folder: `polyclip.train.data`) go through the resumable
`EpochBatchSampler`; tar shards (`polyclip.train.shards`) through one `ShardStream` per epoch. Either
way every rank gets ``batch_size / world_size`` samples a step and the same number of steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch

from polyclip.train.augment import build_train_augmentation
from polyclip.train.config import TrainConfig, TrainConfigError
from polyclip.train.data import (
    Batch,
    Collate,
    DataError,
    EpochBatchSampler,
    PairDataset,
    detect_format,
    read_records,
)
from polyclip.train.distributed import DistEnv


class TrainingData:
    def __init__(self, config: TrainConfig, env: DistEnv, preprocess_config, tokenizer) -> None:
        data = config.data
        self.config, self.env, self.tokenizer = config, env, tokenizer
        self.format = detect_format(data)
        self.augmentation = build_train_augmentation(preprocess_config, config.augment)
        if data.batch_size % env.world_size:
            raise TrainConfigError(
                f"data.batch_size {data.batch_size} must be a multiple of the number of processes ({env.world_size})"
            )
        self.local_batch = data.batch_size // env.world_size
        micro = config.micro_batch_size
        if micro is not None and self.local_batch % micro:
            raise TrainConfigError(
                f"micro_batch_size {micro} must divide the per-process batch {self.local_batch} "
                f"(data.batch_size {data.batch_size} over {env.world_size} processes)"
            )
        self.dataset = None
        if self.format == "wds":
            from polyclip.train.shards import expand_shards, shard_sizes

            self.shards = expand_shards(data.train)
            self.shard_sizes = shard_sizes(self.shards)
            num_samples = data.samples_per_epoch or sum(self.shard_sizes)
        else:
            records = read_records(data)
            self.dataset = PairDataset(
                records, self.augmentation, config.seed, data.captions, data.text_types, data.max_bad_in_a_row
            )
            num_samples = len(records)
        self.num_samples = num_samples
        self.steps_per_epoch = num_samples // data.batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"the training data holds {num_samples} pairs, fewer than one batch of {data.batch_size}: "
                "lower data.batch_size or add data"
            )
        schedule = config.schedule
        self.total_steps = schedule.max_steps or max(1, math.ceil(schedule.epochs * self.steps_per_epoch))

    def loader(self, epoch: int, start_batch: int) -> Iterable[Batch]:
        """This rank's batches ``start_batch ..`` of ``epoch`` (collated, tokenised, in worker processes)."""
        data, env = self.config.data, self.env
        pin = env.device.type == "cuda"
        if self.format == "wds":
            from polyclip.train.shards import ShardStream

            stream = ShardStream(
                self.shards, self.shard_sizes, self.augmentation, self.tokenizer, self.local_batch, env.rank,
                env.world_size, self.config.seed, epoch, self.steps_per_epoch, start_batch, data.shuffle_buffer,
                data.text_types, data.max_bad_in_a_row, continuous=data.samples_per_epoch is not None,
            )  # fmt: skip
            loader = torch.utils.data.DataLoader(
                stream, batch_size=None, num_workers=data.num_workers, pin_memory=pin
            )
            return _take(loader, self.steps_per_epoch - start_batch)
        sampler = EpochBatchSampler(
            len(self.dataset), data.batch_size, env.rank, env.world_size, self.config.seed, epoch, start_batch
        )
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=data.num_workers,
            collate_fn=Collate(self.tokenizer),
            pin_memory=pin,
        )


def _take(loader, count: int) -> Iterator[Batch]:
    """The first ``count`` batches of a loader, then its workers are shut down."""
    iterator = iter(loader)
    try:
        for _ in range(count):
            yield next(iterator)
    finally:
        del iterator
