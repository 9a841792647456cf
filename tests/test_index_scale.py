"""The index at scale, on tiny data: kinds chosen under a memory budget, recall of each kind against
known exact neighbours, readers mapping IVF indexes from disk, the float16 vector store, migration
of a format-1 index, a full disk, and resuming a build given the same folder under another name."""

# ruff: noqa: F811  (pytest fixtures imported from test_index_support are redefined as arguments)
from __future__ import annotations

import errno
import json
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from test_index_support import make_images, tiny_encoder, tiny_model_dir  # noqa: F401

faiss = pytest.importorskip("faiss")

from polyclip.cli import app  # noqa: E402
from polyclip.index import Index, IndexStoreError, ModelIdentity, NewItem, QueryEmbeddings, VectorIndexConfig  # noqa: E402
from polyclip.index import vectors as vector_ops  # noqa: E402
from polyclip.index.errors import DiskFullError  # noqa: E402
from polyclip.index.vector_store import VectorStore  # noqa: E402
from polyclip.index.vectors import choose_spec, parse_bytes  # noqa: E402

runner = CliRunner()
DIM = 32
IDENTITY = ModelIdentity(source="synthetic", weights_sha256="ab" * 32, embed_dim=DIM)


def clustered(count: int, seed: int = 0, clusters: int = 30, noise: float = 0.15) -> np.ndarray:
    """Unit vectors around the same 30 centres whatever the seed (queries come from the collection's
    distribution); ``seed`` draws other points."""
    centres = np.random.default_rng(1234).standard_normal((clusters, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    data = centres[rng.integers(0, clusters, count)] + noise * rng.standard_normal((count, DIM)).astype(
        np.float32
    )
    return data / np.linalg.norm(data, axis=1, keepdims=True)


def queries(vectors: np.ndarray) -> QueryEmbeddings:
    return QueryEmbeddings(np.ascontiguousarray(vectors, np.float32), IDENTITY.fingerprint)


def fill(folder: Path, data: np.ndarray, config: VectorIndexConfig, chunk: int = 500) -> Index:
    index = Index.create(folder, IDENTITY, config)
    for start in range(0, len(data), chunk):
        stop = min(len(data), start + chunk)
        index.add([NewItem(f"/v/{i}", {"image": data[i]}) for i in range(start, stop)])
    index.save()
    return index


# -- choosing the kind
def test_kind_follows_size_and_budget_as_autofaiss():
    config = VectorIndexConfig()
    assert choose_spec(50_000, 512, config).type == "flat"
    hnsw = choose_spec(500_000, 512, config)  # M = (4e9 / 2e6 - 512) / 2 = 744 -> capped at 32
    assert hnsw.type == "hnsw" and hnsw.params["factory"] == "IDMap2,HNSW32"
    mappable = VectorIndexConfig(memory_mappable=True)
    ivf = choose_spec(500_000, 512, mappable)
    assert ivf.params["factory"] == "IVF2048_HNSW32,Flat"  # 2^round(log2(4 sqrt(5e5) = 2828)) = 2048
    big = choose_spec(10_000_000, 512, config)  # needs compression 5.1x: PQ256 (7.8x) is the largest
    assert big.type == "ivf_pq" and big.params["factory"] == "IVF16384_HNSW32,PQ256x8"
    rotated = choose_spec(10_000_000, 512, VectorIndexConfig(opq=True))
    assert rotated.params["factory"] == "OPQ256_512,IVF16384_HNSW32,PQ256x8"
    assert big.params["estimated_bytes"] <= 4e9 and big.params["rerank"] == 10
    # 100M x (32 + 8) = 4e9 leaves nothing for the centroids; 24 does not divide 512 (OPQ would allow it)
    huge = choose_spec(100_000_000, 512, config)
    assert huge.params["pq"] == 16 and huge.params["nlist"] == 65_536
    assert choose_spec(100_000_000, 512, VectorIndexConfig(opq=True)).params["pq"] == 24
    with pytest.raises(IndexStoreError, match="raise --max-index-memory"):
        choose_spec(10_000_000, 512, VectorIndexConfig(max_memory_bytes=parse_bytes("100MB")))
    assert parse_bytes("4GB") == 4 * 10**9 and parse_bytes("2GiB") == 2 * 2**30
    with pytest.raises(IndexStoreError, match="not a memory size"):
        parse_bytes("lots")


# -- each kind finds the known nearest neighbours
KIND_CONFIGS = {
    "flat": VectorIndexConfig(),
    "hnsw": VectorIndexConfig(exact_limit=100),
    "ivf_flat": VectorIndexConfig(exact_limit=100, memory_mappable=True),
    "ivf_pq": VectorIndexConfig(exact_limit=100, kind="ivf_pq", pq_bytes=8, calibration_queries=100),
}


@pytest.mark.parametrize("kind", list(KIND_CONFIGS))
def test_each_kind_reaches_recall_and_masks_removals(tmp_path, kind):
    data = clustered(3000)
    index = fill(tmp_path / kind, data, KIND_CONFIGS[kind])
    spec = index.spec()
    assert spec.type == kind
    probe = clustered(60, seed=1)
    exact = np.argsort(-(probe @ data.T), axis=1)[:, :10] + 1  # item ids start at 1
    found = index.search(queries(probe), k=10)
    recall = np.mean([len(set(e.tolist()) & {h.id for h in row}) / 10 for e, row in zip(exact, found)])
    assert recall >= 0.9, (kind, recall, spec.params)
    if kind != "flat":
        assert spec.params["calibration_recall"] >= 0.9 and "query_ms" in spec.params
    # a stored vector finds itself first, its score exact (re-ranked from the float16 store for PQ)
    own = index.search(queries(data[[5, 2500]]), k=3)
    assert [row[0].id for row in own] == [6, 2501]
    assert own[0][0].score == pytest.approx(1.0, abs=2e-3)
    gone = [h.id for h in found[0][:3]]
    index.remove(gone)
    assert not set(gone) & {h.id for h in index.search(queries(probe[:1]), k=10)[0]}
    index.save()
    index.close()
    with Index(tmp_path / kind) as reader:
        assert reader.spec().type == kind and reader.vector_count() == 3000 - 3
        assert not set(gone) & {h.id for h in reader.search(queries(probe[:1]), k=10)[0]}


def test_reader_maps_ivf_from_disk_and_merges_later_changes(tmp_path):
    data = clustered(3000)
    config = KIND_CONFIGS["ivf_pq"]
    writer = fill(tmp_path / "pq", data, config)
    assert not vector_ops.is_mapped(writer._spaces["image"].index)  # the writer holds it in RAM
    reader = Index(tmp_path / "pq")
    assert reader.search(queries(data[:1]), k=1)[0][0].id == 1
    assert vector_ops.is_mapped(reader._spaces["image"].index)  # lists read from the mapped file
    # the writer adds and removes without saving: the reader merges the additions by score and masks
    # the removal, never changing the mapped file
    extra = clustered(5, seed=7, noise=0.01)
    new_ids = writer.add([NewItem(f"/new/{i}", {"image": v}) for i, v in enumerate(extra)])
    writer.remove([1])
    hits = reader.search(queries(extra), k=5)
    assert [row[0].id for row in hits] == new_ids
    everything = reader.search(queries(data[:50]), k=20)
    assert all(len({h.id for h in row}) == len(row) for row in everything)  # nothing twice
    assert 1 not in {h.id for row in everything for h in row}
    writer.save()  # compacts the log: the reader reloads the new file and stays consistent
    hits = reader.search(queries(extra), k=1)
    assert [row[0].id for row in hits] == new_ids and reader.vector_count() == 3000 + 5 - 1
    reader.close()
    writer.close()


# -- the vector store
def test_vector_store_rows_across_shards_and_sparse_files(tmp_path):
    store = VectorStore(tmp_path, "image", DIM, rows_per_shard=64)
    data = clustered(150)
    store.write(0, data[:100])
    store.write(100, data[100:])
    assert len(store.files()) == 3  # 64 + 64 + 22 rows
    rows = np.array([149, 0, 63, 64, 65, 7])
    np.testing.assert_allclose(store.read(rows), data[rows], rtol=2**-11, atol=1e-6)
    mapped = np.load(store.files()[1], mmap_mode="r")  # plain .npy files: any reader can map them
    assert mapped.shape == (64, DIM) and mapped.dtype == np.float16
    np.testing.assert_allclose(mapped[1], data[65], rtol=2**-11, atol=1e-6)


def test_no_float32_copy_in_sqlite(tmp_path):
    index = fill(tmp_path / "i", clustered(200), VectorIndexConfig())
    db = sqlite3.connect(tmp_path / "i" / "metadata.sqlite")
    columns = [row[1] for row in db.execute("PRAGMA table_info(vectors)")]
    assert columns == ["space", "item_id", "row"]
    assert (tmp_path / "i" / "vectors" / "image-00000.npy").is_file()
    index.close()


# -- format 1 (vectors as float32 blobs in SQLite) is migrated on open
FORMAT_1_SCHEMA = """
CREATE TABLE items (id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT NOT NULL UNIQUE, caption TEXT,
    metadata TEXT NOT NULL DEFAULT '{}', added_at REAL NOT NULL);
CREATE TABLE vectors (space TEXT NOT NULL, item_id INTEGER NOT NULL REFERENCES items(id) ON DELETE CASCADE,
    vector BLOB NOT NULL, UNIQUE (space, item_id));
CREATE TABLE changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, space TEXT NOT NULL, item_id INTEGER NOT NULL,
    op TEXT NOT NULL CHECK (op IN ('add', 'remove')));
CREATE INDEX changes_by_space ON changes (space, seq);
CREATE TABLE failures (path TEXT PRIMARY KEY, reason TEXT NOT NULL, failed_at REAL NOT NULL);
CREATE TABLE info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def write_format_1(folder: Path, data: np.ndarray, captions: np.ndarray) -> None:
    """An index folder as polyclip wrote it before the vector store: blobs, and an 'ivf' spec name."""
    folder.mkdir()
    db = sqlite3.connect(folder / "metadata.sqlite")
    db.executescript(FORMAT_1_SCHEMA)
    for i, vector in enumerate(data):
        db.execute("INSERT INTO items (path, caption, added_at) VALUES (?, ?, 0)", (f"/v/{i}", f"c{i}"))
        db.execute("INSERT INTO vectors VALUES ('image', ?, ?)", (i + 1, vector.astype("<f4").tobytes()))
        db.execute("INSERT INTO changes (space, item_id, op) VALUES ('image', ?, 'add')", (i + 1,))
        if i < len(captions):
            db.execute(
                "INSERT INTO vectors VALUES ('caption', ?, ?)", (i + 1, captions[i].astype("<f4").tobytes())
            )
            db.execute("INSERT INTO changes (space, item_id, op) VALUES ('caption', ?, 'add')", (i + 1,))
    db.commit()
    db.close()
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
    flat.add_with_ids(data, np.arange(1, len(data) + 1))
    faiss.write_index(flat, str(folder / "vectors.faiss"))
    manifest = {
        "format_version": 1,
        "model": IDENTITY.to_dict(),
        "vector_config": {"exact_limit": 100_000, "lists_per_sqrt_n": 4.0, "seed": 0},
        "spaces": {"image": {"type": "flat", "dim": DIM, "params": {}, "file": "vectors.faiss",
                             "applied_seq": len(data), "count": len(data)}},
    }  # fmt: skip
    (folder / "index.json").write_text(json.dumps(manifest))


def test_format_1_index_is_migrated_on_open(tmp_path):
    data, captions = clustered(400), clustered(50, seed=3)
    folder = tmp_path / "old"
    write_format_1(folder, data, captions)
    size_before = (folder / "metadata.sqlite").stat().st_size
    with Index(folder) as index:  # a reader migrates too (under the write lock)
        assert index.spaces == ["image", "caption"] and len(index) == 400
        hits = index.search(queries(data[[10]]), k=3)[0]
        assert hits[0].id == 11 and hits[0].caption == "c10"
        ids, stored = index.stored_vectors(range(1, 401))
        np.testing.assert_allclose(stored, data, rtol=2**-11, atol=1e-6)
        caption_hit = index.search(queries(captions[[7]]), k=1, space="caption")[0][0]
        assert caption_hit.id == 8
    manifest = json.loads((folder / "index.json").read_text())
    assert manifest["format_version"] == 2
    columns = [
        row[1] for row in sqlite3.connect(folder / "metadata.sqlite").execute("PRAGMA table_info(vectors)")
    ]
    assert "vector" not in columns
    blob_bytes = (400 + 50) * DIM * 4
    assert size_before - (folder / "metadata.sqlite").stat().st_size >= 0.8 * blob_bytes  # blobs left
    with Index(folder, writable=True) as again:  # opening again changes nothing
        assert len(again) == 400 and again.vector_count("caption") == 50


def test_unknown_format_is_refused_with_how_to_rebuild(tmp_path):
    folder = tmp_path / "future"
    folder.mkdir()
    (folder / "index.json").write_text(json.dumps({"format_version": 99, "model": IDENTITY.to_dict()}))
    with pytest.raises(IndexStoreError, match="Rebuild the index with 'polyclip index build'"):
        Index(folder)


# -- a full disk
def test_disk_full_while_writing_vectors_keeps_what_was_committed(tmp_path, monkeypatch):
    data = clustered(300)
    index = Index.create(tmp_path / "full", IDENTITY)
    index.add([NewItem(f"/v/{i}", {"image": data[i]}) for i in range(100)])
    real = os.pwrite

    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("polyclip.index.vector_store.os.pwrite", no_space)
    with pytest.raises(DiskFullError, match=r"no space left on device while writing .*image-00000\.npy; "
                       "free space and rerun to resume"):  # fmt: skip
        index.add([NewItem(f"/v/{i}", {"image": data[i]}) for i in range(100, 200)])
    monkeypatch.setattr("polyclip.index.vector_store.os.pwrite", real)
    assert len(index) == 100  # the failed batch left no item behind
    index.add([NewItem(f"/v/{i}", {"image": data[i]}) for i in range(100, 300)])
    hits = index.search(queries(data[[150, 299]]), k=1)
    assert [row[0].id for row in hits] == [151, 301] or [row[0].path for row in hits] == ["/v/150", "/v/299"]

    def faiss_full(*args):
        raise RuntimeError("Error: write error in x: 1 != 2 (No space left on device)")

    monkeypatch.setattr(faiss, "write_index", faiss_full)
    with pytest.raises(DiskFullError, match=r"while writing .*vectors\.faiss"):
        index.save()
    assert not list((tmp_path / "full").glob("*.tmp*"))  # the partial file was removed
    index.close()


def test_cli_build_on_a_full_disk_exits_nonzero_then_resumes(tmp_path, tiny_model_dir, monkeypatch):
    make_images(tmp_path / "images", 12)
    out = tmp_path / "index"
    args = ["index", "build", str(tmp_path / "images"), "--model", str(tiny_model_dir), "--out", str(out)]
    calls = {"n": 0}
    real = os.pwrite

    def fails_on_third(*a):
        calls["n"] += 1
        if calls["n"] >= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a)

    monkeypatch.setattr("polyclip.index.vector_store.os.pwrite", fails_on_third)
    result = runner.invoke(app, [*args, "-q", "--batch-size", "4"])
    assert result.exit_code != 0
    assert "no space left on device while writing" in str(result.exception)
    assert "free space and rerun to resume" in str(result.exception)
    monkeypatch.setattr("polyclip.index.vector_store.os.pwrite", real)
    result = runner.invoke(app, [*args, "-q", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "indexed 4 image(s); 8 already indexed" in result.output


# -- resuming under another name for the same folder
def test_rerun_by_relative_absolute_and_symlinked_path_resumes(tmp_path, tiny_model_dir, monkeypatch):
    images = make_images(tmp_path / "data" / "images", 9)
    (tmp_path / "link").symlink_to(tmp_path / "data")
    monkeypatch.chdir(tmp_path / "data")
    out = tmp_path / "index"
    base = ["index", "build", "--model", str(tiny_model_dir), "--out", str(out), "-q", "--batch-size", "2"]
    first = runner.invoke(app, [*base[:2], "images/0001.png", "images/0002.png", *base[2:]])
    assert first.exit_code == 0, first.output
    second = runner.invoke(app, [*base[:2], str(tmp_path / "link" / "images"), *base[2:]])
    assert second.exit_code == 0 and "indexed 7 image(s); 2 already indexed" in second.output
    third = runner.invoke(app, [*base[:2], str((tmp_path / "data" / "images").resolve()), *base[2:]])
    assert "indexed 0 image(s); 9 already indexed" in third.output
    with Index(out) as index:
        paths = [r.path for r in index.store.list_items(limit=100)]
    assert sorted(paths) == sorted(str(p.resolve()) for p in images)  # one row each, resolved


# -- one model identity, shown the same everywhere
def test_info_and_refusal_show_the_same_fingerprint(tmp_path, tiny_model_dir, tiny_encoder):
    from test_index_support import save_tiny_model

    make_images(tmp_path / "images", 3)
    out = tmp_path / "index"
    build = ["index", "build", str(tmp_path / "images"), "--out", str(out), "-q"]
    assert runner.invoke(app, [*build, "--model", str(tiny_model_dir)]).exit_code == 0
    info = runner.invoke(app, ["index", "info", str(out)]).output
    assert tiny_encoder.fingerprint in info
    assert "{" not in info and "flat (exact search)" in info  # no Python reprs
    other = save_tiny_model(tmp_path / "other", seed=3)
    refused = runner.invoke(app, [*build, "--model", str(other)])
    assert refused.exit_code != 0
    assert f"fingerprint {tiny_encoder.fingerprint}" in str(refused.exception)


# -- shards of a torchrun build are searched as one
def test_rank_shards_merge_into_one_searchable_index(tmp_path):
    from polyclip.index.build import merge_shard

    data = clustered(600)
    config = VectorIndexConfig(exact_limit=100, memory_mappable=True)
    for rank in range(2):  # what each rank writes: its own items and float16 vectors
        with Index.create(tmp_path / f"rank-{rank}", IDENTITY, config) as shard:
            shard.add([NewItem(f"/v/{i}", {"image": data[i]}) for i in range(rank, len(data), 2)])
    with Index.create(tmp_path / "main", IDENTITY, config) as main:
        for rank in range(2):
            with Index(tmp_path / f"rank-{rank}") as shard:
                merge_shard(main, shard)
        with Index(tmp_path / "rank-1") as shard:
            assert merge_shard(main, shard) == 0  # a merge run again adds nothing
        main.save()
        assert main.spec().type == "ivf_flat" and len(main) == 600
        hits = main.search(queries(data[[0, 1, 598, 599]]), k=1)
        assert [row[0].path for row in hits] == ["/v/0", "/v/1", "/v/598", "/v/599"]
        assert all(row[0].score == pytest.approx(1.0, abs=2e-3) for row in hits)
