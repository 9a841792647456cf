"""``polyclip train | recipes | demo | wise-ft``: thin commands over ``polyclip.train``.

``polyclip train RECIPE --set section.field=value ...`` runs a recipe (or a saved ``config.json``) with
overrides; under torchrun every process runs the same command and joins the process group.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("recipes")(recipes)
    app.command("demo")(demo)
    app.command("wise-ft")(wise_ft)


def train(
    recipe: Annotated[
        str, typer.Argument(help="a recipe name (see `polyclip recipes`) or a saved config.json")
    ],
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="section.field=value, e.g. data.train=pairs.csv (repeatable)"),
    ] = None,
    smoke: Annotated[bool, typer.Option("--smoke", help="shrink the recipe to a seconds-long run")] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="run folder (output_dir)")] = None,
    resume: Annotated[str | None, typer.Option(help="a checkpoint folder, or 'latest'")] = None,
    start_from: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="fine-tune this checkpoint (a folder, e.g. polyclip demo's) with the loss its model implies",
        ),
    ] = None,
    print_config: Annotated[
        bool, typer.Option("--print-config", help="print the final config as JSON and exit")
    ] = False,
) -> None:
    """Train or fine-tune a dual encoder from a recipe, with every field overridable."""
    from polyclip.train.launch import build_config
    from polyclip.train.trainer import train as run_training

    config = build_config(
        recipe, overrides or [], smoke, out, resume, validate=not print_config, start_from=start_from
    )
    if print_config:
        typer.echo(config.to_json())
        return
    result = run_training(config)
    if result.model_dir is not None:
        typer.echo(f"model: {result.model_dir}")
        for name, path in result.exports.items():
            typer.echo(f"{name}: {path}")
        if result.eval_metrics:
            typer.echo(json.dumps(result.eval_metrics, indent=2))
        if result.skipped_images:
            typer.echo(f"skipped {result.skipped_images} unreadable image(s)")


def recipes() -> None:
    """The training recipes."""
    from polyclip.train.recipes import list_recipes

    for name, summary in list_recipes().items():
        typer.echo(f"{name:<12} {summary}")


def demo(
    json_output: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    steps: Annotated[int | None, typer.Option(min=1, help="training steps (default 300)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the data and the training")] = 0,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="folder for the data, the run and the model")
    ] = Path("polyclip-demo"),
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads (default: automatic)")] = None,
    train_images: Annotated[int, typer.Option(min=64, help="rendered training images")] = 4000,
) -> None:
    """Offline demo: render a shapes dataset, train a small CLIP with the sigmoid loss, show it learnt."""
    from polyclip.train.demo import run_demo

    report = run_demo(
        steps=steps, seed=seed, out=out, verbose=not json_output, threads=threads, train_images=train_images
    )
    if json_output:
        typer.echo(json.dumps(report))


def wise_ft(
    zero_shot: Annotated[str, typer.Argument(help="the zero-shot (pretrained) model")],
    fine_tuned: Annotated[str, typer.Argument(help="the fine-tuned model (same architecture)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the interpolated model")],
    alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="weight of the fine-tuned model")] = 0.5,
) -> None:
    """WiSE-FT: save (1 - alpha) * zero-shot + alpha * fine-tuned weights as a polyclip folder."""
    import polyclip
    from polyclip.train.wise_ft import wise_ft as interpolate

    zero_shot_model, _, _ = polyclip.load(zero_shot)
    fine_tuned_model, preprocess, tokenizer = polyclip.load(fine_tuned)
    mixed = interpolate(zero_shot_model, fine_tuned_model, alpha)
    typer.echo(str(polyclip.save(mixed, preprocess, tokenizer, out)))
