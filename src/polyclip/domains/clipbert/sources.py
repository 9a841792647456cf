"""Initialising ClipBERT's parts from other checkpoints, as its pre-training did.

ClipBERT's image-text pre-training starts the cross-encoder from ``bert-base-uncased`` and the CNN from
the grid-feature ResNet-50 of "In Defense of Grid Features for Visual Question Answering" (detectron2
format, ``grid_feat_R-50.pth``); the grid encoder, the visual embeddings and the heads start fresh
(jayleicn/ClipBERT ``src/pretrain/run_pretrain.py``, ``ClipBert.load_separate_ckpt``).

Supported sources, each loaded strictly onto its part:

- a transformers BERT folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``), keys with
  or without the ``bert.`` prefix, old ``LayerNorm.gamma/beta`` names included;
- a detectron2 checkpoint (``{"model": state_dict}``, ``backbone.*`` keys; detection heads dropped);
- a torchvision-layout ResNet-50 state dict (``conv1``, ``bn1``, ``layer1..4``, ``downsample.0/1``). Its
  weights expect RGB in [0, 1] normalised with ImageNet mean/std; the input convention here is BGR 0..255
  minus the same mean (x 255), so the stem convolution absorbs the channel order and the 1/(255 std)
  scale exactly. torchvision's ResNet strides in the 3x3 convolution: the config needs
  ``stride_in_1x1=False``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from polyclip.checkpoints.common import CheckpointError, rename_keys
from polyclip.domains.clipbert.checkpoint import LoadReport, convert_reference_state_dict, read_checkpoint
from polyclip.domains.clipbert.model import ClipBert

TEXT_PREFIXES = ("encoder.text_embeddings.", "encoder.layers.", "encoder.pooler.")
CNN_PREFIXES = ("vision.backbone.",)

# torchvision's ImageNet normalisation (RGB, [0, 1] scale)
TORCHVISION_STD = (0.229, 0.224, 0.225)


def _load_part(
    model: ClipBert, converted: dict[str, torch.Tensor], prefixes: tuple[str, ...], source: str
) -> None:
    """Strictly load the model tensors under ``prefixes``; everything else keeps its current value."""
    current = model.state_dict()
    expected = {k for k in current if k.startswith(prefixes)}
    missing = sorted(expected - set(converted))
    unexpected = sorted(set(converted) - expected)
    mismatched = [
        f"{k}: checkpoint {tuple(converted[k].shape)} vs model {tuple(current[k].shape)}"
        for k in sorted(expected & set(converted))
        if converted[k].shape != current[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"{source} does not match the model part {', '.join(prefixes)}:"]
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
        raise CheckpointError("\n".join(lines))
    with torch.no_grad():
        for key in expected:
            current[key].copy_(converted[key])


def _check_bert_config(model: ClipBert, config_path: Path) -> None:
    if not config_path.is_file():
        raise CheckpointError(
            f"{config_path.parent} is not a transformers BERT folder: config.json is missing"
        )
    hf = json.loads(config_path.read_text())
    ours = model.config.text
    pairs = {
        "hidden_size": ours.hidden_size,
        "num_hidden_layers": ours.num_layers,
        "num_attention_heads": ours.num_heads,
        "intermediate_size": ours.intermediate_size,
        "vocab_size": ours.vocab_size,
        "max_position_embeddings": ours.max_position_embeddings,
        "type_vocab_size": ours.type_vocab_size,
    }
    differences = [f"{k}: folder {hf[k]} vs model {v}" for k, v in pairs.items() if k in hf and hf[k] != v]
    if hf.get("hidden_act", "gelu") != ours.activation:
        differences.append(f"hidden_act: folder {hf.get('hidden_act')!r} vs model {ours.activation!r}")
    if differences:
        raise CheckpointError(
            f"the BERT folder {config_path.parent} does not match the model: " + "; ".join(differences)
        )


def init_text_from_bert(model: ClipBert, folder: str | Path) -> LoadReport:
    """Copy a transformers BERT folder's embeddings, encoder layers and pooler into the cross-encoder."""
    folder = Path(folder)
    _check_bert_config(model, folder / "config.json")
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            weights = read_checkpoint(folder / name)
            break
    else:
        raise CheckpointError(f"{folder} holds neither model.safetensors nor pytorch_model.bin")
    dropped: list[str] = []
    reference: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        bare = key[len("bert.") :] if key.startswith("bert.") else key
        if not bare.startswith(("embeddings.", "encoder.", "pooler.")) or bare == "embeddings.position_ids":
            dropped.append(key)  # pre-training heads (cls.*) and the position-id buffer
            continue
        bare = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", bare)
        bare = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", bare)
        reference[f"transformer.bert.{bare}"] = value
    converted, _ = convert_reference_state_dict(reference)
    _load_part(model, converted, TEXT_PREFIXES, str(folder))
    return LoadReport(source=str(folder), dropped=sorted(dropped))


def init_cnn_from_detectron2(model: ClipBert, path: str | Path) -> LoadReport:
    """Copy a detectron2 ResNet backbone (``backbone.stem.*``, ``backbone.res2..5.*``) into the CNN."""
    path = Path(path)
    if path.suffix == ".pkl":
        raise CheckpointError(
            f"{path}: detectron2's .pkl model-zoo files use Caffe2 names and numpy arrays; convert them to a "
            "detectron2 .pth (DetectionCheckpointer) first"
        )
    obj = read_checkpoint(path)
    state_dict = obj.get("model", obj) if isinstance(obj.get("model"), dict) else obj
    backbone = {
        k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor) and k.startswith("backbone.")
    }
    dropped = sorted(k for k in state_dict if k not in backbone)
    if not backbone:
        raise CheckpointError(f"{path} holds no detectron2 backbone tensors (keys starting with 'backbone.')")
    converted, _ = convert_reference_state_dict({f"cnn.feature.{k}": v for k, v in backbone.items()})
    _load_part(model, converted, CNN_PREFIXES, str(path))
    return LoadReport(source=str(path), dropped=dropped)


TORCHVISION_RENAMES = [
    (r"conv1\.weight", r"stem.conv1.weight"),
    (r"bn1\.(weight|bias|running_mean|running_var)", r"stem.conv1.norm.\1"),
    (r"layer(\d)\.(\d+)\.conv(\d)\.weight", r"res{\1}.\2.conv\3.weight"),
    (r"layer(\d)\.(\d+)\.bn(\d)\.(weight|bias|running_mean|running_var)", r"res{\1}.\2.conv\3.norm.\4"),
    (r"layer(\d)\.(\d+)\.downsample\.0\.weight", r"res{\1}.\2.shortcut.weight"),
    (
        r"layer(\d)\.(\d+)\.downsample\.1\.(weight|bias|running_mean|running_var)",
        r"res{\1}.\2.shortcut.norm.\3",
    ),
]


def init_cnn_from_torchvision(model: ClipBert, source: str | Path | dict[str, torch.Tensor]) -> LoadReport:
    """Copy a torchvision-layout ResNet (``layer1..4``) into the CNN, folding its input normalisation."""
    if model.config.vision.stride_in_1x1:
        raise CheckpointError(
            "torchvision's ResNet strides in the 3x3 convolution; build the model with "
            "GridBackboneConfig(stride_in_1x1=False) to use its weights"
        )
    name = "state dict" if isinstance(source, dict) else str(source)
    state_dict = source if isinstance(source, dict) else read_checkpoint(Path(source))
    dropped = sorted(k for k in state_dict if k.startswith("fc.") or k.endswith("num_batches_tracked"))
    kept = {k: v for k, v in state_dict.items() if k not in set(dropped)}
    renamed = rename_keys(kept, TORCHVISION_RENAMES)
    # layer1..4 are detectron2's res2..5
    converted = {}
    for key, value in renamed.items():
        stage = re.match(r"res\{(\d)\}", key)
        if stage:
            key = f"res{int(stage.group(1)) + 1}" + key[stage.end() :]
        converted[f"vision.backbone.{key}"] = value
    stem = "vision.backbone.stem.conv1.weight"
    if stem in converted:
        # torchvision: conv(((x_rgb / 255) - m) / s); here the input is x_bgr - 255 m, so
        # w_here[:, bgr c] = w_tv[:, rgb c] / (255 s_c)
        std = torch.tensor(TORCHVISION_STD, dtype=torch.float64).view(1, 3, 1, 1)
        weight = converted[stem].double() / (255.0 * std)
        converted[stem] = weight.flip(1).to(converted[stem].dtype)
    _load_part(model, converted, CNN_PREFIXES, name)
    return LoadReport(source=name, dropped=dropped)
