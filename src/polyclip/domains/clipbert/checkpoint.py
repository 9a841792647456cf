"""ClipBERT checkpoints: the reference's own state dicts, polyclip folders, and initialisation sources.

Reference layout (jayleicn/ClipBERT: ``ClipBert`` saved with ``torch.save(model.state_dict())``, e.g.
``clipbert_image_text_pretrained.pt`` and the ``ckpt/model_step_*.pt`` files of fine-tuning):

- ``cnn.feature.backbone.{stem,res2..res5}.*`` the detectron2 ResNet; ``cnn.grid_encoder.0.weight``;
- ``cnn.feature.{proposal_generator,roi_heads}.*`` and ``cnn.feature.pixel_{mean,std}``: the detection
  heads of the grid-feature model and its input statistics, which ClipBERT never runs (it calls
  ``feature.backbone`` directly and normalises pixels in its data loader);
- ``transformer.bert.{embeddings,visual_embeddings,encoder,pooler}.*`` BERT with separate
  ``query/key/value`` projections (fused into one QKV here);
- ``transformer.bert.visual_embeddings.position_embeddings.weight``: allocated, never added;
- heads: ``transformer.cls.seq_relationship`` (ITM) and ``transformer.cls.predictions.*`` (masked LM)
  in pre-training; ``transformer.classifier.{0,2}`` in fine-tuned retrieval and QA models.

Loading is strict: after the declared renames and the declared list of tensors the forward pass never
uses, every model tensor must be present with its shape and nothing may be left over; otherwise a
``CheckpointError`` lists the missing, unexpected and mismatched keys.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from polyclip.checkpoints.common import (
    CheckpointError,
    RenameTable,
    TemplatePairs,
    fuse_qkv,
    load_strict,
    read_weights,
    rename_keys,
    template_renames,
)
from polyclip.domains.clipbert.config import ClipBertConfig, clipbert_config
from polyclip.domains.clipbert.model import ClipBert

CONFIG_FILE = "clipbert_config.json"
WEIGHTS_FILE = "model.safetensors"
VOCAB_FILE = "vocab.txt"

_LAYER = "transformer.bert.encoder.layer.{i}"

# (reference name, polyclip name) templates: read forwards, written back (to_reference_state_dict) in reverse
REFERENCE_PAIRS: TemplatePairs = [
    ("cnn.feature.backbone.{path}", "vision.backbone.{path}"),
    ("cnn.grid_encoder.0.weight", "vision.grid_encoder.0.weight"),
    (
        "transformer.bert.embeddings.{text_emb}_embeddings.weight",
        "encoder.text_embeddings.{text_emb}_embeddings.weight",
    ),
    ("transformer.bert.embeddings.LayerNorm.{w}", "encoder.text_embeddings.norm.{w}"),
    (
        "transformer.bert.visual_embeddings.{visual_emb}_embeddings.weight",
        "encoder.visual_embeddings.{visual_emb}_embeddings.weight",
    ),
    ("transformer.bert.visual_embeddings.LayerNorm.{w}", "encoder.visual_embeddings.norm.{w}"),
    # query/key/value keep their names here and are fused into attn.qkv after renaming (split before writing)
    (f"{_LAYER}.attention.self.{{bert_qkv}}.{{w}}", "encoder.layers.{i}.attn.{bert_qkv}.{w}"),
    (f"{_LAYER}.attention.output.dense.{{w}}", "encoder.layers.{i}.attn.proj.{w}"),
    (f"{_LAYER}.attention.output.LayerNorm.{{w}}", "encoder.layers.{i}.attn_norm.{w}"),
    (f"{_LAYER}.intermediate.dense.{{w}}", "encoder.layers.{i}.mlp.fc1.{w}"),
    (f"{_LAYER}.output.dense.{{w}}", "encoder.layers.{i}.mlp.fc2.{w}"),
    (f"{_LAYER}.output.LayerNorm.{{w}}", "encoder.layers.{i}.mlp_norm.{w}"),
    ("transformer.bert.pooler.dense.{w}", "encoder.pooler.{w}"),
    ("transformer.cls.seq_relationship.{w}", "head.fc.{w}"),
    ("transformer.classifier.0.{w}", "head.fc1.{w}"),
    ("transformer.classifier.2.{w}", "head.fc2.{w}"),
]
REFERENCE_RENAMES: RenameTable = template_renames(REFERENCE_PAIRS)
_TO_REFERENCE: RenameTable = template_renames(REFERENCE_PAIRS, reverse=True)

# Reference tensors that ClipBERT's forward pass never reads (see the module docstring).
REFERENCE_UNUSED: tuple[str, ...] = (
    r"cnn\.feature\.pixel_(mean|std)",
    r"cnn\.feature\.(proposal_generator|roi_heads)\..+",
    r"transformer\.bert\.visual_embeddings\.position_embeddings\.weight",
    r"transformer\.cls\.predictions\..+",  # the masked-LM head of pre-training
)

# Head tensors of either head kind in the reference layout.
REFERENCE_HEADS = (r"transformer\.cls\.seq_relationship\..+", r"transformer\.classifier\.\d+\..+")


@dataclass
class LoadReport:
    """What a load did beyond the one-to-one renames."""

    source: str
    dropped: list[str] = field(default_factory=list)  # checkpoint tensors deliberately not used
    initialised: list[str] = field(default_factory=list)  # model tensors left at their fresh initialisation
    source_dtypes: list[str] = field(default_factory=list)  # floating dtypes found in the checkpoint


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(re.fullmatch(p, key) for p in patterns)


def _fuse_attention(state_dict: dict[str, torch.Tensor]) -> None:
    layers = sorted(
        {m.group(1) for k in state_dict if (m := re.fullmatch(r"encoder\.layers\.(\d+)\.attn\.query\..+", k))}
    )
    for index in layers:
        prefix = f"encoder.layers.{index}.attn"
        fuse_qkv(state_dict, f"{prefix}.query", f"{prefix}.key", f"{prefix}.value", f"{prefix}.qkv")


def convert_reference_state_dict(
    state_dict: dict[str, torch.Tensor], keep_head: bool = True
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Reference keys -> polyclip keys, QKV fused. Returns the converted dict and the dropped keys."""
    dropped = sorted(k for k in state_dict if _matches(k, REFERENCE_UNUSED))
    if not keep_head:
        dropped += sorted(k for k in state_dict if _matches(k, REFERENCE_HEADS))
    kept = {k: v for k, v in state_dict.items() if k not in set(dropped)}
    converted = rename_keys(kept, REFERENCE_RENAMES)
    _fuse_attention(converted)
    return converted, dropped


def to_reference_state_dict(model: ClipBert) -> dict[str, torch.Tensor]:
    """The model's weights under the reference's key names (QKV split), e.g. to use them in ClipBERT's code.

    Only the tensors the forward pass uses are written; the reference's unused tensors (detection heads,
    the visual ``position_embeddings`` table, the masked-LM head) are absent, so the reference code should
    load the result with its non-strict ``load_state_dict_with_mismatch``.
    """
    out: dict[str, torch.Tensor] = {}
    D = model.config.text.hidden_size
    for key, value in model.state_dict().items():
        value = value.detach().clone()
        qkv = re.fullmatch(r"encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)", key)
        if qkv:
            layer, kind = qkv.groups()
            for name, part in zip(("query", "key", "value"), value.split(D, dim=0)):
                out[f"transformer.bert.encoder.layer.{layer}.attention.self.{name}.{kind}"] = part.clone()
            continue
        out.update(rename_keys({key: value}, _TO_REFERENCE, unmatched="raise", target="ClipBERT reference"))
    return out


def load_reference_weights(
    model: ClipBert,
    state_dict: dict[str, torch.Tensor],
    source: str = "state dict",
    new_head: bool = False,
) -> LoadReport:
    """Load a reference-layout state dict strictly.

    ``new_head=True`` starts a task head from scratch (e.g. QA fine-tuning from the pre-trained
    checkpoint): the checkpoint's head tensors are dropped and the model's head keeps its initialisation.
    """
    if not state_dict:
        raise CheckpointError(f"{source} holds no tensors")
    converted, dropped = convert_reference_state_dict(state_dict, keep_head=not new_head)
    initialised: list[str] = []
    if new_head:
        for key, value in model.state_dict().items():
            if key.startswith("head."):
                converted[key] = value
                initialised.append(key)
    # apex O2 training (the reference's fp16 setting) saves half-precision weights: take the model's dtypes
    expected = model.state_dict()
    source_dtypes = sorted(
        {str(v.dtype).removeprefix("torch.") for v in converted.values() if v.is_floating_point()}
    )
    converted = {
        k: v.to(expected[k].dtype) if k in expected and v.is_floating_point() else v
        for k, v in converted.items()
    }
    load_strict(model, converted, source)
    return LoadReport(source=source, dropped=dropped, initialised=initialised, source_dtypes=source_dtypes)


def _unwrap(obj: dict, path: Path) -> dict[str, torch.Tensor]:
    """Plain state dicts, or ``{"model": state_dict}`` (detectron2) / ``{"state_dict": ...}`` wrappers."""
    for wrapper in ("model", "state_dict"):
        if isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors")
    return tensors


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """``read_weights`` with every failure reported as a CheckpointError naming the file."""
    try:
        return read_weights(path)
    except CheckpointError:
        raise
    except Exception as error:  # e.g. pickle.UnpicklingError from the legacy (non-zip) fallback
        raise CheckpointError(
            f"cannot read {path} as a PyTorch state dict ({type(error).__name__}: {(str(error).splitlines() or [''])[0]})"
        ) from error


def save_clipbert(model: ClipBert, directory: str | Path, vocab_file: str | Path | None = None) -> Path:
    """A polyclip ClipBERT folder: ``clipbert_config.json`` + ``model.safetensors`` (+ ``vocab.txt``)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2))
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, directory / WEIGHTS_FILE
    )
    if vocab_file is not None:
        (directory / VOCAB_FILE).write_bytes(Path(vocab_file).read_bytes())
    return directory


def load_clipbert(
    path: str | Path,
    config: ClipBertConfig | None = None,
    new_head: bool = False,
    map_location: str | torch.device = "cpu",
) -> tuple[ClipBert, LoadReport]:
    """A ClipBERT model from a polyclip folder or a reference ``.pt`` state dict.

    A folder carries its configuration; a reference file does not, so ``config`` (default: the base
    model with the pre-training ITM head, the layout of ``clipbert_image_text_pretrained.pt``) must
    describe it. Fine-tuned reference checkpoints need the matching head, e.g.
    ``clipbert_config("qa", num_outputs=len(answers))``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no ClipBERT checkpoint at {path}")
    if path.is_dir():
        config_path = path / CONFIG_FILE
        if not config_path.is_file():
            raise CheckpointError(f"{path} is not a ClipBERT folder: {CONFIG_FILE} is missing")
        try:
            folder_config = ClipBertConfig.from_dict(json.loads(config_path.read_text()))
        except (json.JSONDecodeError, TypeError) as error:
            raise CheckpointError(f"cannot read {config_path}: {error}") from error
        state_dict = read_checkpoint(path / WEIGHTS_FILE)
        model = ClipBert(config or folder_config)
        report = LoadReport(source=str(path))
        if new_head:
            report.dropped = sorted(k for k in state_dict if k.startswith("head."))
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
            for key, value in model.state_dict().items():
                if key.startswith("head."):
                    state_dict[key] = value
                    report.initialised.append(key)
        load_strict(model, state_dict, str(path))
    else:
        state_dict = _unwrap(read_checkpoint(path), path)  # read before building: a bad file fails fast
        model = ClipBert(config or clipbert_config("pretrained"))
        report = load_reference_weights(model, state_dict, str(path), new_head=new_head)
    return model.to(map_location).eval(), report
