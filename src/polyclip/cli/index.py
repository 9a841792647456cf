"""``polyclip index build | add | remove | info | search`` and ``polyclip serve``: thin commands over
`polyclip.index` and `polyclip.serve`.

``index build`` runs sharded under torchrun: ``torchrun --nproc_per_node 4 -m polyclip index build ...``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from polyclip.cli.options import Dtype, DtypeChoice, JsonOutput, TopK

index_app = typer.Typer(no_args_is_help=True, help="Build, change and query a vector index of images.")

Sources = Annotated[list[Path] | None, typer.Argument(help="image files and folders (searched recursively)")]
Captions = Annotated[
    Path | None,
    typer.Option("--captions", help="CSV/TSV/JSON/JSONL with path, caption and metadata columns per image"),
]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="images per forward pass and commit")]
Workers = Annotated[int | None, typer.Option("--workers", min=1, help="image decoding threads")]
Device = Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1 ...")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")]


def register(app: typer.Typer) -> None:
    app.add_typer(index_app, name="index")
    app.command("serve")(serve)


def _print_report(report, verb: str) -> None:
    typer.echo(
        f"{verb} {report.added} image(s); {report.skipped} already indexed; "
        f"{len(report.failures)} unreadable; {report.items} item(s) in the index"
    )
    for path, reason in report.failures[:20]:
        typer.secho(f"  skipped {path}: {reason}", err=True, fg=typer.colors.YELLOW)
    if len(report.failures) > 20:
        typer.secho(f"  ... and {len(report.failures) - 20} more (see 'polyclip index info')", err=True)
    if report.captions_without_image:
        typer.secho(f"  {report.captions_without_image} caption record(s) name no given image", err=True)


@index_app.command("build")
def build(
    sources: Sources = None,
    model: Annotated[
        str, typer.Option("--model", "-m", help="registry name, hf-hub:org/repo or a path")
    ] = ...,
    out: Annotated[Path, typer.Option("--out", "-o", help="index folder (created, or resumed)")] = ...,
    captions: Captions = None,
    batch_size: BatchSize = 32,
    workers: Workers = None,
    device: Device = None,
    dtype: Dtype = None,
    exact_limit: Annotated[
        int, typer.Option("--exact-limit", min=1, help="collections up to this size are searched exactly")
    ] = 100_000,
    max_index_memory: Annotated[
        str,
        typer.Option("--max-index-memory", help="RAM budget of the index (4GB, 512MB, ...): picks its kind"),
    ] = "4GB",
    max_query_ms: Annotated[
        float,
        typer.Option("--max-query-ms", min=0.01, help="per-query time nprobe / efSearch are tuned within"),
    ] = 10.0,
    kind: Annotated[
        str | None,
        typer.Option("--index-kind", help="force flat, hnsw, ivf_flat or ivf_pq instead of choosing"),
    ] = None,
    memory_mappable: Annotated[
        bool, typer.Option("--memory-mappable", help="only kinds served from disk (no HNSW)")
    ] = False,
    rerank: Annotated[
        int | None,
        typer.Option(
            "--rerank", min=1, help="candidates per result re-scored exactly (default: 10 for ivf_pq)"
        ),
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Embed images (and captions) into a new index; rerun after an interruption to resume."""
    from polyclip.index import BuildOptions, VectorIndexConfig
    from polyclip.index import build as build_index
    from polyclip.index.vectors import parse_bytes

    vector_config = VectorIndexConfig(
        exact_limit=exact_limit,
        max_memory_bytes=parse_bytes(max_index_memory),
        max_query_ms=max_query_ms,
        kind=kind,
        memory_mappable=memory_mappable,
        rerank=rerank,
    )

    report = build_index(
        sources or [],
        model,
        out,
        captions,
        BuildOptions(batch_size, workers, not quiet),
        device=device,
        dtype=None if dtype is None else str(dtype),
        vector_config=vector_config,
    )
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 reports for all ranks
        _print_report(report, "indexed")


@index_app.command("add")
def add(
    folder: Annotated[Path, typer.Argument(help="index folder")],
    sources: Sources = None,
    captions: Captions = None,
    batch_size: BatchSize = 32,
    workers: Workers = None,
    device: Device = None,
    quiet: Quiet = False,
) -> None:
    """Add images to an index with the model it was built with."""
    from polyclip.index import BuildOptions, add_to_index

    report = add_to_index(
        folder, sources or [], captions, BuildOptions(batch_size, workers, not quiet), device
    )
    _print_report(report, "added")


@index_app.command("remove")
def remove(
    folder: Annotated[Path, typer.Argument(help="index folder")],
    ids: Annotated[list[int], typer.Argument(help="item ids to remove")],
) -> None:
    """Remove items by id (all or none, if an id is unknown)."""
    from polyclip.index import remove_from_index

    left = remove_from_index(folder, ids)
    typer.echo(f"removed {len(set(ids))} item(s); {left} left")


@index_app.command("info")
def info(
    folder: Annotated[Path, typer.Argument(help="index folder")],
    json_output: JsonOutput = False,
) -> None:
    """Model, size, FAISS index type and parameters, unreadable files."""
    from polyclip.index import Index

    with Index(folder) as index:
        details = index.describe()
        failures = index.store.failures()
    if json_output:
        typer.echo(json.dumps({**details, "failures": failures}, indent=2))
        return
    model = details["model"]
    typer.echo(f"{details['folder']}: {details['items']} item(s)")
    typer.echo(
        f"model      {model['source']} ({model['dtype']}, {model['embed_dim']}-d, {model['fingerprint']})"
    )
    for space, spec in details["spaces"].items():
        typer.echo(f"{space:<10} {spec['vectors']} vectors, {spec['summary']}")
    for path, reason in failures:
        typer.echo(f"unreadable {path}: {reason}")


@index_app.command("search")
def search(
    folder: Annotated[Path, typer.Argument(help="index folder")],
    text: Annotated[str | None, typer.Option("--text", "-t", help="text query")] = None,
    image: Annotated[Path | None, typer.Option("--image", "-i", help="image query")] = None,
    k: TopK = 10,
    filter: Annotated[
        str | None, typer.Option("--filter", help='metadata conditions as JSON, e.g. {"split": "test"}')
    ] = None,
    space: Annotated[str, typer.Option("--space", help="image or caption vectors")] = "image",
    device: Device = None,
    json_output: JsonOutput = False,
) -> None:
    """Query an index from the command line with its own model."""
    from polyclip.index.query import search_folder

    if (text is None) == (image is None):
        raise ValueError("give exactly one of --text or --image")
    try:
        conditions = json.loads(filter) if filter else None
    except json.JSONDecodeError as error:
        raise ValueError(f"--filter is not valid JSON: {error}") from None
    hits = search_folder(folder, text, image, k, conditions, space, device)
    if json_output:
        typer.echo(json.dumps([hit.to_dict() for hit in hits], indent=2))
        return
    for hit in hits:
        caption = f"  {hit.caption}" if hit.caption else ""
        typer.echo(f"{hit.score:7.4f}  {hit.id:>8}  {hit.path}{caption}")


def serve(
    folder: Annotated[Path, typer.Argument(help="index folder")],
    host: Annotated[str, typer.Option("--host", help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8000,
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="require header X-API-Key (default: $POLYCLIP_API_KEY)")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="pin the model (registry name, hf-hub:org/repo or a path): index.json's model is not "
            "loaded, and an index built with another is refused",
        ),
    ] = None,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(
            "--cors-origin",
            help="an origin whose pages may call the service, e.g. http://localhost:3000 (repeatable; "
            "default: none, no CORS headers)",
        ),
    ] = None,
    root: Annotated[
        Path | None,
        typer.Option("--root", help="show paths relative to this folder (default: the items' common folder)"),
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="the index name clip-retrieval clients see (default: folder name)")
    ] = None,
    allow_image_urls: Annotated[
        bool,
        typer.Option(
            "--allow-image-urls", help="let /knn-service fetch 'image_url' (the server makes the request)"
        ),
    ] = False,
    device: Device = None,
    dtype: Annotated[
        DtypeChoice | None, typer.Option("--dtype", help="default: the dtype the index was built with")
    ] = None,
    max_batch: Annotated[
        int, typer.Option("--max-batch", min=1, help="items per forward pass (1: no batching)")
    ] = 32,
    max_wait_ms: Annotated[float, typer.Option("--max-wait-ms", min=0, help="batching window")] = 2.0,
    max_upload_mb: Annotated[
        float, typer.Option("--max-upload-mb", min=0.001, help="request body limit")
    ] = 16.0,
    max_image_pixels: Annotated[int, typer.Option("--max-image-pixels", min=1)] = 40_000_000,
    max_text_chars: Annotated[int, typer.Option("--max-text-chars", min=1)] = 1_000,
    max_k: Annotated[int, typer.Option("--max-k", min=1)] = 1_000,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Serve an index over HTTP: /search, /classify, /embed, /images/{id}, /health, /metrics, a web page,
    and clip-retrieval's /knn-service, /metadata and /indices-list. The index folder is trusted input."""
    from polyclip.serve import ServeConfig, run

    config = ServeConfig(
        host=host,
        port=port,
        api_key=api_key,
        model=model,
        cors_origins=tuple(cors_origin or ()),
        collection_root=None if root is None else str(root),
        index_name=name,
        allow_image_urls=allow_image_urls,
        device=device,
        dtype=None if dtype is None else str(dtype),
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        max_image_pixels=max_image_pixels,
        max_text_chars=max_text_chars,
        max_k=max_k,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
    )
    run(folder, config, log_level=log_level)
