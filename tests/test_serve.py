"""The HTTP service: API contract, every kind of bad input answered with a clear 4xx (never a 500),
the API key, data kept across restarts, items added while serving, concurrent requests batched."""

# ruff: noqa: F811  (pytest fixtures imported from test_index_support are redefined as arguments)
from __future__ import annotations

import asyncio
import io
import shutil
import threading

import numpy as np
import pytest
from PIL import Image

from test_index_support import (  # noqa: F401
    build_captioned_index,
    make_images,
    other_model_dir,
    tiny_encoder,
    tiny_model_dir,
    write_captions,
)

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from conftest import SELF_SCORE_TOLERANCE  # noqa: E402
from polyclip.index import Encoder, Index, ModelMismatchError, NewItem  # noqa: E402
from polyclip.serve import ServeConfig, create_app  # noqa: E402

LIMITS = ServeConfig(
    max_upload_bytes=300_000, max_image_pixels=1_000_000, max_text_chars=200, max_k=50, max_texts=4
)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, tiny_encoder):
    root = tmp_path_factory.mktemp("served")
    paths = make_images(root / "images", 12, size=(64, 48))
    build_captioned_index(root, tiny_encoder, paths, root / "images")
    return root / "index", paths


@pytest.fixture(scope="module")
def client(index_dir, tiny_encoder):
    with TestClient(create_app(index_dir[0], LIMITS, encoder=tiny_encoder)) as test_client:
        yield test_client


def png(size=(40, 30), colour=(200, 30, 30), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else 0).save(buffer, format="PNG")
    return buffer.getvalue()


def assert_error(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body["error"], str) and body["error"] and body["status"] == status


# -- contract
def test_health_and_page(client, index_dir):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["items"] == 12 and health["spaces"] == ["image", "caption"]
    assert health["index"]["image"]["type"] == "flat"
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in ('id="query"', 'id="image-input"', 'id="results"'):
        assert element in page.text


def test_text_search_contract(client, tiny_encoder):
    response = client.post("/search", json={"text": "a noisy picture", "k": 5})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 5
    assert all({"id", "score", "path", "metadata"} <= set(hit) for hit in results)
    scores = [hit["score"] for hit in results]
    assert scores == sorted(scores, reverse=True)
    with Index(client.app.state.service.index.folder) as index:
        expected = index.search(tiny_encoder.encode_texts(["a noisy picture"]), k=5)[0]
    assert [hit["id"] for hit in results] == [hit.id for hit in expected]
    filtered = client.post("/search", json={"text": "x", "k": 50, "filter": {"split": "test"}}).json()[
        "results"
    ]
    assert filtered and {hit["metadata"]["split"] for hit in filtered} == {"test"}
    captions = client.post("/search", json={"text": "picture number 4", "k": 1, "space": "caption"}).json()
    assert captions["results"][0]["caption"] == "picture number 4"


def test_unbatched_service_answers_the_same(index_dir, tiny_encoder):
    """max_batch=1: every query encoded and searched on its own, with the same answers."""
    app = create_app(index_dir[0], ServeConfig(max_batch=1), encoder=tiny_encoder)
    with TestClient(app) as one_at_a_time:
        got = one_at_a_time.post("/search", json={"text": "a noisy picture", "k": 5}).json()["results"]
        refused = one_at_a_time.post("/search", json={"text": "x", "filter": {"path_prefix": ""}})
    with Index(index_dir[0]) as index:
        expected = index.search(tiny_encoder.encode_texts(["a noisy picture"]), k=5)[0]
    assert [hit["id"] for hit in got] == [hit.id for hit in expected]
    assert_error(refused, 422)
    assert app.state.service.metrics.value("polyclip_search_batch_size_count") == 0


def test_image_search_finds_the_same_image(client, index_dir):
    _, paths = index_dir
    data = paths[5].read_bytes()
    response = client.post("/search", files={"image": ("q.png", data, "image/png")}, data={"k": "3"})
    assert response.status_code == 200, response.text
    top = response.json()["results"][0]
    # relative to the collection root (the images folder): no absolute server path leaves the service
    assert top["path"] == paths[5].name and top["score"] == pytest.approx(1.0, abs=SELF_SCORE_TOLERANCE)


def test_classify_and_embed(client, tiny_encoder):
    response = client.post(
        "/classify", files={"image": ("q.png", png(), "image/png")}, data={"labels": "red, green, blue"}
    )
    assert response.status_code == 200, response.text
    labels = response.json()["labels"]
    assert {entry["label"] for entry in labels} == {"red", "green", "blue"}
    assert sum(entry["score"] for entry in labels) == pytest.approx(1.0, abs=1e-5)
    assert [e["score"] for e in labels] == sorted((e["score"] for e in labels), reverse=True)
    repeated = client.post(
        "/classify",
        files={"image": ("q.png", png(), "image/png")},
        data={"labels": ["red", "green", "blue"], "k": "1"},
    ).json()["labels"]
    assert repeated == labels[:1]

    texts = client.post("/embed", json={"texts": ["a cat", "a dog"]}).json()
    assert texts["dim"] == 32 and len(texts["embeddings"]) == 2
    np.testing.assert_allclose(
        texts["embeddings"], tiny_encoder.encode_texts(["a cat", "a dog"]).vectors, atol=1e-5
    )
    image = client.post("/embed", files={"image": ("q.png", png(), "image/png")}).json()
    np.testing.assert_allclose(
        image["embeddings"][0], tiny_encoder.encode_images([png()]).vectors[0], atol=1e-5
    )


def test_thumbnails_of_indexed_items_only(client):
    response = client.get("/images/3")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    thumbnail = Image.open(io.BytesIO(response.content))
    assert thumbnail.format == "JPEG" and max(thumbnail.size) <= 256
    secret = "root:"
    for attempt in (
        "/images/..%2F..%2F..%2Fetc%2Fpasswd",
        "/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/images/..%252F..%252Fetc%252Fpasswd",
        "/images/%2Fetc%2Fpasswd",
        "/images/-1",
        "/images/1.5",
        "/images/0x10",
        "/images/99999999999999999999999999",
        "/images/424242",
    ):
        response = client.get(attempt)
        assert 400 <= response.status_code < 500, attempt
        assert secret not in response.text and response.headers["content-type"] == "application/json"


def test_metrics_in_prometheus_format(client):
    client.post("/search", json={"text": "metrics", "k": 2})
    text = client.get("/metrics").text
    assert "# TYPE polyclip_requests_total counter" in text
    assert 'polyclip_requests_total{method="POST",route="/search",status="200"}' in text
    assert 'polyclip_request_duration_seconds_bucket{le="+Inf",route="/search"}' in text
    assert "# TYPE polyclip_encoder_batch_size histogram" in text
    assert 'polyclip_index_vectors{space="image"} 12.0' in text


# -- bad input: a clear 4xx with a JSON message, never a 500
def bomb_png() -> bytes:
    """A 14,000 x 14,000 1-bit PNG (196 million pixels) that compresses to a few kilobytes."""
    buffer = io.BytesIO()
    Image.new("1", (14_000, 14_000), 0).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_REQUESTS = {
    "corrupt image": (
        "post",
        "/search",
        dict(files={"image": ("x.png", b"\x89PNG\r\n\x1a\nbroken", "image/png")}),
        400,
    ),
    "truncated image": ("post", "/search", dict(files={"image": ("x.png", png()[:60], "image/png")}), 400),
    "empty image": ("post", "/search", dict(files={"image": ("x.png", b"", "image/png")}), 400),
    "too many pixels": (
        "post",
        "/search",
        dict(files={"image": ("x.png", png((1200, 1000)), "image/png")}),
        413,
    ),
    "decompression bomb": ("post", "/search", dict(files={"image": ("b.png", bomb_png(), "image/png")}), 413),
    "image declared as pdf": (
        "post",
        "/search",
        dict(files={"image": ("x.pdf", png(), "application/pdf")}),
        415,
    ),
    "huge text": ("post", "/search", dict(json={"text": "word " * 1000}), 413),
    "huge body": ("post", "/search", dict(json={"text": "a", "pad": "x" * 400_000}), 413),
    "text/plain body": (
        "post",
        "/search",
        dict(content=b"cats", headers={"content-type": "text/plain"}),
        415,
    ),
    "no content type": ("post", "/search", dict(content=b"cats"), 415),
    "invalid json": (
        "post",
        "/search",
        dict(content=b"{text:", headers={"content-type": "application/json"}),
        400,
    ),
    "json array": ("post", "/search", dict(json=["text"]), 422),
    "missing text": ("post", "/search", dict(json={"k": 3}), 422),
    "text not a string": ("post", "/search", dict(json={"text": 5}), 422),
    "empty text": ("post", "/search", dict(json={"text": "   "}), 422),
    "unknown field": ("post", "/search", dict(json={"text": "a", "sql": "drop"}), 422),
    "k zero": ("post", "/search", dict(json={"text": "a", "k": 0}), 422),
    "k negative": ("post", "/search", dict(json={"text": "a", "k": -5}), 422),
    "k absurd": ("post", "/search", dict(json={"text": "a", "k": 10**12}), 422),
    "k fraction": ("post", "/search", dict(json={"text": "a", "k": 2.5}), 422),
    "k boolean": ("post", "/search", dict(json={"text": "a", "k": True}), 422),
    "k word in form": (
        "post",
        "/search",
        dict(files={"image": ("x.png", png(), "image/png")}, data={"k": "ten"}),
        422,
    ),
    "filter not object": ("post", "/search", dict(json={"text": "a", "filter": [1]}), 422),
    "filter injection": ("post", "/search", dict(json={"text": "a", "filter": {"x') OR 1=1 --": 1}}), 422),
    "filter nested value": (
        "post",
        "/search",
        dict(json={"text": "a", "filter": {"split": {"$ne": 1}}}),
        422,
    ),
    "deeply nested json": (
        "post",
        "/search",
        dict(content=b"[" * 100_000, headers={"content-type": "application/json"}),
        400,
    ),
    "filter integer overflow": ("post", "/search", dict(json={"text": "a", "filter": {"rank": 10**30}}), 422),
    "filter ids overflow": ("post", "/search", dict(json={"text": "a", "filter": {"ids": [2**70]}}), 422),
    "k with 5000 digits": (
        "post",
        "/search",
        dict(files={"image": ("x.png", png(), "image/png")}, data={"k": "9" * 5000}),
        422,
    ),
    "two image files": (
        "post",
        "/search",
        dict(files=[("image", ("a.png", png(), "image/png")), ("image", ("b.png", png(), "image/png"))]),
        400,
    ),
    "image as a text field": (
        "post",
        "/search",
        dict(data={"image": "not a file"}, files={"k": (None, "2")}),
        422,
    ),
    "bad space": ("post", "/search", dict(json={"text": "a", "space": "audio"}), 422),
    "form without image": ("post", "/search", dict(files={"k": (None, "3")}), 422),
    "classify json": ("post", "/classify", dict(json={"labels": ["a"]}), 415),
    "classify no labels": ("post", "/classify", dict(files={"image": ("x.png", png(), "image/png")}), 422),
    "classify template without slot": (
        "post",
        "/classify",
        dict(files={"image": ("x.png", png(), "image/png")}, data={"labels": "a,b", "template": "no slot"}),
        422,
    ),
    "embed too many texts": ("post", "/embed", dict(json={"texts": ["a"] * 5}), 413),
    "embed texts not list": ("post", "/embed", dict(json={"texts": "a"}), 422),
    "embed long text": ("post", "/embed", dict(json={"texts": ["a" * 201]}), 413),
    "unknown route": ("get", "/nowhere", {}, 404),
    "wrong method": ("get", "/search", {}, 405),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_input_gets_a_clear_4xx(client, name):
    method, path, kwargs, status = BAD_REQUESTS[name]
    assert_error(getattr(client, method)(path, **kwargs), status)


def test_chunked_body_over_the_limit(client):
    def chunks():
        for _ in range(40):
            yield b"x" * 10_000

    response = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert_error(response, 413)


def test_default_limits_refuse_a_real_bomb(index_dir, tiny_encoder):
    with TestClient(create_app(index_dir[0], ServeConfig(), encoder=tiny_encoder)) as default_client:
        response = default_client.post("/search", files={"image": ("b.png", bomb_png(), "image/png")})
    assert_error(response, 413)


# -- API key
def test_api_key(index_dir, tiny_encoder, monkeypatch):
    monkeypatch.setenv("POLYCLIP_API_KEY", "s3cret")
    with TestClient(create_app(index_dir[0], ServeConfig(), encoder=tiny_encoder)) as keyed:
        assert_error(keyed.post("/search", json={"text": "a"}), 401)
        assert_error(keyed.post("/search", json={"text": "a"}, headers={"X-API-Key": "wrong"}), 401)
        assert_error(keyed.get("/images/1"), 401)
        assert_error(keyed.get("/metrics"), 401)
        assert keyed.post("/search", json={"text": "a"}, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert keyed.get("/health").json()["api_key_required"] is True
        assert keyed.get("/").status_code == 200


def test_service_refuses_another_model(index_dir, other_model_dir):
    with pytest.raises(ModelMismatchError, match="weights differ"):
        create_app(index_dir[0], ServeConfig(), encoder=Encoder.load(other_model_dir))


# -- persistence and live changes
def test_restart_keeps_data_and_sees_items_added_while_serving(tmp_path, index_dir, tiny_encoder):
    folder = tmp_path / "copy"
    shutil.copytree(index_dir[0], folder)
    extra = make_images(tmp_path / "extra", 3, seed=7)
    with TestClient(create_app(folder, LIMITS, encoder=tiny_encoder)) as first:
        before = first.post("/search", json={"text": "restart", "k": 20}).json()["results"]
        # `polyclip index add` in another process: a separate writable Index on the same folder
        with Index(folder, writable=True) as writer:
            vectors = tiny_encoder.encode_images(extra).vectors
            new_ids = writer.add([NewItem(str(p), {"image": v}) for p, v in zip(extra, vectors)])
            writer.remove([before[0]["id"]])
            writer.save()
        found = first.post("/search", files={"image": ("e.png", extra[2].read_bytes(), "image/png")}).json()
        assert found["results"][0]["id"] == new_ids[2]
        during = first.post("/search", json={"text": "restart", "k": 20}).json()["results"]
        assert before[0]["id"] not in [hit["id"] for hit in during]
        assert first.get(f"/images/{new_ids[0]}").status_code == 200
    with TestClient(create_app(folder, LIMITS, encoder=tiny_encoder)) as second:
        assert second.get("/health").json()["items"] == 12 + 3 - 1
        after = second.post("/search", json={"text": "restart", "k": 20}).json()["results"]
    # the same answers; paths may be shown relative to another root (the items now span two folders)
    assert [(hit["id"], hit["score"], hit["caption"]) for hit in after] == [
        (hit["id"], hit["score"], hit["caption"]) for hit in during
    ]


# -- concurrency
def test_concurrent_requests_are_batched_and_adds_do_not_disturb_searches(tmp_path, index_dir, tiny_encoder):
    folder = tmp_path / "busy"
    shutil.copytree(index_dir[0], folder)
    config = ServeConfig(max_batch=16, max_wait_ms=50)
    app = create_app(folder, config, encoder=tiny_encoder)
    rng = np.random.default_rng(3)
    errors = []

    def add_items():
        try:
            with Index(folder, writable=True) as writer:
                for start in range(0, 40, 5):
                    vectors = rng.standard_normal((5, 32)).astype(np.float32)
                    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
                    writer.add(
                        [NewItem(f"/virtual/{start + i}.png", {"image": v}) for i, v in enumerate(vectors)]
                    )
        except BaseException as error:
            errors.append(error)

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            writer = threading.Thread(target=add_items)
            writer.start()
            texts = [f"query number {i}" for i in range(32)]
            responses = await asyncio.gather(*(http.post("/search", json={"text": t, "k": 5}) for t in texts))
            image = png((50, 50), (10, 200, 10))
            responses += await asyncio.gather(
                *(http.post("/search", files={"image": ("q.png", image, "image/png")}) for _ in range(8))
            )
            writer.join()
            # after the adds: each concurrent answer must be that query's own
            checks = [f"check {i}" for i in range(16)]
            checked = await asyncio.gather(*(http.post("/search", json={"text": t, "k": 5}) for t in checks))
            metrics = (await http.get("/metrics")).text
            final = (await http.get("/health")).json()
        await app.state.service.close()
        return responses, checks, checked, metrics, final

    responses, checks, checked, metrics, final = asyncio.run(run())
    assert not errors
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    assert final["items"] == 12 + 40
    service = app.state.service
    text_batches = service.metrics.value("polyclip_encoder_batch_size_count", input="text")
    image_batches = service.metrics.value("polyclip_encoder_batch_size_count", input="image")
    assert text_batches < 32 + 16 and image_batches < 8, (
        text_batches,
        image_batches,
    )  # shared forward passes
    assert 'polyclip_encoder_batch_size_count{input="text"}' in metrics
    assert service.metrics.value("polyclip_search_batch_size_count") < 32 + 8 + 16  # shared index scans
    with Index(folder) as index:
        for text, response in zip(checks, checked):
            expected = index.search(tiny_encoder.encode_texts([text]), k=5)[0]
            got = response.json()["results"]
            assert [hit["id"] for hit in got] == [hit.id for hit in expected]
            np.testing.assert_allclose(
                [hit["score"] for hit in got], [hit.score for hit in expected], atol=1e-4
            )


def test_batched_searches_answer_each_query_as_alone_and_a_bad_filter_fails_alone(index_dir, tiny_encoder):
    """Concurrent queries of different k, spaces and filters share index searches by group; each gets
    what a search of its own gives, and one request's bad filter is that request's 422 only."""
    app = create_app(index_dir[0], ServeConfig(max_batch=32, max_wait_ms=100), encoder=tiny_encoder)
    bodies = [{"text": f"query {i}", "k": 3 + i % 3} for i in range(12)]
    bodies += [{"text": f"captioned {i}", "k": 4, "space": "caption"} for i in range(4)]
    bodies += [{"text": f"filtered {i}", "k": 5, "filter": {"split": "train"}} for i in range(4)]
    bad = {"text": "bad filter", "k": 5, "filter": {"path_prefix": ""}}

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            responses = await asyncio.gather(*(http.post("/search", json=body) for body in [*bodies, bad]))
        await app.state.service.close()
        return responses

    *responses, refused = asyncio.run(run())
    assert_error(refused, 422)
    assert "path_prefix" in refused.json()["error"]
    service = app.state.service
    assert service.metrics.value("polyclip_search_batch_size_count") < len(bodies)  # searches were shared
    with Index(index_dir[0]) as index:
        for body, response in zip(bodies, responses):
            assert response.status_code == 200, response.text
            query = tiny_encoder.encode_texts([body["text"]])
            expected = index.search(query, body["k"], body.get("filter"), body.get("space", "image"))[0]
            got = response.json()["results"]
            assert [hit["id"] for hit in got] == [hit.id for hit in expected]
            np.testing.assert_allclose([h["score"] for h in got], [h.score for h in expected], atol=1e-4)
