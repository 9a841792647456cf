"""Training and fine-tuning of dual encoders: recipes, data, the trainer, WiSE-FT and the offline demo.

    from polyclip.train import get_recipe, train
    config = get_recipe("clip_rsicd", smoke=True)
    config.data.train = "rsicd/dataset_rsicd.json"
    result = train(config)

Launch on several processes with ``torchrun --nproc-per-node N -m polyclip.train RECIPE --set ...``.
Imports are lazy so that ``import polyclip.train`` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TrainConfig": "polyclip.train.config",
    "TrainConfigError": "polyclip.train.config",
    "ModelSpec": "polyclip.train.config",
    "DataConfig": "polyclip.train.config",
    "AugmentConfig": "polyclip.train.config",
    "LossConfig": "polyclip.train.config",
    "OptimConfig": "polyclip.train.config",
    "ScheduleConfig": "polyclip.train.config",
    "DistributedConfig": "polyclip.train.config",
    "EvalConfig": "polyclip.train.config",
    "CheckpointConfig": "polyclip.train.config",
    "LogConfig": "polyclip.train.config",
    "apply_overrides": "polyclip.train.config",
    "DataError": "polyclip.train.data",
    "Trainer": "polyclip.train.trainer",
    "TrainResult": "polyclip.train.trainer",
    "train": "polyclip.train.trainer",
    "wise_ft": "polyclip.train.wise_ft",
    "WiseFtError": "polyclip.train.wise_ft",
    "get_recipe": "polyclip.train.recipes",
    "list_recipes": "polyclip.train.recipes",
    "run_demo": "polyclip.train.demo",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'polyclip.train' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
