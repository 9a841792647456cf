"""Typed training configuration: one dataclass per concern, gathered in `TrainConfig`.

Recipes are small functions returning a `TrainConfig` (big_vision's ``get_config``, nanoGPT's
``config/``). Every field can be overridden from the command line as ``section.field=value``
(``optim.lr=1e-5``, ``data.train=roco/train.csv``, ``model.config.vision.width=256``); values are
parsed with the field's type. JSON is only how a config is saved next to a run; unknown keys are
rejected.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polyclip.models import DualEncoderConfig


class TrainConfigError(ValueError):
    """A training setting is missing, malformed or contradicts another one."""


@dataclass
class ModelSpec:
    """Which dual encoder to train and what to freeze."""

    architecture: str | None = None  # a registered architecture, trained from random weights
    pretrained: str | None = None  # a registry name, hf-hub:org/repo or a local folder to fine-tune
    config: DualEncoderConfig | None = None  # an explicit architecture (the demo's), from random weights
    context_length: int | None = None  # tokenizer length; None: the text tower's (CLIP-RSICD trains at 32)
    preprocess: str | None = None  # a preset of polyclip.transforms.PRESETS; None: the model's own
    grad_checkpointing: bool = False
    # LiT ("Locked-image text Tuning", 2022): a locked tower keeps its weights; its last N blocks may still train.
    lock_image: bool = False
    lock_image_unlocked_blocks: int = 0
    lock_text: bool = False
    lock_text_unlocked_blocks: int = 0


@dataclass
class DataConfig:
    """Where the image-caption pairs come from and how they are batched."""

    train: str = ""  # required: a CSV/TSV/Parquet/JSONL file, a dataset_*.json, an image folder or tar shards
    # "auto" guesses from the suffix (.csv .tsv .parquet .jsonl .json .tar, a folder = ImageFolder)
    format: str = "auto"
    image_root: str | None = None  # image paths are relative to this; None: the data file's folder
    image_key: str | None = None  # column or JSON key of the image path; None: image/filename/filepath/path
    caption_key: str | None = None  # column or key of the caption(s); None: captions/caption/text/title/raw
    split: str | None = None  # keep only records whose "split" is this (dataset_*.json: "train")
    # "random": one caption of the image, drawn per sample and epoch; "each": every caption is a
    # sample (CLIP-RSICD); "first": always the first caption
    captions: str = "random"
    folder_templates: tuple[str, ...] = ("a photo of a {}.",)  # ImageFolder: class name -> caption
    # Captions written from other columns, e.g. StreetCLIP's "A Street View photo in {city}, {region},
    # {country}."; None: the caption column itself
    caption_template: str | None = None
    # BioCLIP's mixed text types: columns/keys each holding one kind of caption; every batch uses
    # one kind, drawn per batch. Empty: the caption_key.
    text_types: tuple[str, ...] = ()
    samples_per_epoch: int | None = None  # tar shards: samples in one epoch (None: counted once)
    shuffle_buffer: int = 1000  # tar shards: samples mixed in the shuffle buffer
    batch_size: int = 64  # the contrastive batch over all processes (each gets batch_size / world)
    num_workers: int = 2  # decoding processes per training process; 0 decodes in the training process
    max_bad_in_a_row: int = 50  # unreadable images replaced in a row before the run gives up


@dataclass
class AugmentConfig:
    """Training augmentations (polyclip.transforms' torchvision-compatible ones); None disables one."""

    random_resized_crop: tuple[float, float] | None = (0.9, 1.0)  # area fractions; open_clip's default
    aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    # Resize the short side to image_size / fraction, then crop image_size at a random place (RSICD 0.8).
    random_crop: float | None = None
    hflip: float = 0.0  # probabilities
    vflip: float = 0.0
    color_jitter: tuple[float, ...] | None = None  # (brightness, contrast, saturation[, hue])


@dataclass
class LossConfig:
    kind: str = "auto"  # "clip", "siglip", or "auto": siglip when the model has a logit bias
    chunk_size: int | None = None  # sigmoid loss in blocks of this many text rows (memory O(C x N))
    local_loss: bool = False  # softmax loss: local rows against the global batch (needs gather_with_grad)
    gather_with_grad: bool = False
    bidirectional: bool = True  # sigmoid loss ring: texts travel both ways


@dataclass
class OptimConfig:
    name: str = "adamw"  # "adamw" (decoupled decay) or "adam" (L2 penalty in the gradient, PubMedCLIP)
    lr: float = 5e-4
    weight_decay: float = (
        0.2  # open_clip's default; never applied to norms, biases, embeddings, logit scale/bias
    )
    betas: tuple[float, float] = (0.9, 0.98)  # CLIP paper; beta2 0.98 keeps large-batch training stable
    eps: float = 1e-6
    grad_clip_norm: float | None = 1.0  # None: no clipping
    implementation: str = "auto"  # "fused", "foreach", "for-loop"; "auto": fused, foreach under FSDP


@dataclass
class ScheduleConfig:
    epochs: float | None = 1.0  # passes over the data (fractions allowed); ignored when max_steps is set
    max_steps: int | None = None
    warmup_steps: int = 100  # linear warm-up from 0, then the decay
    decay: str = "cosine"  # "cosine" or "linear" (to min_lr), or "constant"
    min_lr: float = 0.0


@dataclass
class DistributedConfig:
    strategy: str = "ddp"  # "ddp": replicated weights; "fsdp": sharded (FSDP2 fully_shard per block)
    backend: str | None = None  # None: nccl on CUDA, gloo on CPU
    timeout_s: int | None = None  # a collective's wait for a missing peer; None: 1800 on NCCL, 300 on gloo


@dataclass
class EvalConfig:
    zero_shot: str | None = None  # a labelled image folder (root/<class>/<image>); classes become prompts
    zero_shot_templates: tuple[str, ...] = ("a photo of a {}.",)
    retrieval: str | None = None  # validation pairs: CSV, JSONL or dataset_*.json
    retrieval_split: str | None = None  # e.g. "val" or "test" in a dataset_*.json
    every_steps: int | None = None  # also evaluate every N steps
    every_epochs: int | None = 1  # evaluate after every N epochs (and always at the end)
    batch_size: int = 64
    num_workers: int = 0


@dataclass
class CheckpointConfig:
    every_steps: int | None = None  # save every N steps (and at every epoch end and at the end)
    keep_last: int = 2  # older checkpoints are deleted
    resume: str | None = None  # a checkpoint folder, or "latest" (the newest in output_dir/checkpoints)
    export_hf: bool = False  # write the final model as a transformers folder too
    export_open_clip: bool = False  # and as an open_clip folder
    wise_ft_alphas: tuple[float, ...] = ()  # also save WiSE-FT mixes of the pretrained and final weights


@dataclass
class LogConfig:
    every_steps: int = 10
    console: bool = True  # messages (start, evaluations, skipped images) on the console
    progress: bool = True  # a progress bar (with console)
    jsonl: bool = True
    tensorboard: bool = False
    plots: bool = True  # PNG plots of loss, learning rate and evaluation metrics at the end


@dataclass
class TrainConfig:
    name: str = "run"
    output_dir: str = ""  # "" -> runs/<name>
    seed: int = 0
    device: str | None = None  # None: cuda:<local rank> when available, else cpu
    precision: str = "fp32"  # "fp32" or "bf16" (autocast; weights and optimiser state stay fp32)
    threads: int | None = None  # torch CPU threads per process; None: torch's default
    # Exact gradient accumulation: the contrastive batch is split into micro-batches of this size;
    # features of the whole batch are computed first without gradients (GradCache).
    micro_batch_size: int | None = None
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or Path("runs") / self.name)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return _from_plain(cls, data, "config")

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise TrainConfigError(f"cannot read the training config {path}: {error}") from error
        return cls.from_dict(data)

    def validate(self) -> TrainConfig:
        """Check the settings that need no files; returns self. Raises TrainConfigError."""
        _validate(self)
        return self


# ---------------------------------------------------------------------------------------------------------
# plain dict round trip


def _to_plain(value: Any) -> Any:
    if isinstance(value, DualEncoderConfig):
        return value.to_dict()
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    return value


def _from_plain(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise TrainConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise TrainConfigError(f"{where}: unknown keys {unknown}; allowed: {sorted(known)}")
    values = {name: _coerce(hints[name], raw, f"{where}.{name}") for name, raw in data.items()}
    return cls(**values)


def _coerce(hint: Any, raw: Any, where: str) -> Any:
    """A JSON value -> the field's type (tuples from lists, nested dataclasses from dicts)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if raw is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _coerce(hint, raw, where)
    if hint is DualEncoderConfig:
        return raw if isinstance(raw, DualEncoderConfig) else DualEncoderConfig.from_dict(raw)
    if dataclasses.is_dataclass(hint):
        return _from_plain(hint, raw, where)
    if origin is tuple:
        if not isinstance(raw, list | tuple):
            raise TrainConfigError(f"{where}: expected a list, got {raw!r}")
        return tuple(raw)
    if hint is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    return raw


# ---------------------------------------------------------------------------------------------------------
# command-line overrides: section.field=value


def apply_overrides(config: TrainConfig, overrides: list[str] | tuple[str, ...]) -> TrainConfig:
    """Set ``a.b.c=value`` fields in place (values parsed with the field's type); returns config."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise TrainConfigError(f"override {item!r} must look like section.field=value")
        set_field(config, key.strip(), text.strip())
    return config


def set_field(config: Any, dotted: str, text: str) -> None:
    target, path = config, dotted.split(".")
    for depth, name in enumerate(path):
        if not dataclasses.is_dataclass(target):
            raise TrainConfigError(f"{'.'.join(path[:depth])} is not a section; cannot set {dotted}")
        names = [f.name for f in dataclasses.fields(target)]
        if name not in names:
            where = ".".join(path[:depth]) or "the config"
            raise TrainConfigError(f"{where} has no field {name!r}; fields: {', '.join(names)}")
        hint = typing.get_type_hints(type(target))[name]
        if depth == len(path) - 1:
            setattr(target, name, parse_value(hint, text, dotted))
            return
        child = getattr(target, name)
        if child is None:  # an optional section (model.config): start from its defaults
            child = _default_for(hint, dotted)
            setattr(target, name, child)
        target = child


def _default_for(hint: Any, dotted: str) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if len(args) == 1 and dataclasses.is_dataclass(args[0]):
        return args[0]()
    raise TrainConfigError(f"cannot set {dotted}: its section is empty")


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def parse_value(hint: Any, text: str, where: str) -> Any:
    """Parse a command-line string as ``hint`` (int, float, bool, str, tuples, X | None)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return parse_value(hint, text, where)
    try:
        if hint is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError("expected true or false")
        if hint is int:
            return int(text)
        if hint is float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError("expected a finite number")
            return value
        if hint is str:
            return text
        if origin is tuple:
            items = [part.strip() for part in text.split(",") if part.strip()] if text.strip() else []
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(parse_value(args[0], part, where) for part in items)
            if len(items) != len(args):
                raise ValueError(f"expected {len(args)} comma-separated values")
            return tuple(parse_value(a, part, where) for a, part in zip(args, items))
        if hint is DualEncoderConfig:
            from polyclip.models import get_architecture

            return get_architecture(text)
    except ValueError as error:
        raise TrainConfigError(f"{where}={text!r}: {error}") from None
    raise TrainConfigError(f"{where}: fields of type {hint} cannot be set from the command line")


# ---------------------------------------------------------------------------------------------------------
# validation

_CHOICES = {
    "data.format": ("auto", "csv", "tsv", "parquet", "jsonl", "json", "folder", "wds"),
    "data.captions": ("random", "each", "first"),
    "loss.kind": ("auto", "clip", "siglip"),
    "optim.name": ("adamw", "adam"),
    "optim.implementation": ("auto", "fused", "foreach", "for-loop"),
    "schedule.decay": ("cosine", "linear", "constant"),
    "distributed.strategy": ("ddp", "fsdp"),
    "precision": ("fp32", "bf16"),
}


def _get(config: TrainConfig, dotted: str) -> Any:
    value = config
    for name in dotted.split("."):
        value = getattr(value, name)
    return value


def _validate(config: TrainConfig) -> None:
    for dotted, choices in _CHOICES.items():
        value = _get(config, dotted)
        if value not in choices:
            raise TrainConfigError(f"{dotted} must be one of {', '.join(choices)}; got {value!r}")
    model = config.model
    sources = [n for n in ("architecture", "pretrained", "config") if getattr(model, n) is not None]
    if len(sources) != 1:
        raise TrainConfigError(
            "set exactly one of model.architecture (train from scratch), model.pretrained (fine-tune) "
            f"or model.config; got {sources or 'none'}"
        )
    if not config.data.train:
        raise TrainConfigError("data.train is required: the training pairs (set it with data.train=PATH)")
    positive = {
        "data.batch_size": config.data.batch_size,
        "optim.lr": config.optim.lr,
        "log.every_steps": config.log.every_steps,
        "checkpoint.keep_last": config.checkpoint.keep_last,
        "eval.batch_size": config.eval.batch_size,
        "data.max_bad_in_a_row": config.data.max_bad_in_a_row,
    }
    for dotted, value in positive.items():
        if value <= 0:
            raise TrainConfigError(f"{dotted} must be positive, got {value}")
    if config.threads is not None and config.threads < 1:
        raise TrainConfigError(f"threads must be positive, got {config.threads}")
    for dotted in ("data.num_workers", "eval.num_workers", "schedule.warmup_steps", "optim.weight_decay"):
        if _get(config, dotted) < 0:
            raise TrainConfigError(f"{dotted} must not be negative, got {_get(config, dotted)}")
    if config.schedule.max_steps is None and config.schedule.epochs is None:
        raise TrainConfigError("schedule.epochs=none needs schedule.max_steps: the run's length in steps")
    if config.schedule.epochs is not None and config.schedule.epochs <= 0:
        raise TrainConfigError(f"schedule.epochs must be positive, got {config.schedule.epochs}")
    if config.schedule.max_steps is not None and config.schedule.max_steps <= 0:
        raise TrainConfigError(f"schedule.max_steps must be positive, got {config.schedule.max_steps}")
    micro = config.micro_batch_size
    if micro is not None and (micro <= 0 or config.data.batch_size % micro):
        raise TrainConfigError(
            f"micro_batch_size ({micro}) must be positive and divide data.batch_size ({config.data.batch_size})"
        )
    for dotted in ("model.lock_image_unlocked_blocks", "model.lock_text_unlocked_blocks"):
        if _get(config, dotted) < 0:
            raise TrainConfigError(f"{dotted} must not be negative")
    for alpha in config.checkpoint.wise_ft_alphas:
        if not 0.0 <= alpha <= 1.0:
            raise TrainConfigError(f"checkpoint.wise_ft_alphas must lie in [0, 1], got {alpha}")
    if config.checkpoint.wise_ft_alphas and model.pretrained is None:
        raise TrainConfigError("WiSE-FT mixes pretrained and fine-tuned weights: it needs model.pretrained")
    if config.data.captions not in ("random", "first") and config.data.text_types:
        raise TrainConfigError("data.text_types picks one caption kind per batch; use data.captions=random")
    if not config.data.folder_templates or any("{}" not in t for t in config.data.folder_templates):
        raise TrainConfigError("every data.folder_templates entry needs a {} placeholder for the class name")
    if not config.eval.zero_shot_templates or any("{}" not in t for t in config.eval.zero_shot_templates):
        raise TrainConfigError("every eval.zero_shot_templates entry needs a {} placeholder")
