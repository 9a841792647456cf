"""clip-retrieval's own client (`clip_retrieval.clip_client.ClipClient`) against a polyclip server:
text, image and embedding queries, the protocol's metadata and index list, capped counts,
deduplication, the options polyclip does not implement reported as ignored."""

# ruff: noqa: F811  (pytest fixtures imported from test_index_support are redefined as arguments)
from __future__ import annotations

import importlib.util
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import SELF_SCORE_TOLERANCE, free_port
from test_index_support import (  # noqa: F401
    build_captioned_index,
    make_images,
    tiny_encoder,
    tiny_model_dir,
    write_captions,
)

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")


def load_clip_client():
    """clip-retrieval's client module, loaded from its file: the package's __init__ imports its whole
    back end (flask, torch models ...), which a --no-deps install does not have; the client needs
    only `requests`."""
    spec = importlib.util.find_spec("clip_retrieval")
    if spec is None or not spec.submodule_search_locations:
        if os.environ.get("CI"):  # in CI the reference client must be there: a failure, not a skip
            raise ImportError("clip-retrieval is not installed (pip install --no-deps clip-retrieval)")
        pytest.skip("needs clip-retrieval (pip install --no-deps clip-retrieval)", allow_module_level=True)
    path = Path(spec.submodule_search_locations[0]) / "clip_client.py"
    module_spec = importlib.util.spec_from_file_location("clip_retrieval_client", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


clip_client = load_clip_client()

import uvicorn  # noqa: E402

from polyclip.index import Index  # noqa: E402
from polyclip.serve import ServeConfig, create_app  # noqa: E402

MAX_K = 20


@pytest.fixture(scope="module")
def collection(tmp_path_factory, tiny_encoder):
    root = tmp_path_factory.mktemp("knn")
    paths = make_images(root / "images", 10, size=(40, 32))
    shutil.copy(paths[3], root / "images" / "copy-of-0003.png")  # an exact duplicate
    paths.append(root / "images" / "copy-of-0003.png")
    build_captioned_index(root, tiny_encoder, paths, root / "images")
    return root / "index", paths


@pytest.fixture(scope="module")
def server(collection, tiny_encoder):
    """A real HTTP server (the client speaks `requests`), in a thread of this process."""
    config = ServeConfig(max_k=MAX_K, index_name="my-photos")
    app = create_app(collection[0], config, encoder=tiny_encoder)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(10)


def client(base, **options) -> clip_client.ClipClient:
    return clip_client.ClipClient(url=base + "/knn-service", indice_name="my-photos", **options)


def test_text_query_with_the_real_client(server, tiny_encoder, collection):
    results = client(server, num_images=5, deduplicate=False).query(text="picture number 4")
    assert len(results) == 5
    assert all({"id", "similarity", "url", "path"} <= set(r) for r in results)
    # every other item has a caption; an item without one has no "caption" key (clip-front reads a
    # null caption as text and fails)
    assert all(r["caption"].startswith("picture number") for r in results if "caption" in r)
    assert all(r.get("caption", 0) is not None for r in results)
    with Index(collection[0]) as index:
        expected = index.search(tiny_encoder.encode_texts(["picture number 4"]), k=5)[0]
    assert [r["id"] for r in results] == [hit.id for hit in expected]
    np.testing.assert_allclose([r["similarity"] for r in results], [h.score for h in expected], atol=1e-5)
    thumbnail = httpx.get(results[0]["url"])  # the url is a thumbnail a browser can load
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    assert not results[0]["path"].startswith("/")


def test_image_query_finds_itself(server, collection):
    _, paths = collection
    results = client(server, num_images=3, deduplicate=False).query(image=str(paths[6]))
    assert results[0]["path"] == paths[6].name
    assert results[0]["similarity"] == pytest.approx(1.0, abs=SELF_SCORE_TOLERANCE)


def test_embedding_query(server, tiny_encoder, collection):
    _, paths = collection
    vector = tiny_encoder.encode_images([paths[2]]).vectors[0]
    results = client(server, num_images=2, deduplicate=False).query(embedding_input=(3.0 * vector).tolist())
    assert results[0]["path"] == paths[2].name and results[0]["similarity"] == pytest.approx(
        1.0, abs=SELF_SCORE_TOLERANCE
    )
    wrong = client(server).query(embedding_input=[1.0, 2.0])
    assert wrong["status"] == 422 and "embedding" in wrong["error"]


def test_deduplicate_drops_the_copy(server, collection):
    """Kept results are pairwise below clip-back's threshold; each dropped one is above it to a better
    kept one; the exact copy is always dropped."""
    folder, paths = collection
    plain = client(server, num_images=11, deduplicate=False).query(image=str(paths[3]))
    kept = client(server, num_images=11, deduplicate=True).query(image=str(paths[3]))
    names = [r["path"] for r in plain]
    assert set(names[:2]) == {"0003.png", "copy-of-0003.png"}
    assert [r["path"] for r in kept][0] == names[0] and names[1] not in [r["path"] for r in kept]
    with Index(folder) as index:
        ids, vectors = index.stored_vectors([r["id"] for r in plain])
    by_id = dict(zip(ids.tolist(), vectors))
    kept_ids = [r["id"] for r in kept]
    assert kept_ids == [r["id"] for r in plain if r["id"] in kept_ids]  # order kept
    kept_vectors = np.stack([by_id[i] for i in kept_ids])
    similarity = kept_vectors @ kept_vectors.T
    assert (similarity[~np.eye(len(kept_ids), dtype=bool)] <= 0.94 + 1e-6).all()
    for position, result in enumerate(plain):
        if result["id"] not in kept_ids:
            better = [r["id"] for r in plain[:position] if r["id"] in kept_ids]
            assert max(float(by_id[i] @ by_id[result["id"]]) for i in better) > 0.94 - 1e-6


def test_counts_above_the_limit_are_capped_and_ids_beyond_num_images_are_bare(server):
    body = {"text": "a picture", "modality": "image", "num_images": 4, "num_result_ids": 3000}
    response = httpx.post(server + "/knn-service", content=__import__("json").dumps(body))  # no content type
    assert response.status_code == 200, response.text
    results = response.json()
    assert len(results) == 11  # every item (11 <= max_k = 20), not refused
    assert all("url" in r for r in results[:4]) and all(set(r) == {"id", "similarity"} for r in results[4:])
    many = httpx.post(server + "/knn-service", json={**body, "num_images": 10**6, "num_result_ids": 10**6})
    assert many.status_code == 200 and len(many.json()) == 11


def test_metadata_and_indices_list(server):
    assert httpx.get(server + "/indices-list").json() == ["my-photos"]
    results = client(server, num_images=3, deduplicate=False).query(text="a picture")
    ids = [r["id"] for r in results]
    metadata = httpx.post(
        server + "/metadata",
        content=__import__("json").dumps({"ids": [*ids, 424242], "indice_name": "my-photos"}),
        headers={"content-type": "text/plain;charset=UTF-8"},  # what the front end sends
    ).json()
    assert [m["id"] for m in metadata] == ids  # unknown ids are left out
    assert metadata[0]["metadata"]["url"] == results[0]["url"]
    assert [m["metadata"].get("caption") for m in metadata] == [r.get("caption") for r in results]
    wrong = httpx.post(server + "/metadata", json={"ids": ids, "indice_name": "laion5B"})
    assert wrong.status_code == 404 and "my-photos" in wrong.json()["error"]


def test_unimplemented_options_are_reported_not_faked(server):
    body = {
        "text": "a picture",
        "modality": "image",
        "num_images": 3,
        "indice_name": "my-photos",
        "use_safety_model": True,
        "use_violence_detector": True,
        "aesthetic_score": "9",
        "aesthetic_weight": "0.5",
    }
    response = httpx.post(server + "/knn-service", json=body)
    assert response.status_code == 200
    ignored = response.headers["x-polyclip-ignored"].split(", ")
    assert ignored == ["use_safety_model", "use_violence_detector", "aesthetic_score", "aesthetic_weight"]
    plain = httpx.post(server + "/knn-service", json={"text": "a picture", "num_images": 3})
    assert "x-polyclip-ignored" not in plain.headers
    assert [r["id"] for r in response.json()] == [r["id"] for r in plain.json()]


@pytest.mark.parametrize(
    "body,status",
    [
        ({"image_url": "http://127.0.0.1:9/x.png"}, 403),  # refused unless enabled
        ({}, 422),
        ({"text": "a", "modality": "text"}, 200),  # caption vectors exist for half the items
        ({"text": "a", "modality": "audio"}, 422),
        ({"image": "not base64!"}, 400),
        ({"text": "a", "num_images": 0}, 422),
        ({"text": "a", "num_images": True}, 422),
        ({"text": "a", "unknown": 1}, 422),
        ({"text": "a", "indice_name": "other"}, 404),
        ({"embedding_input": [float("nan")] * 32}, 422),
        ({"embedding_input": [0.0] * 32}, 422),
    ],
)
def test_bad_knn_requests_are_4xx(server, body, status):
    import json

    response = httpx.post(server + "/knn-service", content=json.dumps(body))
    assert response.status_code == status, response.text


def test_image_urls_when_enabled(collection, tiny_encoder, tmp_path):
    """--allow-image-urls: the server fetches the URL (here from a local file server) with its limits."""
    import functools
    import http.server

    _, paths = collection
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(paths[0].parent))
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    try:
        app = create_app(collection[0], ServeConfig(allow_image_urls=True), encoder=tiny_encoder)
        from fastapi.testclient import TestClient

        with TestClient(app) as test_client:
            url = f"http://127.0.0.1:{files.server_address[1]}/{paths[7].name}"
            found = test_client.post("/knn-service", json={"image_url": url, "num_images": 1})
            missing = test_client.post("/knn-service", json={"image_url": url + ".nothing"})
            scheme = test_client.post("/knn-service", json={"image_url": "file:///etc/passwd"})
    finally:
        files.shutdown()
    assert found.status_code == 200 and found.json()[0]["path"] == paths[7].name
    assert missing.status_code == 400 and scheme.status_code == 422
