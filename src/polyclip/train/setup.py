"""What a run trains: the model, its preprocessing and tokenizer, and the towers it locks.

From random weights (``model.architecture`` or ``model.config``, with the CLIP or SigLIP preset and
CLIP's BPE tokenizer) or fine-tuned from a checkpoint (``model.pretrained``: a registry name or a
local folder, read by ``polyclip.load`` with its own preprocessing and tokenizer).
"""

from __future__ import annotations

import torch
from torch import nn

from polyclip.train.config import ModelSpec, TrainConfigError
from polyclip.train.optim import lock_tower


def build_model(spec: ModelSpec, device: torch.device):
    """(model in fp32 on ``device``, in train mode; `ImageTransform`; tokenizer) for ``spec``."""
    import polyclip
    from polyclip.tokenizers import ClipTokenizer, build_tokenizer
    from polyclip.transforms import PRESETS, ImageTransform, PreprocessConfig

    if spec.pretrained is not None:
        model, preprocess, tokenizer = polyclip.load(spec.pretrained)
        preprocess_config = preprocess.config
    else:
        model = polyclip.create_model(spec.architecture or spec.config)
        preset = PRESETS["siglip" if model.config.uses_sigmoid else "clip"]
        preprocess_config = PreprocessConfig(**{**preset.to_dict(), "image_size": model.image_size})
        tokenizer = None
    if spec.preprocess is not None:
        if spec.preprocess not in PRESETS:
            raise TrainConfigError(
                f"model.preprocess must be one of {', '.join(PRESETS)}; got {spec.preprocess!r}"
            )
        preprocess_config = PreprocessConfig(
            **{**PRESETS[spec.preprocess].to_dict(), "image_size": model.image_size}
        )
    positions = model.config.text.context_length
    context = spec.context_length or positions
    if context > positions:
        raise TrainConfigError(
            f"model.context_length {context} exceeds the text tower's {positions} positions"
        )
    if tokenizer is None:  # CLIP's BPE is the one tokenizer that needs no files
        tokenizer = ClipTokenizer(context_length=context)
        if model.config.text.vocab_size != tokenizer.vocab_size:
            raise TrainConfigError(
                f"a model trained from scratch with a {model.config.text.vocab_size}-token vocabulary needs its "
                f"own tokenizer files; only CLIP's BPE ({tokenizer.vocab_size} tokens) is built in. Fine-tune "
                "from a checkpoint folder that holds its tokenizer (model.pretrained) instead"
            )
    elif spec.context_length is not None:
        tokenizer = build_tokenizer({**tokenizer.config, "context_length": context})
    model = model.to(device=device, dtype=torch.float32).train()
    return model, ImageTransform(preprocess_config), tokenizer


def lock_towers(model: nn.Module, spec: ModelSpec) -> list[nn.Module]:
    """LiT: freeze the towers ``spec`` locks (their last N blocks may stay trainable); the frozen modules."""
    frozen = []
    if spec.lock_image:
        frozen += lock_tower(model.visual, spec.lock_image_unlocked_blocks)
    if spec.lock_text:
        frozen += lock_tower(model.text, spec.lock_text_unlocked_blocks)
    return frozen
