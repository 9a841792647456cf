"""The search service: a FastAPI app over one index and its model, loaded once and shared.

Routes:
  GET  /                 the web page (sample of the collection, search by text or image, more like this)
  POST /search           JSON {"text" | "like", "k", "filter", "space"} or multipart {image, k, filter, space}
                         -> {"results": [{"id", "score", "path", "caption", "metadata"}]}
  POST /classify         multipart {image, labels (repeated, or comma separated), template, k}
  POST /embed            JSON {"texts": [...]} or {"text": "..."}, or multipart {image} -> {"embeddings"}
  GET  /items            a page of indexed items (the page's sample before any search)
  GET  /images/{id}      JPEG thumbnail of an indexed item (looked up by id: never a path from the request)
  GET  /health, /metrics liveness (minimal without the key when one is set) and Prometheus metrics
  POST /knn-service, POST /metadata, GET /indices-list   clip-retrieval's back-end protocol (`knn`)

Paths in answers are relative to the collection root. The request models (limits included) are in
`inputs`; the shared state behind the routes (model, index, batchers, caches, metrics) is `service`.
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
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from polyclip.index import Encoder, Index, IndexStoreError, ModelMismatchError
from polyclip.serve import knn
from polyclip.serve.config import ServeConfig
from polyclip.serve.inputs import (
    MAX_PROMPTS,
    ApiError,
    content_kind,
    form_values,
    parse_filter,
    parse_item_id,
    read_form,
    read_json,
    read_upload,
    request_models,
    resolve_service_templates,
    split_labels,
    validate,
)
from polyclip.serve.metrics import CONTENT_TYPE
from polyclip.serve.service import SearchService

logger = logging.getLogger("polyclip.serve")

OPEN_PATHS = ("/", "/health")  # reachable without the API key (the page asks for the key itself)


def key_matches(given: str | None, config: ServeConfig) -> bool:
    return bool(config.api_key) and hmac.compare_digest((given or "").encode(), config.api_key.encode())


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
                if not key_matches(headers.get("x-api-key"), config):
                    await _send_error(
                        scope, send_with_status, 401, "missing or wrong API key (header X-API-Key)"
                    )
                    return
            length = headers.get("content-length")
            if length is not None and (
                not length.isascii() or not length.isdigit() or int(length) > config.max_upload_bytes
            ):
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
            metrics.requests.labels(
                route=name, method=scope["method"], status=str(status_holder["status"])
            ).inc()
            metrics.latency.labels(route=name).observe(time.perf_counter() - started)


async def _send_error(scope, send, status: int, message: str) -> None:
    await _error(status, message)(scope, None, send)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


def _page() -> str:
    return resources.files("polyclip.serve").joinpath("static/index.html").read_text(encoding="utf-8")


def load_encoder(index: Index, config: ServeConfig) -> Encoder:
    """The index's own model, or the pinned ``config.model``: then index.json's model is never loaded
    and an index built with another model is refused."""
    identity = index.identity
    encoder = Encoder.load(
        config.model or identity.source, device=config.device, dtype=config.dtype or identity.dtype
    )
    if config.model is not None and encoder.fingerprint != identity.fingerprint:
        raise ModelMismatchError(
            f"the service is pinned to {config.model!r}, but {index.folder} was built with {identity.source!r} "
            f"({'; '.join(identity.differences(encoder.identity))}); serve an index built with the pinned model"
        )
    return encoder


def create_app(
    index: Index | str | Path,
    config: ServeConfig | None = None,
    encoder: Encoder | None = None,
) -> FastAPI:
    """The app for an index folder (or an open `Index`); the model comes from the index unless pinned
    with ``config.model`` or given as ``encoder``. The index folder is trusted input: see docs/security.md."""
    config = config or ServeConfig()
    if not isinstance(index, Index):
        index = Index(index)
    if encoder is None:
        encoder = load_encoder(index, config)
    service = SearchService(index, encoder, config)
    models = request_models(config)
    page = _page()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await service.close()

    app = FastAPI(title="polyclip search", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.service = service
    app.add_middleware(GuardMiddleware, service=service)
    if config.cors_origins:  # outermost: preflights are answered before the key check
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "X-API-Key"],
            max_age=600,
        )

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
    async def health(request: Request):
        """Liveness. With an API key set, only a caller holding the key sees more than the status."""
        if config.api_key and not key_matches(request.headers.get("x-api-key"), config):
            return {"status": "ok", "api_key_required": True}
        identity = index.identity
        return {
            "status": "ok",
            "items": len(index),
            "spaces": index.spaces,
            "name": service.name,
            "model": {
                "source": identity.source,
                "fingerprint": identity.fingerprint,
                "dtype": identity.dtype,
            },
            "index": {space: index.spec(space).to_dict() for space in index.spaces},
            "api_key_required": bool(config.api_key),
            "limits": {"max_k": config.max_k, "max_text_chars": config.max_text_chars},
            "uptime_seconds": round(time.time() - service.started, 1),
        }

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/search", openapi_extra=models.openapi(models.search_json, models.search_form))
    async def search(request: Request):
        """Text query (JSON 'text'), an indexed item's neighbours (JSON 'like': its id), or an image
        (multipart 'image')."""
        started = time.perf_counter()
        if content_kind(request) == "json":
            body = validate(models.search_json, await read_json(request))
            k, filter, space = body.k, parse_filter(body.filter), body.space
            if body.like is not None:
                vector, kind = service.item_vector(body.like, space), "item"
            else:
                vector, kind = (await service.text_vectors([body.text]))[0], "text"
        else:
            form = await read_form(request, config)
            fields = validate(models.search_form, form_values(form, files=frozenset({"image"})))
            data = await read_upload(form, config)
            k, filter, space = fields.k, parse_filter(fields.filter), fields.space
            vector, kind = await service.image_vector(data), "image"
        hits = await service.search(vector, k, filter, space)
        return {
            "results": [service.hit_dict(hit) for hit in hits],
            "query": kind,
            "space": space,
            "took_ms": round((time.perf_counter() - started) * 1000, 2),
        }

    @app.post("/classify", openapi_extra=models.openapi(None, models.classify_form))
    async def classify(request: Request):
        if content_kind(request) != "multipart":
            raise ApiError(415, "/classify takes multipart/form-data with an 'image' file and 'labels'")
        form = await read_form(request, config)
        fields = validate(
            models.classify_form,
            form_values(form, lists=frozenset({"labels", "template"}), files=frozenset({"image"})),
        )
        labels = split_labels(fields.labels, config)
        templates = resolve_service_templates(fields.template, labels, config)
        if len(labels) * len(templates) > MAX_PROMPTS:
            raise ApiError(
                413, f"{len(labels)} labels x {len(templates)} templates; the limit is {MAX_PROMPTS} prompts"
            )
        data = await read_upload(form, config)
        k = min(fields.k or len(labels), len(labels))
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

    @app.post("/embed", openapi_extra=models.openapi(models.embed_json, models.image_form))
    async def embed(request: Request):
        """Embeddings of texts ('texts', a list, or 'text', one, as /search takes it) or of an image."""
        if content_kind(request) == "json":
            body = validate(models.embed_json, await read_json(request))
            if (body.texts is None) == (body.text is None):
                raise ApiError(
                    422, "JSON embed needs 'texts' (a non-empty list of strings) or 'text', not both"
                )
            vectors, kind = await service.text_vectors(body.texts or [body.text]), "text"
        else:
            form = await read_form(request, config)
            validate(models.image_form, form_values(form, files=frozenset({"image"})))
            vectors, kind = (await service.image_vector(await read_upload(form, config)))[None], "image"
        return {
            "embeddings": vectors.tolist(),
            "dim": int(vectors.shape[1]),
            "input": kind,
            "model": encoder.fingerprint,
        }

    @app.get("/items")
    async def items(limit: int = Query(24, ge=1, le=config.max_k), offset: int = Query(0, ge=0, le=2**62)):
        """Indexed items in id order, a page at a time (the page shows a sample before any search)."""
        records = await run_in_threadpool(index.store.list_items, limit, offset)
        return {
            "items": [
                {"id": r.id, "path": service.shown_path(r.path), "caption": r.caption, "metadata": r.metadata}
                for r in records
            ],
            "total": len(index),
            "offset": offset,
        }

    @app.get("/images/{item_id}")
    async def image(item_id: str):
        number = parse_item_id(item_id)
        path = index.store.path_of(number)
        if path is None:
            raise ApiError(404, f"no indexed item with id {number}")
        data = await run_in_threadpool(service.thumbnail, number, path)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    knn.add_routes(app, service, models)
    return app
