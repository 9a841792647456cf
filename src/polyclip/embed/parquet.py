"""Embeddings of a collection to one Parquet file, resumable after a kill.

Work goes to ``<out>.parts/``: one Parquet part per batch group, written atomically, a manifest of
the model used and ``failures.jsonl``, the unreadable files (one line each, a torn last line ignored).
A rerun reads the finished parts, skips what they hold, and finishes; the parts are then merged into
``<out>`` (columns ``path`` or ``text``, ``embedding`` as a list of float32; the manifest and the
failures in the file's metadata) and removed. A rerun on a finished ``<out>`` embeds only files that are
new to it, and nothing when there are none. Image paths are recorded as `polyclip.files.stable_path`
names, so ``DIR``, ``./DIR``, ``/abs/DIR`` and a symlink to it are one collection. A full disk stops the
run with `DiskFullError` and loses nothing. Requires pyarrow (``pip install polyclip[data]``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from polyclip.files import append_jsonl, read_jsonl_log, reporting_disk_full, stable_path

# Keys of the finished file's schema metadata
_MANIFEST_KEY, _FAILURES_KEY = b"polyclip.manifest", b"polyclip.failures"


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as error:
        raise ImportError("writing Parquet needs pyarrow: pip install 'polyclip[data]'") from error
    return pa, pq


def _write_part(folder: Path, index: int, key: str, keys: list[str], embeddings: torch.Tensor) -> None:
    pa, pq = _pyarrow()
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.numpy().reshape(-1)), embeddings.shape[1])
    table = pa.table({key: pa.array(keys, pa.string()), "embedding": vectors})
    tmp = folder / f"part-{index:06d}.parquet.tmp"
    with reporting_disk_full(tmp):
        pq.write_table(table, tmp)
    tmp.replace(folder / f"part-{index:06d}.parquet")


def _model_name(model_name: str) -> str:
    # a local checkpoint is the same model however its path is spelled
    return str(Path(model_name).resolve()) if Path(model_name).exists() else str(model_name)


def _finished(out: Path, manifest: dict[str, str]) -> tuple[Any, list[tuple[str, str]]] | None:
    """The rows and failures of a finished ``out`` written for ``manifest``, or None when there is none."""
    if not out.is_file():
        return None
    pa, pq = _pyarrow()
    try:
        metadata = pq.read_schema(out).metadata or {}
    except (OSError, pa.ArrowException) as error:
        raise ValueError(
            f"{out} exists but is not a readable Parquet file ({error}); remove it or use another --out"
        ) from None
    recorded = metadata.get(_MANIFEST_KEY)
    if recorded is None or json.loads(recorded) != manifest:
        found = recorded.decode() if recorded else "no record of its model"
        raise ValueError(
            f"{out} already exists and holds embeddings of another run ({found}); nothing is overwritten: "
            "remove it or use another --out"
        )
    failures = [tuple(item) for item in json.loads(metadata.get(_FAILURES_KEY, b"[]"))]
    return pq.read_table(out), failures


def embed_to_parquet(
    model_name: str,
    out: Path,
    paths: list[Path],
    text_file: Path | None,
    batch_size: int = 32,
    workers: int | None = None,
    dtype: str | None = None,
    rows_per_part: int = 1024,
    progress: bool = True,
) -> dict[str, Any]:
    """Embed images (``paths``: files and folders) or the lines of ``text_file`` into ``out``.

    Returns ``{"rows", "new", "resumed", "failures", "complete"}``; ``complete`` is True when ``out``
    already held everything and nothing was embedded. Raises ValueError when nothing could be embedded.
    """
    import polyclip
    from polyclip.encode import embed_images, list_images
    from polyclip.progress import progress_bar
    from polyclip.zero_shot import encode_texts

    pa, pq = _pyarrow()
    out = Path(out)
    key = "text" if text_file is not None else "path"
    manifest = {"model": _model_name(model_name), "key": key}
    if text_file is not None:
        items = [line.strip() for line in Path(text_file).read_text().splitlines() if line.strip()]
    else:
        items = list(dict.fromkeys(stable_path(path) for path in list_images(paths)))
    if not items:
        raise ValueError("nothing to embed: no texts in the file" if text_file else "no image files found")

    parts = out.with_name(out.name + ".parts")
    manifest_path = parts / "manifest.json"
    if manifest_path.is_file() and json.loads(manifest_path.read_text()) != manifest:
        raise ValueError(
            f"{parts} holds an unfinished run with another model or input kind "
            f"({manifest_path.read_text().strip()}); remove it or use another --out"
        )
    finished = None if parts.is_dir() else _finished(out, manifest)
    if finished is not None:
        table, failures = finished
        done = set(table.column(key).to_pylist())
        failed = {path for path, _ in failures}
        if all(item in done or item in failed for item in items):
            return {
                "rows": table.num_rows,
                "new": 0,
                "resumed": table.num_rows,
                "failures": failures,
                "complete": True,
            }
    with reporting_disk_full(parts):
        parts.mkdir(parents=True, exist_ok=True)
        manifest_path.write_text(json.dumps(manifest))
    if finished is not None and not any(parts.glob("part-*.parquet")):
        # a finished file that the collection outgrew: its rows are the first part of this run
        with reporting_disk_full(parts):
            pq.write_table(finished[0].replace_schema_metadata(None), parts / "part-000000.parquet.tmp")
        (parts / "part-000000.parquet.tmp").replace(parts / "part-000000.parquet")
        failures_path = parts / "failures.jsonl"
        if not failures_path.exists():
            failures_path.write_text("".join(json.dumps(list(item)) + "\n" for item in finished[1]))

    done_parts = sorted(parts.glob("part-*.parquet"))
    done = set()
    for part in done_parts:
        done.update(pq.read_table(part, columns=[key]).column(key).to_pylist())
    todo = [item for item in items if item not in done]
    failures_path = parts / "failures.jsonl"
    failures = [
        tuple(record)
        for record in read_jsonl_log(failures_path)
        if isinstance(record, list) and len(record) == 2 and all(isinstance(x, str) for x in record)
    ]
    failed = {path for path, _ in failures}
    todo = [item for item in todo if item not in failed]

    if todo:
        model, preprocess, tokenizer = polyclip.load(model_name, dtype=dtype)
        part_index = len(done_parts)
        buffer_keys: list[str] = []
        buffer_vectors: list[torch.Tensor] = []

        def flush():
            nonlocal part_index, buffer_keys, buffer_vectors
            if buffer_keys:
                _write_part(parts, part_index, key, buffer_keys, torch.cat(buffer_vectors))
                part_index += 1
                buffer_keys, buffer_vectors = [], []

        unit = key if key == "text" else "img"
        with progress_bar(total=len(todo), unit=unit, desc="embedding", enabled=progress) as bar:
            if text_file is not None:
                for start in range(0, len(todo), rows_per_part):
                    chunk = todo[start : start + rows_per_part]
                    buffer_keys, buffer_vectors = chunk, [encode_texts(model, tokenizer, chunk, batch_size)]
                    flush()
                    bar.update(len(chunk))
            else:
                with failures_path.open("a") as failure_log:
                    for ok, embeddings, failed_items in embed_images(
                        model, preprocess, todo, batch_size, workers=workers
                    ):
                        buffer_keys += ok
                        buffer_vectors.append(embeddings)
                        with reporting_disk_full(failures_path):
                            for item in failed_items:
                                append_jsonl(failure_log, list(item))
                        failures += [tuple(item) for item in failed_items]
                        if len(buffer_keys) >= rows_per_part:
                            flush()
                        bar.update(len(ok) + len(failed_items))
                flush()

    tables = [pq.read_table(part) for part in sorted(parts.glob("part-*.parquet"))]
    table = pa.concat_tables(tables) if tables else None
    if table is None:
        raise ValueError(f"no input could be embedded; {len(failures)} file(s) failed")
    metadata = {_MANIFEST_KEY: json.dumps(manifest).encode(), _FAILURES_KEY: json.dumps(failures).encode()}
    tmp = out.with_name(out.name + ".tmp")
    with reporting_disk_full(out):
        pq.write_table(table.replace_schema_metadata(metadata), tmp)
    tmp.replace(out)
    shutil.rmtree(parts)
    attempted = set(todo)
    return {
        "rows": table.num_rows,
        "new": len(todo) - len([f for f in failures if f[0] in attempted]),
        "resumed": len(done),
        "failures": failures,
        "complete": False,
    }
