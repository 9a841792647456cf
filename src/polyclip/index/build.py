"""Embedding image collections into an index: batched, resumable, and sharded under torchrun.

- Decoding runs in a thread pool a few batches ahead of the encoder (`polyclip.encode.embed_images`);
  unreadable files are recorded with their reason and reported, never fatal.
- Each batch is committed in one SQLite transaction (items, vectors, the change log), so a build
  killed at any moment and run again embeds exactly the files still missing: nothing lost, nothing
  twice (paths are unique in the store).
- Under ``torchrun --nproc_per_node N``, rank r embeds every N-th file still missing into its own
  shard folder ``OUT/shards/rank-r``; after a barrier (gloo), rank 0 merges the shards into OUT and
  writes the FAISS files. A killed sharded build resumes the same way, whatever the new world size.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from polyclip.encode import embed_images, list_images
from polyclip.index.captions import Annotation, read_captions
from polyclip.index.encoder import Encoder
from polyclip.index.errors import IndexStoreError
from polyclip.index.index import Index
from polyclip.index.store import NewItem
from polyclip.index.vectors import VectorIndexConfig
from polyclip.progress import progress_bar

SHARDS_FOLDER = "shards"
MERGE_CHUNK = 1024


@dataclass
class BuildOptions:
    batch_size: int = 32  # images per forward pass (and per committed transaction)
    workers: int | None = None  # decoding threads; default min(4, CPU count)
    progress: bool = True


@dataclass
class BuildReport:
    added: int = 0
    skipped: int = 0  # already indexed (a resumed build, or files given twice)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    captions_without_image: int = 0  # captions file records whose image was not among the inputs
    items: int = 0  # items in the index at the end

    def merge(self, other: BuildReport) -> None:
        self.added += other.added
        self.skipped += other.skipped
        self.failures += other.failures


def collect_inputs(
    sources: Sequence[str | os.PathLike], captions_file: str | os.PathLike | None = None
) -> tuple[list[str], dict[str, Annotation], int]:
    """(absolute image paths in input order without repeats, annotations by path, unmatched captions).

    With no sources but a captions file, the captions file's records are the collection.
    """
    annotations = read_captions(captions_file) if captions_file else {}
    if sources:
        listed = [str(Path(p).expanduser().resolve()) for p in list_images(sources)]
    elif annotations:
        listed = list(annotations)
    else:
        raise IndexStoreError("nothing to index: give image files or folders, or a captions file")
    paths = list(dict.fromkeys(listed))
    present = set(paths)
    unmatched = sum(1 for path in annotations if path not in present)
    return paths, annotations, unmatched


def add_paths(
    index: Index,
    encoder: Encoder,
    paths: Sequence[str],
    annotations: dict[str, Annotation] | None = None,
    options: BuildOptions | None = None,
    save: bool = True,
) -> BuildReport:
    """Embed the files not yet in ``index`` (and their captions) and commit them batch by batch."""
    options = options or BuildOptions()
    annotations = annotations or {}
    index.identity.check_compatible(encoder.identity, "vectors of this model")
    existing = index.store.existing_paths(paths)
    todo = [path for path in paths if path not in existing]
    report = BuildReport(skipped=len(paths) - len(todo))
    with progress_bar(total=len(todo), unit="img", desc="indexing", enabled=options.progress) as bar:
        batches = embed_images(
            encoder.model,
            encoder.preprocess,
            todo,
            options.batch_size,
            normalize=True,
            workers=options.workers,
        )
        for ok_paths, embeddings, failures in batches:
            items = _items(encoder, ok_paths, embeddings.numpy(), annotations)
            new_ids = index.add(items, failures)
            report.added += sum(1 for i in new_ids if i is not None)
            report.skipped += sum(1 for i in new_ids if i is None)
            report.failures += failures
            bar.update(len(ok_paths) + len(failures))
    if save:
        index.save()
    report.items = len(index)
    return report


def _items(
    encoder: Encoder, paths: list[str], embeddings, annotations: dict[str, Annotation]
) -> list[NewItem]:
    notes = [annotations.get(path) or Annotation() for path in paths]
    captioned = [i for i, note in enumerate(notes) if note.caption]
    caption_vectors = encoder.text_vectors([notes[i].caption for i in captioned])  # (C, E)
    by_item = dict(zip(captioned, caption_vectors))
    items = []
    for i, (path, note) in enumerate(zip(paths, notes)):
        vectors = {"image": embeddings[i]}
        if i in by_item:
            vectors["caption"] = by_item[i]
        items.append(NewItem(path, vectors, note.caption, dict(note.metadata)))
    return items


def build(
    sources: Sequence[str | os.PathLike],
    model: str,
    out: str | os.PathLike,
    captions_file: str | os.PathLike | None = None,
    options: BuildOptions | None = None,
    device: str | None = None,
    dtype: str | None = None,
    vector_config: VectorIndexConfig | None = None,
) -> BuildReport:
    """Create (or resume) the index ``out`` of the images in ``sources``; sharded under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _build_sharded(sources, model, Path(out), captions_file, options, device, dtype, vector_config)
    paths, annotations, unmatched = collect_inputs(sources, captions_file)
    encoder = Encoder.load(model, device=device, dtype=dtype)
    with Index.create(out, encoder.identity, vector_config) as index:
        report = add_paths(index, encoder, paths, annotations, options)
    report.captions_without_image = unmatched
    return report


def add_to_index(
    folder: str | os.PathLike,
    sources: Sequence[str | os.PathLike],
    captions_file: str | os.PathLike | None = None,
    options: BuildOptions | None = None,
    device: str | None = None,
    encoder: Encoder | None = None,
) -> BuildReport:
    """Add files to an existing index with the model it records (checked by fingerprint)."""
    with Index(folder, writable=True) as index:
        paths, annotations, unmatched = collect_inputs(sources, captions_file)
        if encoder is None:
            encoder = Encoder.load(index.identity.source, device=device, dtype=index.identity.dtype)
        report = add_paths(index, encoder, paths, annotations, options)
    report.captions_without_image = unmatched
    return report


def remove_from_index(folder: str | os.PathLike, ids: Sequence[int]) -> int:
    """Remove items by id (all or nothing); returns the number of items left."""
    with Index(folder, writable=True) as index:
        index.remove(ids)
        index.save()
        return len(index)


def merge_shard(main: Index, shard: Index) -> int:
    """Copy a shard's items (vectors, captions, metadata, failures) into ``main``; paths already there are
    skipped, so a merge interrupted and run again duplicates nothing. Returns the number of new items."""
    main.identity.check_compatible(shard.identity, f"the shard {shard.folder}")
    dim = main.identity.embed_dim
    added, offset = 0, 0
    while True:
        records = shard.store.list_items(limit=MERGE_CHUNK, offset=offset)
        if not records:
            break
        offset += len(records)
        ids = [record.id for record in records]
        vectors: dict[int, dict[str, object]] = {record.id: {} for record in records}
        for space in ("image", "caption"):
            found_ids, found = shard.store.get_vectors(space, ids, dim)
            for item_id, vector in zip(found_ids.tolist(), found):
                vectors[item_id][space] = vector
        items = [NewItem(r.path, vectors[r.id], r.caption, r.metadata) for r in records]
        added += sum(1 for i in main.add(items) if i is not None)
    shard_failures = shard.store.failures()
    indexed = main.store.existing_paths([path for path, _ in shard_failures])
    failures = [(path, reason) for path, reason in shard_failures if path not in indexed]
    if failures:
        main.add([], failures)
    return added


def _build_sharded(
    sources, model, out: Path, captions_file, options, device, dtype, vector_config
) -> BuildReport:
    import torch.distributed as dist

    options = options or BuildOptions()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device is None and torch.cuda.is_available():
        device = f"cuda:{local_rank}"
    # gloo: the barriers and the report gather are CPU-side, whatever device the encoders run on
    dist.init_process_group("gloo")
    try:
        paths, annotations, unmatched = collect_inputs(sources, captions_file)
        encoder = Encoder.load(model, device=device, dtype=dtype)
        if rank == 0:
            Index.create(out, encoder.identity, vector_config).close()
        dist.barrier()
        with Index(out) as main:
            main.identity.check_compatible(encoder.identity, f"rank {rank}'s model")
            done = main.store.existing_paths(paths)
        todo = [path for path in paths if path not in done]
        shard_options = BuildOptions(options.batch_size, options.workers, options.progress and rank == 0)
        with Index.create(out / SHARDS_FOLDER / f"rank-{rank}", encoder.identity, vector_config) as shard:
            report = add_paths(shard, encoder, todo[rank::world], annotations, shard_options, save=False)
        report.skipped += len(done) if rank == 0 else 0
        dist.barrier()
        reports: list[BuildReport | None] = [None] * world
        dist.all_gather_object(reports, report)
        if rank == 0:
            total = BuildReport(captions_without_image=unmatched)
            for part in reports:
                total.merge(part)
            with Index(out, writable=True) as main:
                for shard_dir in sorted((out / SHARDS_FOLDER).glob("rank-*")):
                    with Index(shard_dir) as shard:
                        merge_shard(main, shard)
                main.save()
                total.items = len(main)
            shutil.rmtree(out / SHARDS_FOLDER)
        dist.barrier()
        return total if rank == 0 else report
    finally:
        dist.destroy_process_group()
