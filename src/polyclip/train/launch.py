"""Building a run's config from a recipe name or a saved config plus overrides, and the
``python -m polyclip.train`` entry point that torchrun launches on every process:

    torchrun --nproc-per-node 2 -m polyclip.train clip --set data.train=pairs.csv
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        -m polyclip.train bioclip --set data.train='shards/{00000..01023}.tar'
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from polyclip.train.config import TrainConfig, TrainConfigError, apply_overrides
from polyclip.train.recipes import RECIPES, get_recipe, shrink_for_smoke


def build_config(
    recipe: str,
    overrides: list[str] | tuple[str, ...] = (),
    smoke: bool = False,
    output_dir: str | Path | None = None,
    resume: str | None = None,
    validate: bool = True,
    start_from: str | Path | None = None,
) -> TrainConfig:
    """A recipe by name (or a ``config.json`` path), shrunk with ``smoke``, then ``a.b=value`` overrides.

    ``start_from``: a checkpoint (a local folder such as ``polyclip demo``'s, or a registry name) to
    fine-tune instead of the recipe's model, with the loss its model implies (`start_from_checkpoint`).
    """
    if recipe in RECIPES:
        config = get_recipe(recipe, smoke=smoke)
    elif recipe.endswith(".json") and Path(recipe).is_file():
        config = TrainConfig.from_json(recipe)
        if smoke:
            config = shrink_for_smoke(config)
    else:
        raise TrainConfigError(
            f"{recipe!r} is neither a recipe ({', '.join(RECIPES)}) nor a config .json file"
        )
    if start_from is not None:
        start_from_checkpoint(config, start_from)
    apply_overrides(config, list(overrides))
    if output_dir is not None:
        config.output_dir = str(output_dir)
    if resume is not None:
        config.checkpoint.resume = resume
    return config.validate() if validate else config


def start_from_checkpoint(config: TrainConfig, checkpoint: str | Path) -> TrainConfig:
    """Fine-tune ``checkpoint`` (its own preprocessing and tokenizer) with the loss its model implies:
    the sigmoid loss for a SigLIP-style model (one with a logit bias), the softmax loss otherwise."""
    config.model.pretrained = str(checkpoint)
    config.model.architecture = config.model.config = None
    config.loss.kind = "auto"
    return config


def main(argv: list[str] | None = None) -> int:
    from polyclip.train.trainer import train

    parser = argparse.ArgumentParser(prog="python -m polyclip.train", description="Train a dual encoder.")
    parser.add_argument("recipe", help=f"one of {', '.join(RECIPES)}, or a config .json")
    parser.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--smoke", action="store_true", help="shrink the recipe to a seconds-long run")
    parser.add_argument("--out", "-o", default=None, help="run folder")
    parser.add_argument("--resume", default=None, help="a checkpoint folder, or 'latest'")
    parser.add_argument("--from", dest="start_from", default=None, help="a checkpoint to fine-tune")
    args = parser.parse_args(argv)
    try:
        config = build_config(
            args.recipe, args.overrides, args.smoke, args.out, args.resume, start_from=args.start_from
        )
        result = train(config)
    except (TrainConfigError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if result.model_dir is not None:
        print(
            json.dumps({"model": str(result.model_dir), "steps": result.steps, "eval": result.eval_metrics})
        )
    return 0
