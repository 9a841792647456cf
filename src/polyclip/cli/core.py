"""``polyclip models | info | classify | embed``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from polyclip.cli.options import Dtype, JsonOutput, Templates, TopK, choices, resolve_templates_option
from polyclip.progress import progress_bar

console = Console()
ExportFormat = choices("ExportFormat", ("hf", "open_clip", "native"))
CheckpointFormat = choices("CheckpointFormat", ("native", "hf", "open_clip", "openai", "flax"))

ModelOption = Annotated[
    str, typer.Option("--model", "-m", help="registry name, hf-hub:org/repo, or a local path")
]


def register(app: typer.Typer) -> None:
    app.command("models")(models)
    app.command("info")(info)
    app.command("classify")(classify)
    app.command("embed")(embed)
    app.command("convert")(convert)


def models(json_output: JsonOutput = False) -> None:
    """The registry of released checkpoints: hub id, format, architecture, preprocessing, tokenizer, licence."""
    from polyclip.hub import registry

    entries = registry()
    if json_output:
        typer.echo(json.dumps({name: e.summary() for name, e in sorted(entries.items())}, indent=2))
        return
    columns = ("name", "hub id", "system", "format", "architecture", "preprocessing", "tokenizer", "licence")
    rows = []
    for name, e in sorted(entries.items()):
        row = e.summary()
        rows.append((name, e.hub_id, e.system, e.format, e.architecture, row["preprocessing"],
                     row["tokenization"], e.license, e.task))  # fmt: skip
    table = Table(title="polyclip models")
    for column in columns:  # names and hub ids never break inside a word
        table.add_column(column, no_wrap=column in ("name", "hub id"))
    table.add_column("task", overflow="fold")  # wraps between words where needed
    for row in rows:
        table.add_row(*row)
    # the narrowest table in which no word breaks: whole names and hub ids, the longest word elsewhere
    widest = [
        max(len(text) if position < 2 else max(map(len, text.split() or [""])) for text in (title, *cells))
        for position, (title, *cells) in enumerate(zip((*columns, "task"), *rows))
    ]
    if sum(widest) + 3 * len(widest) + 1 <= console.width:
        console.print(table)
        return
    # too narrow for one table: a block per model, every value whole
    for name, hub_id, *details in rows:
        console.print(f"[bold]{name}[/bold]  {hub_id}")
        for column, value in zip((*columns[2:], "task"), details):
            console.print(f"  {column:<13} {value}", overflow="fold")


def info(
    checkpoint: Annotated[str, typer.Argument(help="a checkpoint folder or file")],
    format: Annotated[
        CheckpointFormat | None, typer.Option(help="force a format (default: detected from the files)")
    ] = None,
    json_output: JsonOutput = False,
) -> None:
    """Format, architecture, parameter count and preprocessing of a checkpoint."""
    from polyclip.checkpoints import describe

    details = describe(checkpoint, None if format is None else str(format))
    if json_output:
        typer.echo(json.dumps(details, indent=2, default=str))
        return
    vision, text = details["model"]["vision"], details["model"]["text"]
    if vision["kind"] == "vit":
        tower = f"ViT {vision['width']}w x {vision['layers']}L, patch {vision['patch_size']}, {vision['pool']} pool"
    else:
        tower = f"ModifiedResNet {vision['resnet_layers']} width {vision['resnet_width']}"
    table = Table(show_header=False, title=str(checkpoint))
    table.add_row("format", details["format"])
    table.add_row("parameters", f"{details['parameters']:,}")
    table.add_row("stored dtype", details["dtype"])
    table.add_row("image tower", f"{tower}, {vision['image_size']}px, {vision['act']}")
    table.add_row(
        "text tower",
        f"{text['width']}w x {text['layers']}L, {'causal' if text['causal'] else 'bidirectional'}, "
        f"pool {text['pool']}, context {text['context_length']}, vocab {text['vocab_size']}",
    )
    table.add_row("embedding", str(details["model"]["embed_dim"]))
    table.add_row(
        "loss", "sigmoid (logit bias)" if details["model"]["init_logit_bias"] is not None else "softmax"
    )
    table.add_row(
        "preprocessing", json.dumps(details["preprocess"]) if details["preprocess"] else "family default"
    )
    table.add_row(
        "tokenizer", json.dumps(details["tokenizer"]) if details["tokenizer"] else "from folder / CLIP BPE"
    )
    console.print(table)


def classify(
    images: Annotated[list[Path], typer.Argument(help="image files")],
    labels: Annotated[
        list[str], typer.Option("--labels", "-l", help="class names (repeat, or one per argument)")
    ],
    model: ModelOption = "clip-vit-b-32",
    template: Templates = None,
    top_k: TopK = 5,
    json_output: JsonOutput = False,
) -> None:
    """Zero-shot classification: a table of the top classes per image."""
    import polyclip
    from polyclip.images import ImageDecodeError

    labels = (
        [label for item in labels for label in item.split(",") if label.strip()]
        if len(labels) == 1
        else labels
    )
    templates = resolve_templates_option(template)  # checked before the model loads
    loaded, preprocess, tokenizer = polyclip.load(model)
    classifier = polyclip.zero_shot_classifier(
        loaded, tokenizer, labels, templates=templates, preprocess=preprocess
    )
    results = {}
    for path in progress_bar(images, desc="classifying", unit="img", enabled=not json_output):
        try:
            results[str(path)] = classifier.top_k([path], k=top_k)[0]
        except ImageDecodeError as error:
            results[str(path)] = str(error)
    if json_output:
        typer.echo(json.dumps(results, indent=2))
    else:
        for path, ranking in results.items():
            if isinstance(ranking, str):
                console.print(f"[red]skipped[/red] {ranking}")
                continue
            table = Table(title=path)
            table.add_column("label")
            table.add_column("probability", justify="right")
            for label, probability in ranking:
                table.add_row(label, f"{probability:.4f}")
            console.print(table)
    if not any(isinstance(ranking, list) for ranking in results.values()):
        # nothing was classified: a script must not take this run for a success
        typer.secho(
            f"error: none of the {len(results)} image(s) could be read", fg=typer.colors.RED, err=True
        )
        raise typer.Exit(1)


def embed(
    paths: Annotated[list[Path], typer.Argument(help="image files or folders (searched recursively)")] = None,
    model: ModelOption = "clip-vit-b-32",
    out: Annotated[Path, typer.Option("--out", "-o", help="output .parquet file")] = Path(
        "embeddings.parquet"
    ),
    text: Annotated[
        Path | None, typer.Option(help="a text file, one text per line, to embed instead")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    workers: Annotated[int | None, typer.Option(help="decoding threads")] = None,
    dtype: Dtype = None,
) -> None:
    """Image or text embeddings to Parquet; resumable, unreadable files skipped and listed."""
    from polyclip.embed import embed_to_parquet

    if not paths and text is None:
        raise typer.BadParameter("give image paths or folders, or --text FILE")
    summary = embed_to_parquet(
        model, out, paths or [], text, batch_size=batch_size, workers=workers,
        dtype=None if dtype is None else str(dtype),
    )  # fmt: skip
    if summary["complete"]:
        console.print(f"{out} is already complete: {summary['rows']} embeddings, nothing new to embed")
    else:
        console.print(
            f"wrote {summary['rows']} embeddings to {out} ({summary['new']} new, "
            f"{summary['resumed']} from a previous run)"
        )
    if summary["failures"]:
        console.print(f"[yellow]skipped {len(summary['failures'])} unreadable file(s):[/yellow]")
        for path, reason in summary["failures"]:
            console.print(f"  {path}: {reason}")


def convert(
    source: Annotated[str, typer.Argument(help="registry name, hf-hub:org/repo, or a checkpoint path")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    to: Annotated[
        ExportFormat, typer.Option(help="hf (transformers), open_clip, or native (polyclip)")
    ] = "hf",
    arch: Annotated[
        str | None,
        typer.Option(
            "--arch",
            help="open_clip architecture of a plain state dict (ViT-B-32 is GELU, ViT-B-32-quickgelu OpenAI's)",
        ),
    ] = None,
) -> None:
    """Convert a checkpoint to a transformers, open_clip or polyclip folder, tokenizer files included."""
    import polyclip
    from polyclip.checkpoints.export import export_hf, export_open_clip

    to = str(to)
    model, preprocess, tokenizer = polyclip.load(source, architecture=arch)
    if to == "native":
        polyclip.save(model, preprocess, tokenizer, out)
    elif to == "hf":
        export_hf(model, out, preprocess.config, tokenizer=tokenizer)
    else:
        export_open_clip(model, out, preprocess.config, tokenizer=tokenizer)
    console.print(f"wrote a {to} folder to {out}")
