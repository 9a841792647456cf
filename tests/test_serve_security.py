"""The service's trust boundaries: user templates are validated format strings, item ids are ASCII
digits, the model can be pinned, CORS is off unless asked for, no absolute server path leaves the
service, and /health tells nothing but its status to a caller without the key."""

# ruff: noqa: F811  (pytest fixtures imported from test_index_support are redefined as arguments)
from __future__ import annotations

import io
import time

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

from fastapi.testclient import TestClient  # noqa: E402

from conftest import SELF_SCORE_TOLERANCE  # noqa: E402
from polyclip.index import Index, ModelMismatchError  # noqa: E402
from polyclip.serve import ServeConfig, create_app  # noqa: E402

LIMITS = ServeConfig(max_text_chars=200, max_k=50)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, tiny_encoder):
    root = tmp_path_factory.mktemp("guarded")
    paths = make_images(root / "photos" / "holiday", 6, size=(40, 32))
    build_captioned_index(root, tiny_encoder, paths, root / "photos")
    return root / "index", paths


@pytest.fixture(scope="module")
def client(index_dir, tiny_encoder):
    with TestClient(create_app(index_dir[0], LIMITS, encoder=tiny_encoder)) as test_client:
        yield test_client


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (30, 30), (10, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def classify(client, template, labels="cat,dog"):
    return client.post(
        "/classify",
        files={"image": ("q.png", png(), "image/png")},
        data={"labels": labels, "template": template},
    )


@pytest.mark.parametrize(
    "template,status",
    [
        ("{{}}{:>100000000}", 422),  # a format spec padding every prompt to 100 MB
        ("{:>10}", 422),
        ("{} and {}", 422),
        ("{x}", 422),
        ("{0}", 422),
        ("{!r}", 422),
        ("{.__class__}", 422),
        ("{[0]}", 422),
        ("a {", 422),
        ("a } b {}", 422),
        ("no slot", 422),
        ("{{}}", 422),  # literal braces only: no field at all
        ("x" * 197 + " {}", 413),  # prompts longer than the text limit
    ],
)
def test_templates_are_validated_format_strings(client, template, status):
    started = time.perf_counter()
    response = classify(client, template)
    assert response.status_code == status, response.text
    assert response.json()["error"]
    assert time.perf_counter() - started < 5


def test_valid_templates_and_literal_braces(client):
    response = classify(client, "{{a photo}} of a {}.")
    assert response.status_code == 200, response.text
    assert response.json()["templates"] == ["{{a photo}} of a {}."]
    assert classify(client, "openai_imagenet").status_code == 200  # a built-in set by name


@pytest.mark.parametrize("item_id", ["²", "١", "１", "٣", "1²", "+1", " 1", "1_0"])
def test_item_ids_are_ascii_digits_only(client, item_id):
    response = client.get(f"/images/{item_id}")
    assert response.status_code == 404, (item_id, response.status_code)
    assert response.headers["content-type"] == "application/json"


def test_paths_are_relative_to_the_collection_root(client, index_dir):
    _, paths = index_dir
    results = client.post("/search", json={"text": "a picture", "k": 6}).json()["results"]
    assert sorted(hit["path"] for hit in results) == sorted(p.name for p in paths)
    items = client.get("/items", params={"limit": 3}).json()
    assert items["total"] == 6 and len(items["items"]) == 3
    assert all(not item["path"].startswith("/") for item in items["items"])


def test_an_explicit_root_keeps_subfolders(index_dir, tiny_encoder):
    folder, paths = index_dir
    config = ServeConfig(collection_root=str(paths[0].parents[1]))
    with TestClient(create_app(folder, config, encoder=tiny_encoder)) as rooted:
        hit = rooted.post("/search", json={"text": "x", "k": 1}).json()["results"][0]
    assert hit["path"].startswith("holiday/")


def test_more_like_this_and_embed_takes_text_too(client, tiny_encoder):
    first = client.post("/search", json={"text": "a picture", "k": 1}).json()["results"][0]
    like = client.post("/search", json={"like": first["id"], "k": 2}).json()
    assert like["query"] == "item" and like["results"][0]["id"] == first["id"]
    assert like["results"][0]["score"] == pytest.approx(1.0, abs=SELF_SCORE_TOLERANCE)
    assert client.post("/search", json={"like": 999_999}).status_code == 404
    assert client.post("/search", json={"like": 1, "text": "both"}).status_code == 422
    one = client.post("/embed", json={"text": "a cat"}).json()
    many = client.post("/embed", json={"texts": ["a cat"]}).json()
    assert one["embeddings"] == many["embeddings"]
    assert client.post("/embed", json={"text": "a", "texts": ["b"]}).status_code == 422


def test_health_is_minimal_without_the_key(index_dir, tiny_encoder):
    with TestClient(create_app(index_dir[0], ServeConfig(api_key="s3cret"), encoder=tiny_encoder)) as keyed:
        anonymous = keyed.get("/health").json()
        full = keyed.get("/health", headers={"X-API-Key": "s3cret"}).json()
    assert anonymous == {"status": "ok", "api_key_required": True}
    assert full["items"] == 6 and full["model"]["fingerprint"] == tiny_encoder.fingerprint


def test_health_fingerprint_is_the_index_info_one(client, index_dir):
    with Index(index_dir[0]) as index:
        described = index.describe()["model"]["fingerprint"]
    assert client.get("/health").json()["model"]["fingerprint"] == described


def test_no_cors_headers_by_default(client):
    response = client.post("/search", json={"text": "a"}, headers={"Origin": "http://evil.example"})
    assert response.status_code == 200
    assert not any(name.lower().startswith("access-control-") for name in response.headers)
    preflight = client.options(
        "/search",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_origin_option(index_dir, tiny_encoder):
    config = ServeConfig(cors_origins=("http://localhost:3000",), api_key="k")
    with TestClient(create_app(index_dir[0], config, encoder=tiny_encoder)) as cors:
        allowed = cors.post(
            "/search", json={"text": "a"}, headers={"Origin": "http://localhost:3000", "X-API-Key": "k"}
        )
        other = cors.post(
            "/search", json={"text": "a"}, headers={"Origin": "http://evil.example", "X-API-Key": "k"}
        )
        preflight = cors.options(
            "/search",
            headers={
                "Origin": "http://localhost:3000",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type,x-api-key",
            },
        )
    assert (
        allowed.status_code == 200
        and allowed.headers["access-control-allow-origin"] == "http://localhost:3000"
    )
    assert "access-control-allow-origin" not in other.headers
    assert preflight.status_code == 200  # answered before the key check
    assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
    with pytest.raises(ValueError, match="CORS origin"):
        ServeConfig(cors_origins=("localhost:3000",))


def test_pinned_model_refuses_an_index_of_another(index_dir, tiny_model_dir, other_model_dir):
    with pytest.raises(ModelMismatchError, match="pinned"):
        create_app(index_dir[0], ServeConfig(model=str(other_model_dir)))
    app = create_app(index_dir[0], ServeConfig(model=str(tiny_model_dir)))
    assert app.state.service.encoder.identity.source == str(tiny_model_dir.resolve())


def test_openapi_documents_the_real_limits(client):
    schema = client.get("/openapi.json").json()
    search = schema["paths"]["/search"]["post"]["requestBody"]["content"]
    properties = search["application/json"]["schema"]["properties"]
    assert properties["k"]["maximum"] == 50
    text = properties["text"]["anyOf"][0]
    assert text["maxLength"] == 200
    assert search["application/json"]["schema"]["additionalProperties"] is False
    assert "image" in search["multipart/form-data"]["schema"]["properties"]
    assert "/knn-service" in schema["paths"]


def test_serve_command_refuses_a_pinned_mismatch(index_dir, other_model_dir):
    """`polyclip serve INDEX --model OTHER` stops before listening, with the one-line user error."""
    from typer.testing import CliRunner

    from polyclip.cli import app

    result = CliRunner().invoke(
        app, ["serve", str(index_dir[0]), "--model", str(other_model_dir), "--port", "0"]
    )
    assert isinstance(result.exception, ModelMismatchError) and "pinned" in str(result.exception)
