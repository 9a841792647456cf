"""``polyclip export-onnx``: a checkpoint's towers as ONNX graphs, with its preprocessing and tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command("export-onnx")(export_onnx)


def export_onnx(
    model: Annotated[str, typer.Argument(help="registry name, hf-hub:org/repo, or a checkpoint path")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    opset: Annotated[int, typer.Option(help="ONNX opset of the graphs")] = 20,
    overwrite: Annotated[bool, typer.Option(help="replace a previous export in --out")] = False,
) -> None:
    """Export the image and text towers to ONNX (dynamic batch); polyclip.load(OUT) runs them with onnxruntime."""
    import polyclip
    from polyclip.onnx import read_manifest
    from polyclip.onnx.export import OnnxExportError
    from polyclip.onnx.export import export_onnx as export

    loaded, preprocess, tokenizer = polyclip.load(model)
    try:
        folder = export(loaded, preprocess, tokenizer, out, opset=opset, source=model, overwrite=overwrite)
    except OnnxExportError as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    manifest = read_manifest(folder)
    graphs = manifest["graphs"]
    typer.echo(
        f"wrote {', '.join(f for g in graphs.values() for f in g['files'])} (opset {manifest['opset']}) to {folder}; "
        "largest difference to eager: "
        + ", ".join(f"{name} {g['check_relative_difference']:.1e}" for name, g in graphs.items())
    )
