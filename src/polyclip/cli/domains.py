"""``polyclip geolocate`` (StreetCLIP) and ``polyclip taxonomy`` (BioCLIP)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from polyclip.cli.options import JsonOutput, TopK, choices
from polyclip.progress import progress_bar

console = Console()
# the strategies of polyclip.domains.geolocation.GeoLocator and the text types of TaxonomicClassifier
Strategy = choices("Strategy", ("hierarchical", "flat"))
Rank = choices("Rank", ("kingdom", "phylum", "class", "order", "family", "genus", "species"))
TextType = choices("TextType", ("taxonomic", "scientific", "common", "scientific_common", "taxonomic_common"))
BATCH = 32  # images per forward pass, and per step of the progress bar


def register(app: typer.Typer) -> None:
    app.command("geolocate")(geolocate)
    app.command("taxonomy")(taxonomy)


def _load_images(paths: list[Path]):
    from polyclip.images import ImageDecodeError, load_image

    loaded, skipped = [], []
    for path in paths:
        try:
            loaded.append((path, load_image(path)))
        except ImageDecodeError as error:
            skipped.append(str(error))
    for reason in skipped:
        console.print(f"[yellow]skipped[/yellow] {reason}")
    if not loaded:
        raise ValueError("none of the images could be read")
    return loaded


def geolocate(
    images: Annotated[list[Path], typer.Argument(help="image files")],
    gazetteer: Annotated[Path, typer.Option(help="CSV: city,region,country,latitude,longitude")],
    model: Annotated[str, typer.Option("--model", "-m")] = "streetclip",
    strategy: Annotated[
        Strategy, typer.Option(help="hierarchical (country, then city) or flat")
    ] = "hierarchical",
    json_output: JsonOutput = False,
) -> None:
    """Predict where photos were taken, from a gazetteer of candidate cities."""
    import polyclip
    from polyclip.domains.geolocation import Gazetteer, GeoLocator

    places = Gazetteer.from_csv(gazetteer)
    loaded_model, preprocess, tokenizer = polyclip.load(model)
    locator = GeoLocator(loaded_model, tokenizer, preprocess, places, strategy=str(strategy))
    loaded = _load_images(images)
    predictions = [
        prediction
        for start in progress_bar(range(0, len(loaded), BATCH), desc="locating", enabled=not json_output)
        for prediction in locator.predict([image for _, image in loaded[start : start + BATCH]])
    ]
    rows = [
        {
            "image": str(path),
            "city": p.place.city,
            "region": p.place.region,
            "country": p.place.country,
            "latitude": p.place.latitude,
            "longitude": p.place.longitude,
            "country_probability": p.country_probability,
            "city_probability": p.city_probability,
        }
        for (path, _), p in zip(loaded, predictions)
    ]
    if json_output:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="geolocation")
    for column in ("image", "city", "country", "lat, lon", "p(country)", "p(city)"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["image"],
            row["city"],
            row["country"],
            f"{row['latitude']:.3f}, {row['longitude']:.3f}",
            f"{row['country_probability']:.3f}",
            f"{row['city_probability']:.3f}",
        )
    console.print(table)


def taxonomy(
    images: Annotated[list[Path], typer.Argument(help="image files")],
    taxa: Annotated[
        Path | None, typer.Option(help="CSV: kingdom,phylum,class,order,family,genus,species[,common_name]")
    ] = None,
    tree_of_life: Annotated[
        Path | None,
        typer.Option(
            "--tree-of-life",
            help="pybioclip's txt_emb_species.npy (txt_emb_species.json beside it), instead of --taxa",
        ),
    ] = None,
    min_prob: Annotated[
        float, typer.Option("--min-prob", help="species at or below it do not count above species rank")
    ] = 1e-9,
    model: Annotated[str, typer.Option("--model", "-m")] = "bioclip",
    rank: Annotated[Rank, typer.Option(help="the rank predicted")] = "species",
    within: Annotated[
        list[str] | None, typer.Option(help="restrict to a taxon, e.g. family=Corvidae")
    ] = None,
    text_type: Annotated[
        TextType, typer.Option(help="how each taxon is named in its prompt")
    ] = "taxonomic_common",
    top_k: TopK = 5,
    json_output: JsonOutput = False,
) -> None:
    """Tree-of-life prediction at any rank, optionally within a taxon."""
    import polyclip
    from polyclip.domains.taxonomy import TaxonomicClassifier, TreeOfLife, read_taxa

    if (taxa is None) == (tree_of_life is None):
        raise ValueError("give either --taxa (a CSV) or --tree-of-life (txt_emb_species.npy)")
    restriction = {}
    for item in within or []:
        if "=" not in item:
            raise ValueError(f"--within takes rank=name, got {item!r}")
        key, value = item.split("=", 1)
        restriction[key.strip()] = value.strip()
    loaded_model, preprocess, tokenizer = polyclip.load(model)
    if tree_of_life is not None:
        classifier = TaxonomicClassifier.from_tree_of_life(
            loaded_model, preprocess, TreeOfLife.load(tree_of_life)
        )
    else:
        classifier = TaxonomicClassifier(
            loaded_model, tokenizer, preprocess, read_taxa(taxa), text_type=str(text_type)
        )
    loaded = _load_images(images)
    results = [
        ranking
        for start in progress_bar(range(0, len(loaded), BATCH), desc="classifying", enabled=not json_output)
        for ranking in classifier.predict(
            [image for _, image in loaded[start : start + BATCH]],
            rank=str(rank),
            k=top_k,
            within=restriction or None,
            min_prob=min_prob,
        )
    ]
    if json_output:
        typer.echo(
            json.dumps(
                {
                    str(path): [{"taxon": " ".join(names), "probability": p} for names, p in ranking]
                    for (path, _), ranking in zip(loaded, results)
                },
                indent=2,
            )
        )
        return
    for (path, _), ranking in zip(loaded, results):
        table = Table(title=f"{path} ({str(rank)})")
        table.add_column("taxon")
        table.add_column("probability", justify="right")
        for names, probability in ranking:
            table.add_row(" ".join(names), f"{probability:.4f}")
        console.print(table)
