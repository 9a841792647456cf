"""Index: storage layout, exact search against brute force, filters, removal, recovery after a crash,
model identity, the automatic IVF choice and concurrent adds and searches."""

# ruff: noqa: F811  (pytest fixtures imported from test_index_support are redefined as arguments)
from __future__ import annotations

import json
import sqlite3
import threading
import time

import numpy as np
import pytest
import torch

from test_index_support import make_images, other_model_dir, tiny_encoder, tiny_model_dir, write_captions  # noqa: F401

pytest.importorskip("faiss")

from conftest import SELF_SCORE_TOLERANCE  # noqa: E402
from polyclip.index import (  # noqa: E402
    BuildOptions,
    Encoder,
    Index,
    IndexBusyError,
    IndexStoreError,
    ModelMismatchError,
    NewItem,
    QueryEmbeddings,
    VectorIndexConfig,
    add_paths,
    read_captions,
    weights_fingerprint,
)
from polyclip.index import vectors as vector_ops  # noqa: E402
from polyclip.index.build import collect_inputs  # noqa: E402
from polyclip.index.store import compile_filter  # noqa: E402

QUIET = BuildOptions(batch_size=8, progress=False)


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("collection")
    paths = make_images(root / "images", 24)
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    captions = write_captions(root / "captions.jsonl", paths)
    return root, paths, captions


@pytest.fixture
def built(tmp_path, collection, tiny_encoder):
    root, paths, captions = collection
    found, annotations, unmatched = collect_inputs([root / "images"], captions)
    index = Index.create(tmp_path / "index", tiny_encoder.identity)
    report = add_paths(index, tiny_encoder, found, annotations, QUIET)
    yield index, report, paths
    index.close()


def unit_rows(rng, n, dim):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_layout_identity_and_report(built, tiny_encoder):
    index, report, paths = built
    assert report.added == len(paths) and report.skipped == 0
    assert [p.endswith("broken.png") for p, _ in report.failures] == [True]
    folder = index.folder
    assert {"index.json", "vectors.faiss", "captions.faiss", "metadata.sqlite"} <= {
        p.name for p in folder.iterdir()
    }
    manifest = json.loads((folder / "index.json").read_text())
    assert manifest["model"]["fingerprint"] == tiny_encoder.fingerprint
    assert manifest["model"]["preprocess"]["image_size"] == 32
    assert manifest["spaces"]["image"]["type"] == "flat" and manifest["spaces"]["image"]["count"] == len(
        paths
    )
    assert manifest["spaces"]["caption"]["count"] == len(paths) // 2
    columns = [
        row[1] for row in sqlite3.connect(folder / "metadata.sqlite").execute("PRAGMA table_info(items)")
    ]
    assert columns == ["id", "path", "caption", "metadata", "added_at"]
    assert index.store.failures()[0][0].endswith("broken.png")


def test_search_matches_brute_force(built, tiny_encoder):
    index, _, paths = built
    query = tiny_encoder.encode_texts(["a noisy picture"])
    hits = index.search(query, k=5)[0]
    ids, vectors = index.stored_vectors(range(1, len(paths) + 1))
    scores = vectors @ query.vectors[0]
    order = np.argsort(-scores)[:5]
    assert [h.id for h in hits] == ids[order].tolist()
    np.testing.assert_allclose([h.score for h in hits], scores[order], rtol=1e-5, atol=1e-6)
    # stored vectors are the model's own embeddings of the files
    item = index.get(hits[0].id)
    direct = tiny_encoder.encode_images([item.path]).vectors[0]
    # stored in float16: within half a unit in the last place (2^-11 relative)
    np.testing.assert_allclose(vectors[ids.tolist().index(hits[0].id)], direct, rtol=2**-11, atol=1e-6)


def test_image_query_finds_itself_and_captions_space(built, tiny_encoder):
    index, _, paths = built
    hits = index.search(tiny_encoder.encode_images([paths[7]]), k=3)[0]
    assert hits[0].path == str(paths[7].resolve()) and hits[0].score == pytest.approx(
        1.0, abs=SELF_SCORE_TOLERANCE
    )
    caption_hits = index.search(tiny_encoder.encode_texts(["picture number 6"]), k=1, space="caption")[0]
    assert caption_hits[0].caption == "picture number 6"
    assert caption_hits[0].score == pytest.approx(1.0, abs=SELF_SCORE_TOLERANCE)
    assert caption_hits[0].metadata == {"split": "train", "rank": 6}


def test_filters(built, tiny_encoder):
    index, _, paths = built
    query = tiny_encoder.encode_texts(["anything"])
    test_hits = index.search(query, k=50, filter={"split": "test"})[0]
    assert test_hits and all(h.metadata["split"] == "test" for h in test_hits)
    assert len(test_hits) == len([i for i in range(0, len(paths), 2) if i >= len(paths) // 2])
    assert [h.metadata["rank"] for h in index.search(query, k=5, filter={"rank": [2, 4]})[0]] in (
        [2, 4],
        [4, 2],
    )
    prefix = str(paths[0].resolve().parent / "000")
    assert {h.path for h in index.search(query, k=50, filter={"path_prefix": prefix})[0]} == {
        str(p.resolve()) for p in paths[:10]
    }
    assert index.search(query, k=5, filter={"split": "nowhere"})[0] == []
    # the filtered result is the unfiltered ranking restricted to the matching items
    everything = index.search(query, k=len(paths))[0]
    assert [h.id for h in test_hits] == [h.id for h in everything if h.metadata.get("split") == "test"]
    with pytest.raises(IndexStoreError, match="plain metadata name"):
        index.search(query, k=5, filter={"a') OR 1=1 --": 1})
    with pytest.raises(IndexStoreError):
        compile_filter({"split": {"nested": 1}})


def test_remove_and_restart_keep_data(built, tiny_encoder):
    index, _, paths = built
    query = tiny_encoder.encode_images([paths[3]])
    target = index.search(query, k=1)[0][0].id
    index.remove([target])
    assert target not in [h.id for h in index.search(query, k=len(paths))[0]]
    with pytest.raises(IndexStoreError, match="nothing was removed"):
        index.remove([target, 1])
    assert index.get(1) is not None
    index.save()
    before = index.search(tiny_encoder.encode_texts(["x"]), k=10)[0]
    folder = index.folder
    index.close()
    with Index(folder) as reopened:
        assert len(reopened) == len(paths) - 1
        assert reopened.search(tiny_encoder.encode_texts(["x"]), k=10)[0] == before


def test_crash_between_commit_and_save_is_recovered(built, tiny_encoder, tmp_path):
    """Items committed to SQLite but not yet in vectors.faiss (a kill before save) are not lost."""
    index, _, paths = built
    extra = make_images(tmp_path / "extra", 3, seed=5)
    vectors = tiny_encoder.encode_images(extra).vectors
    index.add([NewItem(str(p), {"image": v}) for p, v in zip(extra, vectors)])
    index.remove([1])
    folder = index.folder
    index.close()  # no save(): vectors.faiss still holds the old state
    with Index(folder) as reader:
        hits = reader.search(tiny_encoder.encode_images([extra[1]]), k=2)[0]
        assert hits[0].path == str(extra[1]) and hits[0].score == pytest.approx(1.0, abs=SELF_SCORE_TOLERANCE)
        assert 1 not in [h.id for h in reader.search(tiny_encoder.encode_texts(["x"]), k=100)[0]]
        assert len(reader.search(tiny_encoder.encode_texts(["x"]), k=100)[0]) == len(paths) + 3 - 1
    (folder / "vectors.faiss").write_bytes(b"corrupt")  # an unreadable file is rebuilt from SQLite
    with Index(folder) as reader:
        assert len(reader.search(tiny_encoder.encode_texts(["x"]), k=100)[0]) == len(paths) + 3 - 1


def change_log_rows(folder) -> int:
    with sqlite3.connect(folder / "metadata.sqlite") as db:
        return db.execute("SELECT COUNT(*) FROM changes").fetchone()[0]


def test_save_compacts_the_change_log_and_readers_behind_it_reload(built, tiny_encoder, tmp_path):
    index, _, paths = built
    folder = index.folder
    index.save()
    assert change_log_rows(folder) == 1  # only the newest change is kept: sequence numbers never go back
    everything = tiny_encoder.encode_texts(["x"])
    with Index(folder) as reader:
        assert len(reader.search(everything, k=100)[0]) == len(paths)  # loaded at this point of the log
        first, second = make_images(tmp_path / "a", 2, seed=7), make_images(tmp_path / "b", 2, seed=8)
        index.add(
            [NewItem(str(p), {"image": v}) for p, v in zip(first, tiny_encoder.encode_images(first).vectors)]
        )
        index.remove([2])
        index.save()  # compacts past the reader's position
        assert change_log_rows(folder) == 1
        # the writer saves again: the new vector file is on disk, its manifest entry not yet
        index.add(
            [
                NewItem(str(p), {"image": v})
                for p, v in zip(second, tiny_encoder.encode_images(second).vectors)
            ]
        )
        vector_ops.write_atomic(index._spaces["image"].index, folder / "vectors.faiss")
        hits = reader.search(everything, k=100)[0]
        ids = [hit.id for hit in hits]
        assert len(ids) == len(set(ids)) == len(paths) + 4 - 1 and 2 not in ids
        top = reader.search(tiny_encoder.encode_images([second[1]]), k=1)[0][0]
        assert top.path == str(second[1]) and top.score == pytest.approx(1.0, abs=SELF_SCORE_TOLERANCE)


def test_model_identity_is_enforced(built, tiny_encoder, other_model_dir, tiny_model_dir):
    index, _, paths = built
    other = Encoder.load(other_model_dir)
    assert other.fingerprint != tiny_encoder.fingerprint
    with pytest.raises(ModelMismatchError, match="another model"):
        index.search(other.encode_texts(["x"]), k=3)
    with pytest.raises(ModelMismatchError, match="weights differ"):
        add_paths(index, other, [str(paths[0])], options=QUIET)
    with pytest.raises(ModelMismatchError):
        Index.create(index.folder, other.identity)
    # the same weights loaded in bfloat16 are the same model
    bf16 = Encoder.load(tiny_model_dir, dtype="bf16")
    assert bf16.identity.weights_sha256 == tiny_encoder.identity.weights_sha256
    # a raw vector without the index's fingerprint is refused
    with pytest.raises(ModelMismatchError):
        index.search(QueryEmbeddings(np.ones((1, 32), np.float32), "not-a-model"), k=1)


def test_weights_fingerprint_sees_any_change():
    model = torch.nn.Linear(4, 4)
    before = weights_fingerprint(model)
    with torch.no_grad():
        model.weight[0, 0] += 0.5
    assert weights_fingerprint(model) != before


def test_second_writer_is_refused(built):
    index, _, _ = built
    with pytest.raises(IndexBusyError):
        Index(index.folder, writable=True)
    Index(index.folder).close()  # readers are always welcome


def test_captions_formats(tmp_path):
    (tmp_path / "a.csv").write_text('path,caption,split,metadata\nx.png,a cat,train,"{""k"": 1}"\n')
    (tmp_path / "a.jsonl").write_text('{"image": "y.png", "text": "a dog", "metadata": {"k": 2}}\n\n')
    csv_notes = read_captions(tmp_path / "a.csv")
    assert csv_notes[str(tmp_path / "x.png")].caption == "a cat"
    assert csv_notes[str(tmp_path / "x.png")].metadata == {"split": "train", "k": 1}
    assert read_captions(tmp_path / "a.jsonl")[str(tmp_path / "y.png")].metadata == {"k": 2}
    (tmp_path / "bad.jsonl").write_text("{nope\n")
    with pytest.raises(IndexStoreError, match="bad.jsonl, line 1: not valid JSON"):
        read_captions(tmp_path / "bad.jsonl")
    (tmp_path / "a.txt").write_text("x.png a cat\n")
    with pytest.raises(IndexStoreError, match="must be .csv"):
        read_captions(tmp_path / "a.txt")


def test_ivf_chosen_above_the_limit_with_recall_and_removal(tmp_path, tiny_encoder, monkeypatch):
    """Clustered vectors beyond exact_limit get an IVF index (memory-mappable: no HNSW) whose nprobe
    reaches the recall target."""
    rng = np.random.default_rng(0)
    dim, count = tiny_encoder.identity.embed_dim, 3000
    centres = unit_rows(rng, 30, dim)
    data = centres[rng.integers(0, 30, count)] + 0.15 * rng.standard_normal((count, dim)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    config = VectorIndexConfig(exact_limit=1000, calibration_queries=100, memory_mappable=True)
    index = Index.create(tmp_path / "ivf", tiny_encoder.identity, config)
    for start in range(0, count, 500):
        index.add([NewItem(f"/virtual/{i}.png", {"image": data[i]}) for i in range(start, start + 500)])
    index.save()
    spec = index.spec()
    assert spec.type == "ivf_flat"
    # 4 sqrt(N) lists, capped so that k-means has 40 training points per list
    assert spec.params["nlist"] == min(int(4 * np.sqrt(count)), count // 40)
    assert spec.params["calibration_recall"] >= 0.95 and spec.params["nprobe"] < spec.params["nlist"]
    assert (
        json.loads((tmp_path / "ivf" / "index.json").read_text())["spaces"]["image"]["params"] == spec.params
    )
    queries = centres[rng.integers(0, 30, 50)] + 0.15 * rng.standard_normal((50, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = np.argsort(-(queries @ data.T), axis=1)[:, :10] + 1  # item ids start at 1
    found = index.search(QueryEmbeddings(queries, tiny_encoder.fingerprint), k=10)
    recall = np.mean([len(set(e.tolist()) & {h.id for h in f}) / 10 for e, f in zip(exact, found)])
    assert recall >= 0.9
    # filters on an IVF index: small ones exactly from the stored vectors, larger ones through an id
    # selector with proportionally more lists probed
    subset = np.array([i for i in range(count) if f"/virtual/{i}.png".startswith("/virtual/1")])
    subset_truth = subset[np.argsort(-(queries[:10] @ data[subset].T), axis=1)[:, :10]] + 1
    some = QueryEmbeddings(queries[:10], tiny_encoder.fingerprint)
    small = index.search(some, k=10, filter={"path_prefix": "/virtual/1"})
    assert [[h.id for h in row] for row in small] == subset_truth.tolist()
    monkeypatch.setattr("polyclip.index.index.EXACT_FILTER_LIMIT", 100)
    large = index.search(some, k=10, filter={"path_prefix": "/virtual/1"})
    assert all(h.path.startswith("/virtual/1") for row in large for h in row)
    assert (
        np.mean([len(set(t) & {h.id for h in row}) / 10 for t, row in zip(subset_truth.tolist(), large)])
        >= 0.9
    )
    gone = [int(i) for i in exact[0][:3]]
    index.remove(gone)
    assert not set(gone) & {
        h.id for h in index.search(QueryEmbeddings(queries[:1], tiny_encoder.fingerprint), k=10)[0]
    }
    index.save()
    index.close()
    with Index(tmp_path / "ivf", writable=True) as reopened:
        assert (
            reopened.spec().type == "ivf_flat" and reopened.spec().params["nprobe"] == spec.params["nprobe"]
        )
        shrink = [i for i in range(1, count - 400) if i not in gone]  # well below the limit: back to exact
        reopened.remove(shrink)
        reopened.save()
        assert reopened.spec().type == "flat"
        left = count - len(gone) - len(shrink)
        assert len(reopened) == left < 500
        assert len(reopened.search(QueryEmbeddings(queries[:1], tiny_encoder.fingerprint), k=500)[0]) == left


def test_concurrent_adds_and_searches(tmp_path, tiny_encoder):
    """Writers and searchers in threads, plus a second (read-only) instance as another process would."""
    rng = np.random.default_rng(1)
    dim = tiny_encoder.identity.embed_dim
    data = unit_rows(rng, 400, dim)
    writer = Index.create(tmp_path / "live", tiny_encoder.identity)
    reader = None
    errors: list[BaseException] = []
    done = threading.Event()

    def add_all():
        try:
            for start in range(0, len(data), 20):
                writer.add([NewItem(f"/v/{i}", {"image": data[i]}) for i in range(start, start + 20)])
        except BaseException as error:
            errors.append(error)
        finally:
            done.set()

    def search_loop(index, seed):
        local = np.random.default_rng(seed)
        try:
            while not done.is_set():
                q = QueryEmbeddings(data[local.integers(0, len(data), 4)], tiny_encoder.fingerprint)
                for hits in index.search(q, k=5):
                    assert len({h.id for h in hits}) == len(hits)  # never a duplicate
        except BaseException as error:
            errors.append(error)

    writer.add([NewItem("/v/seed", {"image": unit_rows(rng, 1, dim)[0]})])
    reader = Index(tmp_path / "live")
    threads = [threading.Thread(target=add_all)]
    threads += [
        threading.Thread(target=search_loop, args=(idx, seed))
        for seed, idx in enumerate((writer, writer, reader, reader))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    for index in (writer, reader):
        hits = index.search(QueryEmbeddings(data, tiny_encoder.fingerprint), k=1)
        assert [h[0].path for h in hits] == [f"/v/{i}" for i in range(len(data))]
    assert len(reader) == len(data) + 1
    reader.close()
    writer.close()


def test_read_write_lock_lets_readers_share_and_writers_exclude():
    from polyclip.index.index import ReadWriteLock

    lock = ReadWriteLock()
    both_inside = threading.Barrier(2, timeout=10)
    readers_in = threading.Event()
    events: list[str] = []

    def reader(name):
        with lock.read():
            both_inside.wait()  # only passes if two readers hold the lock at once
            readers_in.set()
            time.sleep(0.05)
            events.append(f"{name} read")

    def writer():
        readers_in.wait(10)
        with lock.write():  # waits for both readers to leave
            with lock.write(), lock.read():  # the writer may re-enter and read
                events.append("write")

    threads = [threading.Thread(target=reader, args=(n,)) for n in ("a", "b")] + [
        threading.Thread(target=writer)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert sorted(events[:2]) == ["a read", "b read"] and events[2] == "write"
