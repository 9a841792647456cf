"""Embeddings of a collection to one Parquet file, resumable after a kill.

Work goes to ``<out>.parts/``: one Parquet part per batch group, written atomically, and a manifest of
the model used. A rerun reads the finished parts, skips what they hold, and finishes; the parts are
then merged into ``<out>`` (columns ``path`` or ``text``, ``embedding`` as a list of float32) and
removed. Requires pyarrow (``pip install polyclip[data]``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm


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
    pq.write_table(table, tmp)
    tmp.replace(folder / f"part-{index:06d}.parquet")


def embed_to_parquet(
    model_name: str,
    out: Path,
    paths: list[Path],
    text_file: Path | None,
    batch_size: int = 32,
    workers: int | None = None,
    dtype: str | None = None,
    rows_per_part: int = 1024,
) -> dict[str, Any]:
    import polyclip
    from polyclip.encode import embed_images, list_images
    from polyclip.zero_shot import encode_texts

    pa, pq = _pyarrow()
    out = Path(out)
    parts = out.with_name(out.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    key = "text" if text_file is not None else "path"
    manifest = {"model": str(model_name), "key": key}
    manifest_path = parts / "manifest.json"
    if manifest_path.is_file() and json.loads(manifest_path.read_text()) != manifest:
        raise ValueError(
            f"{parts} holds an unfinished run with another model or input kind "
            f"({manifest_path.read_text().strip()}); remove it or use another --out"
        )
    manifest_path.write_text(json.dumps(manifest))

    if text_file is not None:
        items = [line.strip() for line in Path(text_file).read_text().splitlines() if line.strip()]
    else:
        items = list_images(paths)
    if not items:
        raise ValueError("nothing to embed: no texts in the file" if text_file else "no image files found")
    done_parts = sorted(parts.glob("part-*.parquet"))
    done = set()
    for part in done_parts:
        done.update(pq.read_table(part, columns=[key]).column(key).to_pylist())
    todo = [item for item in items if item not in done]
    failures: list[tuple[str, str]] = []
    failures_path = parts / "failures.jsonl"
    if failures_path.is_file():
        failures = [tuple(json.loads(line)) for line in failures_path.read_text().splitlines()]
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

        with tqdm(total=len(todo), unit=key if key == "text" else "img", desc="embedding") as bar:
            if text_file is not None:
                for start in range(0, len(todo), rows_per_part):
                    chunk = todo[start : start + rows_per_part]
                    buffer_keys, buffer_vectors = chunk, [encode_texts(model, tokenizer, chunk, batch_size)]
                    flush()
                    bar.update(len(chunk))
            else:
                with failures_path.open("a") as failure_log:
                    for ok, embeddings, failed in embed_images(
                        model, preprocess, todo, batch_size, workers=workers
                    ):
                        buffer_keys += ok
                        buffer_vectors.append(embeddings)
                        for item in failed:
                            failure_log.write(json.dumps(item) + "\n")
                        failures += failed
                        failure_log.flush()
                        if len(buffer_keys) >= rows_per_part:
                            flush()
                        bar.update(len(ok) + len(failed))
                flush()

    tables = [pq.read_table(part) for part in sorted(parts.glob("part-*.parquet"))]
    table = pa.concat_tables(tables) if tables else None
    if table is None:
        raise ValueError(f"no input could be embedded; {len(failures)} file(s) failed")
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(out)
    shutil.rmtree(parts)
    return {
        "rows": table.num_rows,
        "new": len(todo) - len([f for f in failures if f[0] in set(todo)]),
        "resumed": len(done),
        "failures": failures,
    }
