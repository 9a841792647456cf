"""The trainer's own state beside the weights: skipped images over all ranks, and what a resume may change.

Skipped images are counted where they are read, on any rank; `SkipLog.gather` collects every rank's
new reasons on each logging step (a collective), so the totals and examples in checkpoints, logs and
the summary are those of the whole run, and a checkpoint holds them once (not once per rank).
"""

from __future__ import annotations

from typing import Any

import torch

from polyclip.train.config import TrainConfigError
from polyclip.train.distributed import DistEnv

SKIP_EXAMPLES = 5  # reasons kept (and logged per gathering) per run


class SkipLog:
    def __init__(self) -> None:
        self.total = 0  # over all ranks, up to the last gather
        self.examples: list[str] = []  # the first SKIP_EXAMPLES reasons of the run
        self._count, self._reasons = 0, []  # this rank's, since the last gather

    def record(self, reasons: list[str]) -> None:
        self._count += len(reasons)
        self._reasons += reasons[: SKIP_EXAMPLES - len(self._reasons)]

    def gather(self, env: DistEnv) -> list[str]:
        """Add every rank's new skips to the totals (collective); the new reasons, "rank r: path: why"."""
        mine = (self._count, self._reasons)
        if env.distributed:
            everyone = [None] * env.world_size
            torch.distributed.all_gather_object(everyone, mine)
        else:
            everyone = [mine]
        self._count, self._reasons = 0, []
        new = []
        for rank, (count, reasons) in enumerate(everyone):
            self.total += count
            new += [f"rank {rank}: {reason}" if env.distributed else reason for reason in reasons]
        self.examples += new[: SKIP_EXAMPLES - len(self.examples)]
        return new

    def state(self) -> dict[str, Any]:
        """For a checkpoint (after a gather, so it holds every rank's skips)."""
        return {"skipped": self.total, "skipped_examples": list(self.examples)}

    def load(self, state: dict[str, Any]) -> None:
        self.total, self.examples = int(state["skipped"]), list(state["skipped_examples"])


def check_resume(state: dict[str, Any], data_format: str, num_workers: int, world_size: int) -> None:
    """Refuse a mid-epoch resume of tar shards with other numbers of workers or processes.

    Shards are split into one range per (process, worker) stream (`polyclip.train.shards`), so the
    rest of an epoch can only be read exactly by the same streams; records have no such limit.
    """
    if data_format != "wds" or state["batch_in_epoch"] == 0:
        return
    saved = state.get("config", {}).get("data", {})
    saved_workers = max(1, int(saved.get("num_workers", num_workers)))
    saved_world = len(state["rng"])
    if (saved_workers, saved_world) != (max(1, num_workers), world_size):
        raise TrainConfigError(
            f"this checkpoint stopped in the middle of epoch {state['epoch']} (after batch "
            f"{state['batch_in_epoch']}) of tar shards split over {saved_world} process(es) x {saved_workers} "
            f"data worker(s); resuming with {world_size} x {max(1, num_workers)} would read some samples twice "
            f"and others never. Resume with data.num_workers={saved.get('num_workers')} on {saved_world} "
            "process(es), or from a checkpoint saved at the end of an epoch"
        )
