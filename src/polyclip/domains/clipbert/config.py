"""Typed configuration of ClipBERT: the grid-feature CNN, the BERT cross-encoder and the task head.

Defaults are the released base model (Lei et al. 2021, "Less is More: ClipBERT for Video-and-Language
Learning via Sparse Sampling"; reference: jayleicn/ClipBERT ``src/configs/base_model.json`` and
``src/configs/detectron2_configs/R-50-grid.yaml``): a detectron2 ResNet-50 whose res5 runs without
dilation, a 3x3 convolution 2048 -> 768, and BERT-base (12 layers, width 768, 12 heads, vocabulary 30522).
JSON is only how a configuration is saved; unknown keys are rejected.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


class ClipBertConfigError(ValueError):
    """A ClipBERT configuration is inconsistent or holds unknown keys."""


HEAD_KINDS = ("itm", "mlp")


@dataclass
class GridBackboneConfig:
    """detectron2's ResNet (``build_resnet_backbone``) up to res5, then ClipBERT's grid encoder."""

    stage_blocks: tuple[int, ...] = (3, 4, 6, 3)  # res2..res5 blocks: ResNet-50
    stem_channels: int = 64
    res2_out_channels: int = 256  # doubles at every later stage: 2048 after res5
    res2_bottleneck_channels: int = 64  # num_groups (1) x width_per_group (64); doubles like the output
    # MSRA/detectron2 weights stride in the first 1x1 conv of a stage (RESNETS.STRIDE_IN_1X1 = True);
    # torchvision's ResNet-50 (v1.5) strides in the 3x3 conv instead
    stride_in_1x1: bool = True
    norm_eps: float = 1e-5  # FrozenBatchNorm2d
    # detectron2 BACKBONE.FREEZE_AT: 2 freezes the stem and res2 (ClipBERT keeps the default while training)
    freeze_at: int = 2
    out_channels: int = 768  # the grid encoder's 3x3 conv output: the cross-encoder's width

    @property
    def res5_channels(self) -> int:
        return self.res2_out_channels * 2 ** (len(self.stage_blocks) - 1)

    @property
    def stride(self) -> int:
        """Pixels per visual token side: stem (4) x stages (2 per stage after res2) x the max pool (2)."""
        return 4 * 2 ** (len(self.stage_blocks) - 1) * 2


@dataclass
class CrossEncoderConfig:
    """BERT-base over ``[text tokens; visual tokens]`` (ClipBERT ``ClipBertBaseModel``)."""

    vocab_size: int = 30522  # bert-base-uncased WordPiece
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512  # text positions only; visual tokens use row/column embeddings
    type_vocab_size: int = 2
    max_grid_rows: int = 100  # max_grid_row_position_embeddings
    max_grid_cols: int = 100  # max_grid_col_position_embeddings
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1  # embeddings, attention output, FFN output, classifier input
    attention_dropout: float = 0.1  # on attention probabilities
    activation: str = "gelu"  # transformers 2.11 ``gelu`` is the exact (erf) GELU
    pad_token_id: int = 0


@dataclass
class HeadConfig:
    """What the pooled [CLS] vector feeds.

    ``itm``: the pre-training image-text matching classifier, a Linear(D, 2) (``cls.seq_relationship``).
    ``mlp``: the fine-tuning classifier Linear(D, scale*D) -> ReLU -> Linear(scale*D, num_outputs), used for
    retrieval (2 outputs with cross-entropy, 1 with the ranking loss), open-ended QA (one output per
    answer) and multiple-choice QA (1 output per question+option).
    """

    kind: str = "itm"
    num_outputs: int = 2
    hidden_scale: int = 2  # cls_hidden_scale


@dataclass
class ClipBertConfig:
    vision: GridBackboneConfig = field(default_factory=GridBackboneConfig)
    text: CrossEncoderConfig = field(default_factory=CrossEncoderConfig)
    head: HeadConfig = field(default_factory=HeadConfig)

    def __post_init__(self) -> None:
        if self.head.kind not in HEAD_KINDS:
            raise ClipBertConfigError(f"head.kind must be one of {HEAD_KINDS}, got {self.head.kind!r}")
        if self.head.kind == "itm" and self.head.num_outputs != 2:
            raise ClipBertConfigError("the ITM head is a 2-way classifier (num_outputs=2)")
        if self.head.num_outputs < 1:
            raise ClipBertConfigError(f"head.num_outputs must be positive, got {self.head.num_outputs}")
        if self.vision.out_channels != self.text.hidden_size:
            raise ClipBertConfigError(
                f"the grid encoder's output ({self.vision.out_channels}) must equal the cross-encoder "
                f"width ({self.text.hidden_size})"
            )
        if self.text.hidden_size % self.text.num_heads:
            raise ClipBertConfigError(
                f"hidden_size {self.text.hidden_size} is not divisible by {self.text.num_heads} heads"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClipBertConfig:
        parts = {"vision": GridBackboneConfig, "text": CrossEncoderConfig, "head": HeadConfig}
        unknown = set(data) - set(parts)
        if unknown:
            raise ClipBertConfigError(f"unknown ClipBERT config keys: {sorted(unknown)}")
        built = {}
        for name, part in parts.items():
            values = dict(data.get(name, {}))
            allowed = {f.name for f in fields(part)}
            extra = set(values) - allowed
            if extra:
                raise ClipBertConfigError(
                    f"unknown keys in ClipBERT config section {name!r}: {sorted(extra)}"
                )
            if "stage_blocks" in values:
                values["stage_blocks"] = tuple(values["stage_blocks"])
            built[name] = part(**values)
        return cls(**built)


def clipbert_config(task: str = "pretrained", num_outputs: int | None = None) -> ClipBertConfig:
    """The base architecture with the head a task uses.

    ``pretrained``: the released image-text checkpoint (ITM head). ``retrieval``: fine-tuned retrieval
    (MLP head, 2 outputs). ``qa``: open-ended video QA (MLP head, ``num_outputs`` answers).
    ``multiple_choice``: one score per question+option (MLP head, 1 output).
    """
    if task == "pretrained":
        head = HeadConfig(kind="itm", num_outputs=2)
    elif task == "retrieval":
        head = HeadConfig(kind="mlp", num_outputs=num_outputs or 2)
    elif task == "qa":
        if not num_outputs:
            raise ClipBertConfigError("open-ended QA needs num_outputs: the size of the answer vocabulary")
        head = HeadConfig(kind="mlp", num_outputs=num_outputs)
    elif task == "multiple_choice":
        head = HeadConfig(kind="mlp", num_outputs=1)
    else:
        raise ClipBertConfigError(
            f"unknown ClipBERT task {task!r}; expected pretrained, retrieval, qa or multiple_choice"
        )
    return ClipBertConfig(head=head)


def tiny_clipbert_config(head: HeadConfig | None = None, width: int = 64) -> ClipBertConfig:
    """A few-hundred-kilobyte configuration for tests: a 4-stage ResNet of one block each, 2 BERT layers."""
    return ClipBertConfig(
        vision=GridBackboneConfig(
            stage_blocks=(1, 1, 1, 1),
            stem_channels=8,
            res2_out_channels=16,
            res2_bottleneck_channels=4,
            out_channels=width,
        ),
        text=CrossEncoderConfig(
            vocab_size=120,
            hidden_size=width,
            num_layers=2,
            num_heads=4,
            intermediate_size=2 * width,
            max_position_embeddings=64,
            max_grid_rows=16,
            max_grid_cols=16,
        ),
        head=head or HeadConfig(),
    )
