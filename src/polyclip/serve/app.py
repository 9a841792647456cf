"""The search service: a FastAPI app over one index and its model, loaded once and shared.

Routes:
  GET  /                 the web page (search box, image upload, grid of results)
  POST /search           JSON {"text", "k", "filter", "space"} or multipart {image, k, filter, space}
                         -> {"results": [{"id", "score", "path", "caption", "metadata"}]}
  POST /classify         multipart {image, labels (repeated, or comma separated), template, k}
  POST /embed            JSON {"texts": [...]} or multipart {image} -> {"embeddings": [[...]]}
  GET  /images/{id}      JPEG thumbnail of an indexed item (looked up by id: never a path from the request)
  GET  /health, /metrics liveness and Prometheus metrics

The shared state behind the routes (model, index, batchers, caches, metrics) is `service.SearchService`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from polyclip.index import Encoder, Index, IndexStoreError
from polyclip.serve.config import ServeConfig
from polyclip.serve.inputs import (
    ApiError,
    check_text,
    content_kind,
    form_field,
    parse_filter,
    parse_k,
    parse_space,
    read_form,
    read_json,
    read_upload,
    reject_unknown,
)
from polyclip.serve.service import SearchService
from polyclip.zero_shot import resolve_templates

logger = logging.getLogger("polyclip.serve")

OPEN_PATHS = ("/", "/health")  # reachable without the API key (the page asks for the key itself)
MAX_TEMPLATES = 16
MAX_PROMPTS = 1024  # labels x templates encoded for one classifier


class GuardMiddleware:
    """API key, request-size limit and metrics, as one pure ASGI middleware.

    The body limit is checked against Content-Length first and, for bodies without one (chunked),
    counted while the body is received.
    """

    def __init__(self, app, service: SearchService) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        config, metrics = self.service.config, self.service.metrics
        started = time.perf_counter()
        status_holder = {"status": 500}

        async def send_with_status(message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        try:
            headers = {
                key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]
            }
            if config.api_key and scope["path"] not in OPEN_PATHS:
                given = headers.get("x-api-key", "")
                if not hmac.compare_digest(given.encode(), config.api_key.encode()):
                    await _send_error(
                        scope, send_with_status, 401, "missing or wrong API key (header X-API-Key)"
                    )
                    return
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > config.max_upload_bytes):
                await _send_error(
                    scope,
                    send_with_status,
                    413,
                    f"the request body is larger than the limit of {config.max_upload_bytes:,} bytes",
                )
                return
            received = 0

            async def limited_receive():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > config.max_upload_bytes:
                        raise ApiError(
                            413,
                            f"the request body is larger than the limit of {config.max_upload_bytes:,} bytes",
                        )
                return message

            await self.app(scope, limited_receive, send_with_status)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or "unmatched"
            metrics.requests.inc(route=name, method=scope["method"], status=str(status_holder["status"]))
            metrics.latency.observe(time.perf_counter() - started, route=name)


async def _send_error(scope, send, status: int, message: str) -> None:
    await _error(status, message)(scope, None, send)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


def _page() -> str:
    return resources.files("polyclip.serve").joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(
    index: Index | str | Path,
    config: ServeConfig | None = None,
    encoder: Encoder | None = None,
) -> FastAPI:
    """The app for an index folder (or an open `Index`); the model comes from the index unless given."""
    config = config or ServeConfig()
    if not isinstance(index, Index):
        index = Index(index)
    if encoder is None:
        identity = index.identity
        encoder = Encoder.load(identity.source, device=config.device, dtype=config.dtype or identity.dtype)
    service = SearchService(index, encoder, config)
    page = _page()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await service.close()

    app = FastAPI(title="polyclip search", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.service = service
    app.add_middleware(GuardMiddleware, service=service)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return _error(error.status, error.message)

    @app.exception_handler(IndexStoreError)
    async def index_error(request: Request, error: IndexStoreError):
        return _error(422, str(error))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return _error(error.status_code, str(error.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        parts = [f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in error.errors()]
        return _error(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception):
        logger.exception("unexpected error on %s", request.url.path)
        return _error(500, "internal error; the server log has the details")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def home():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        identity = index.identity
        return {
            "status": "ok",
            "items": len(index),
            "spaces": index.spaces,
            "model": {
                "source": identity.source,
                "fingerprint": identity.fingerprint,
                "dtype": identity.dtype,
            },
            "index": {space: index.spec(space).to_dict() for space in index.spaces},
            "api_key_required": bool(config.api_key),
            "uptime_seconds": round(time.time() - service.started, 1),
        }

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/search")
    async def search(request: Request):
        started = time.perf_counter()
        if content_kind(request) == "json":
            data = await read_json(request)
            reject_unknown(data, {"text", "k", "filter", "space"})
            if "text" not in data:
                raise ApiError(
                    422, "JSON search needs 'text' (or send a multipart form with an 'image' file)"
                )
            text = check_text(data["text"], config, "text")
            k, filter, space = (
                parse_k(data.get("k"), config),
                parse_filter(data.get("filter")),
                parse_space(data.get("space")),
            )
            vector, kind = (await service.text_vectors([text]))[0], "text"
        else:
            form = await read_form(request, config)
            reject_unknown(dict(form), {"image", "k", "filter", "space"})
            data = await read_upload(form, config)
            k = parse_k(form_field(form, "k"), config)
            filter, space = parse_filter(form_field(form, "filter")), parse_space(form_field(form, "space"))
            vector, kind = await service.image_vector(data), "image"
        hits = await service.search(vector, k, filter, space)
        return {
            "results": [hit.to_dict() for hit in hits],
            "query": kind,
            "space": space,
            "took_ms": round((time.perf_counter() - started) * 1000, 2),
        }

    @app.post("/classify")
    async def classify(request: Request):
        if content_kind(request) != "multipart":
            raise ApiError(415, "/classify takes multipart/form-data with an 'image' file and 'labels'")
        form = await read_form(request, config)
        reject_unknown(dict(form), {"image", "labels", "template", "k"})
        data = await read_upload(form, config)
        labels = _labels(form.getlist("labels"), config)
        templates = _templates(form.getlist("template"), config)
        if len(labels) * len(templates) > MAX_PROMPTS:
            raise ApiError(
                413, f"{len(labels)} labels x {len(templates)} templates; the limit is {MAX_PROMPTS} prompts"
            )
        k = parse_k(form_field(form, "k"), config, default=len(labels))
        weights, image_vector = await asyncio.gather(
            service.class_weights(tuple(labels), tuple(templates)), service.image_vector(data)
        )
        logits = service.logit_scale * (weights @ image_vector)  # (C,)
        if service.logit_bias is not None:
            probabilities, kind = 1.0 / (1.0 + np.exp(-(logits + service.logit_bias))), "sigmoid"
        else:
            shifted = np.exp(logits - logits.max())
            probabilities, kind = shifted / shifted.sum(), "softmax"
        order = np.argsort(-probabilities, kind="stable")[:k]
        return {
            "labels": [{"label": labels[i], "score": float(probabilities[i])} for i in order],
            "probabilities": kind,
            "templates": templates,
        }

    @app.post("/embed")
    async def embed(request: Request):
        if content_kind(request) == "json":
            data = await read_json(request)
            reject_unknown(data, {"texts"})
            texts = data.get("texts")
            if not isinstance(texts, list) or not texts:
                raise ApiError(422, "JSON embed needs 'texts': a non-empty list of strings")
            if len(texts) > config.max_texts:
                raise ApiError(413, f"{len(texts)} texts; the limit per request is {config.max_texts}")
            texts = [check_text(text, config, f"texts[{i}]") for i, text in enumerate(texts)]
            vectors, kind = await service.text_vectors(texts), "text"
        else:
            form = await read_form(request, config)
            reject_unknown(dict(form), {"image"})
            vectors, kind = (await service.image_vector(await read_upload(form, config)))[None], "image"
        return {
            "embeddings": vectors.tolist(),
            "dim": int(vectors.shape[1]),
            "input": kind,
            "model": encoder.fingerprint,
        }

    @app.get("/images/{item_id}")
    async def image(item_id: str):
        if not item_id.isdigit() or len(item_id) > 18:
            raise ApiError(404, "no indexed item with that id (ids are positive integers)")
        path = index.store.path_of(int(item_id))
        if path is None:
            raise ApiError(404, f"no indexed item with id {int(item_id)}")
        data = await run_in_threadpool(service.thumbnail, int(item_id), path)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    return app


def _labels(values: list, config: ServeConfig) -> list[str]:
    labels: list[str] = []
    for value in values:
        if not isinstance(value, str):
            raise ApiError(422, "labels must be text fields, not files")
        parts = value.split(",") if len(values) == 1 else [value]  # one field may hold "cat, dog, bird"
        labels += [part.strip() for part in parts if part.strip()]
    if not labels:
        raise ApiError(
            422, "classify needs at least one label ('labels' form field, repeated or comma separated)"
        )
    if len(labels) > config.max_labels:
        raise ApiError(413, f"{len(labels)} labels; the limit is {config.max_labels}")
    if len(set(labels)) != len(labels):
        raise ApiError(422, "labels must be distinct")
    return [check_text(label, config, "a label") for label in labels]


def _templates(values: list, config: ServeConfig) -> list[str]:
    if not values:
        return resolve_templates(None)
    if len(values) > MAX_TEMPLATES:
        raise ApiError(413, f"{len(values)} templates; the limit is {MAX_TEMPLATES}")
    texts = [check_text(value, config, "a template") for value in values]
    try:
        return resolve_templates(texts)
    except ValueError as error:
        raise ApiError(422, str(error)) from None
