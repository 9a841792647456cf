"""What a run reports: a progress bar, ``metrics.jsonl``, TensorBoard scalars and PNG plots.

Only the main process writes. Every record is one JSON line ``{"step": ..., "kind": "train" | "eval",
...metrics}``; a resumed run appends to the same file after dropping the lines of steps it will
redo, so the file always describes one continuous run. The plots are drawn from that file at the end.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from polyclip.train.config import LogConfig

METRICS_NAME = "metrics.jsonl"


class RunLogger:
    def __init__(
        self, run_dir: Path, config: LogConfig, total_steps: int, enabled: bool, start_step: int = 0
    ):
        self.run_dir, self.config, self.enabled = run_dir, config, enabled
        self.path = run_dir / METRICS_NAME
        self._tensorboard = None
        self._progress = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if config.jsonl:
            self._truncate_after(start_step)
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ImportError(
                    "log.tensorboard needs the tensorboard package: pip install 'polyclip[train]'"
                ) from error
            self._tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step or None)
        if config.progress and config.console:
            from polyclip.progress import progress_bar

            # a bar on a terminal only; in a pipe or a log file the log lines say it all
            self._progress = progress_bar(total=total_steps, initial=start_step, unit="step")

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, kind: str, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, **metrics}
        if self.config.jsonl:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record, default=_plain) + "\n")
        if self._tensorboard is not None:
            for name, value in metrics.items():
                if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                    self._tensorboard.add_scalar(f"{kind}/{name}", value, step)
        if self._progress is not None and kind == "train":
            self._progress.set_postfix(
                loss=f"{metrics.get('loss', float('nan')):.4f}", lr=f"{metrics.get('lr', 0):.2e}"
            )

    def advance(self, steps: int = 1) -> None:
        if self._progress is not None:
            self._progress.update(steps)

    def write(self, message: str) -> None:
        if not self.enabled or not self.config.console:
            return
        if self._progress is not None:
            self._progress.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(run_dir: Path) -> list[Path]:
    """PNG plots of the training loss and learning rate, and of each evaluation metric, from metrics.jsonl."""
    records = read_metrics(run_dir / METRICS_NAME)
    if not records:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "log.plots needs matplotlib: pip install 'polyclip[train]' (or set log.plots=false)"
        ) from error
    written = []
    train = [r for r in records if r["kind"] == "train"]
    if train:
        figure, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        steps = [r["step"] for r in train]
        axes[0].plot(steps, [r["loss"] for r in train])
        axes[0].set(title="training loss", xlabel="step", ylabel="loss")
        axes[1].plot(steps, [r["lr"] for r in train])
        axes[1].set(title="learning rate", xlabel="step")
        figure.tight_layout()
        written.append(run_dir / "loss.png")
        figure.savefig(written[-1], dpi=100)
        plt.close(figure)
    evaluations = [r for r in records if r["kind"] == "eval"]
    names = sorted(
        {
            k
            for r in evaluations
            for k, v in r.items()
            if k not in ("step", "kind") and isinstance(v, int | float)
        }
    )
    if names:
        figure, axis = plt.subplots(figsize=(6, 3.5))
        for name in names:
            points = [(r["step"], r[name]) for r in evaluations if name in r]
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        axis.set(title="evaluation", xlabel="step")
        axis.legend(fontsize="small")
        figure.tight_layout()
        written.append(run_dir / "eval.png")
        figure.savefig(written[-1], dpi=100)
        plt.close(figure)
    return written
