"""``polyclip choose``: which model to use for your data, measured on your sample and on this machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command("choose")(choose)


def choose(
    data: Annotated[
        Path, typer.Option("--data", "-d", help="labelled image folder (or CSV); captions file for retrieval")
    ],
    task: Annotated[str, typer.Option(help="zeroshot, retrieval or fewshot")] = "zeroshot",
    models: Annotated[
        list[str] | None,
        typer.Option(
            "--models", "-m", help="'all' (the registry), names, hf-hub ids or paths; repeat or list"
        ),
    ] = None,
    extra: Annotated[
        list[str] | None, typer.Argument(help="more candidates after --models", show_default=False)
    ] = None,
    budget_ms: Annotated[float | None, typer.Option(help="milliseconds per image at --batch-size")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="batch of the throughput measurement")] = 16,
    templates: Annotated[
        str, typer.Option(help="zero-shot template set name or file, or one template with {}")
    ] = "openai_imagenet",
    shots: Annotated[
        int | None, typer.Option(min=1, help="few-shot k (default 5 or what the sample allows)")
    ] = None,
    offline: Annotated[bool, typer.Option(help="use only the Hugging Face cache")] = False,
    png: Annotated[Path, typer.Option(help="where to write the plot")] = Path("choose.png"),
    json_out: Annotated[
        Path | None, typer.Option("--json", help="also write the full result as JSON")
    ] = None,
) -> None:
    """Evaluate every candidate on your labelled sample: accuracy with a bootstrap interval, speed, memory, licence, and a recommendation."""
    from rich.console import Console
    from rich.table import Table

    from polyclip.eval.choose import TABLE_COLUMNS, ChooseConfig, plot_choice, table_rows
    from polyclip.eval.choose import choose as run_choose

    console = Console()
    # `--models a b c`: typer takes one value per option, the rest arrive as arguments
    candidates = [m for spec in (models or ["all"]) + (extra or []) for m in spec.split(",") if m.strip()]
    config = ChooseConfig(
        budget_ms=budget_ms,
        batch_size=batch_size,
        templates=[templates] if "{" in templates else templates,
        shots=shots,
        offline=offline or None,
    )
    result = run_choose(
        data,
        task,
        candidates,
        config,
        progress=lambda c: console.print(
            f"[dim]{c.name}: {c.status}{' (' + c.reason + ')' if c.reason else ''}[/dim]"
        ),
    )
    table = Table(title=f"polyclip choose: {result.task} ({result.headline}) on {data}")
    for column in TABLE_COLUMNS:
        table.add_column(column, overflow="fold")
    for row in table_rows(result):
        table.add_row(*row)
    console.print(table)
    if result.not_tried:
        console.print(
            f"not tried ({len(result.not_tried)}): "
            + ", ".join(c.name for c in result.not_tried)
            + ". Download them where a network exists to include them."
        )
    if json_out is not None:
        json_out.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    if not result.tried:
        console.print(f"[red]{result.reason}[/red]")
        raise typer.Exit(1)
    console.print(f"plot: {plot_choice(result, png)}")
    if result.recommendation is None:
        console.print(f"[yellow]no recommendation: {result.reason}[/yellow]")
    else:
        console.print(f"[bold]recommended: {result.recommendation}[/bold] ({result.reason})")
