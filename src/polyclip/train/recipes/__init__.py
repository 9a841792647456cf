"""Recipes: small functions returning a `TrainConfig`, by name, with a smoke-size switch.

``get_recipe("clip_rsicd")`` is the full recipe; ``get_recipe("clip_rsicd", smoke=True)`` shrinks it to
seconds on a CPU (a tiny random model of the same family, batch 8, two steps, no worker processes)
while keeping its data format, augmentations, loss, optimiser and schedule shape, so that a smoke
run exercises the same code path on the user's data before the real one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from polyclip.train.config import ModelSpec, TrainConfig, TrainConfigError
from polyclip.train.recipes.systems import (
    bioclip,
    clip,
    clip_rsicd,
    fashionclip,
    finetune,
    plip,
    pubmedclip,
    siglip,
    streetclip,
)

RECIPES: dict[str, Callable[[], TrainConfig]] = {
    "finetune": finetune,
    "clip": clip,
    "siglip": siglip,
    "pubmedclip": pubmedclip,
    "plip": plip,
    "fashionclip": fashionclip,
    "clip_rsicd": clip_rsicd,
    "bioclip": bioclip,
    "streetclip": streetclip,
}

SMOKE_STEPS = 2
SMOKE_BATCH = 8


def list_recipes() -> dict[str, str]:
    """Recipe name -> the first line of its docstring."""
    return {name: (fn.__doc__ or "").strip().splitlines()[0] for name, fn in RECIPES.items()}


def get_recipe(name: str, smoke: bool = False) -> TrainConfig:
    if name not in RECIPES:
        raise TrainConfigError(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}")
    config = RECIPES[name]()
    return shrink_for_smoke(config) if smoke else config


def smoke_model(sigmoid: bool):
    """A tiny random model of the recipe's family that CLIP's BPE tokenizer can feed."""
    from polyclip.models import CLIP_EOT_ID, CLIP_VOCAB_SIZE, get_architecture

    if not sigmoid:
        return get_architecture("tiny-vit")
    config = get_architecture("tiny-siglip")
    # SigLIP's own SentencePiece vocabulary cannot be built offline: the smoke model reads CLIP's BPE and
    # pools at its end token (the highest id) instead of SigLIP's last position.
    config.text = dataclasses.replace(
        config.text, vocab_size=CLIP_VOCAB_SIZE, context_length=32, pool="argmax", eos_token_id=CLIP_EOT_ID
    )
    return config


def shrink_for_smoke(config: TrainConfig) -> TrainConfig:
    """The same recipe at the size of a smoke test (see the module docstring)."""
    sigmoid = config.loss.kind == "siglip"
    tiny = smoke_model(sigmoid)
    config.name = f"{config.name}-smoke"
    config.model = ModelSpec(
        config=tiny,
        context_length=min(config.model.context_length or tiny.text.context_length, tiny.text.context_length),
        preprocess=config.model.preprocess,
        grad_checkpointing=config.model.grad_checkpointing,
        lock_image=config.model.lock_image,
        lock_image_unlocked_blocks=min(config.model.lock_image_unlocked_blocks, tiny.vision.layers),
        lock_text=config.model.lock_text,
        lock_text_unlocked_blocks=min(config.model.lock_text_unlocked_blocks, tiny.text.layers),
    )
    config.data.batch_size = SMOKE_BATCH
    config.data.num_workers = 0
    if config.micro_batch_size is not None:
        config.micro_batch_size = SMOKE_BATCH // 2  # keeps exact accumulation in the smoke run
    if config.loss.chunk_size is not None:
        config.loss.chunk_size = SMOKE_BATCH // 2
    config.schedule.max_steps = SMOKE_STEPS
    config.schedule.warmup_steps = 1
    config.precision = "fp32"
    config.eval.every_epochs = None
    config.eval.every_steps = None
    config.checkpoint.every_steps = None
    config.checkpoint.wise_ft_alphas = ()  # needs the pretrained weights the smoke model replaces
    config.log.every_steps = 1
    config.log.progress = False
    config.log.plots = False
    return config


__all__ = ["RECIPES", "get_recipe", "list_recipes", "shrink_for_smoke", "smoke_model"]
