"""clip-retrieval's back-end protocol on the polyclip service, for its `ClipClient` and its front end.

The protocol is that of ``clip_retrieval/clip_back.py`` (KnnService, MetadataService, IndicesList):

  POST /knn-service  {"text" | "image" (base64) | "image_url" | "embedding_input", "modality",
                      "num_images", "num_result_ids", "indice_name", "deduplicate", ...}
                     -> [{"id", "similarity", "url", "caption", "path", ...metadata}, ...]
                     the first ``num_images`` entries carry metadata, the rest (up to
                     ``num_result_ids``) only id and similarity, as clip-back answers
  POST /metadata     {"ids": [...], "indice_name"} -> [{"id", "metadata": {...}}, ...]
  GET  /indices-list -> ["<index name>"]

Bodies are JSON whatever the declared content type (the client sends none, the front end
``text/plain``). ``url`` is the item's thumbnail on this service. Counts above the service's ``max_k``
are capped, not refused (the front end asks for 3,000 ids). ``deduplicate`` drops results whose stored
vectors are nearly equal (cosine > 0.94, clip-back's threshold) to a better one. The safety,
violence, aesthetic and multilingual options are accepted but not implemented: the reply header
``X-Polyclip-Ignored`` names those a request asked for.
"""

from __future__ import annotations

import urllib.request
from urllib.parse import urlsplit

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from polyclip.serve.inputs import ApiError, RequestModels, decode_base64_image, read_json, validate
from polyclip.serve.service import SearchService

DUPLICATE_COSINE = 0.94  # clip-back's `get_non_uniques` threshold
IMAGE_URL_TIMEOUT_S = 10.0


def add_routes(app: FastAPI, service: SearchService, models: RequestModels) -> None:
    config, index = service.config, service.index

    def check_index_name(name: str | None) -> None:
        if name not in (None, "", service.name):
            raise ApiError(404, f"unknown index {name!r}; this service has {[service.name]}")

    def public(metadata: dict, caption: str | None, path: str, url: str) -> dict:
        """An item's metadata as clip-retrieval shows it; its own fields go over metadata keys. An item
        without a caption has no "caption" key (clip-front takes a null caption for text and fails)."""
        entry = {**metadata, "url": url, "path": service.shown_path(path)}
        entry.pop("caption", None)
        if caption is not None:
            entry["caption"] = caption
        return entry

    def image_url(request: Request, item_id: int) -> str:
        return f"{request.base_url}images/{item_id}"

    @app.get("/indices-list")
    async def indices_list():
        return [service.name]

    @app.post("/knn-service", openapi_extra=models.openapi(models.knn, None))
    async def knn_service(request: Request):
        body = validate(models.knn, await read_json(request))
        check_index_name(body.indice_name)
        space = "image" if body.modality == "image" else "caption"
        if space not in index.spaces:
            raise ApiError(422, f"modality {body.modality!r}: this index has no {space} vectors")
        vector = await query_vector(body)
        num_images = min(body.num_images, config.max_k)
        num_ids = min(body.num_result_ids or body.num_images, config.max_k)
        hits = await service.search(vector, max(num_ids, 1), None, space)
        if body.deduplicate and len(hits) > 1:
            hits = await run_in_threadpool(drop_near_duplicates, service, hits, space)
        results = []
        for position, hit in enumerate(hits):
            entry = {"id": hit.id, "similarity": hit.score}
            if position < num_images:
                url = image_url(request, hit.id)
                entry = {**public(hit.metadata, hit.caption, hit.path, url), **entry}
            results.append(entry)
        ignored = [
            name for name in ("use_mclip", "use_safety_model", "use_violence_detector") if getattr(body, name)
        ]
        if body.aesthetic_score not in (None, ""):
            ignored += ["aesthetic_score", "aesthetic_weight"]
        headers = {"X-Polyclip-Ignored": ", ".join(ignored)} if ignored else None
        return JSONResponse(results, headers=headers)

    async def query_vector(body) -> np.ndarray:
        """(E,) unit vector of the request's query, in clip-back's order: text, image, URL, embedding."""
        if body.text:  # the front end sends "" for the text of an image search
            if not body.text.strip():
                raise ApiError(422, "text is empty")
            return (await service.text_vectors([body.text]))[0]
        if body.image:
            return await service.image_vector(decode_base64_image(body.image))
        if body.image_url:
            if not config.allow_image_urls:
                raise ApiError(
                    403,
                    "this service does not fetch image URLs (start it with --allow-image-urls); send 'image'",
                )
            return await service.image_vector(
                await run_in_threadpool(fetch_image, body.image_url, config.max_upload_bytes)
            )
        if body.embedding_input is not None:
            vector = np.asarray(body.embedding_input, np.float32)
            if vector.shape != (index.identity.embed_dim,):
                raise ApiError(
                    422,
                    f"embedding_input has {vector.size} values; this index's embeddings have {index.identity.embed_dim}",
                )
            norm = float(np.linalg.norm(vector))
            if not np.isfinite(norm) or norm == 0.0:
                raise ApiError(422, "embedding_input must be a finite, non-zero vector")
            return vector / norm
        raise ApiError(422, "knn-service needs one of 'text', 'image', 'image_url' or 'embedding_input'")

    @app.post("/metadata", openapi_extra=models.openapi(models.metadata, None))
    async def metadata(request: Request):
        body = validate(models.metadata, await read_json(request))
        check_index_name(body.indice_name)
        ids = [item_id for item_id in body.ids if item_id < 2**63]
        records = await run_in_threadpool(index.store.get_items, ids)
        return [
            {"id": item_id, "metadata": public(r.metadata, r.caption, r.path, image_url(request, item_id))}
            for item_id, r in ((item_id, records.get(item_id)) for item_id in body.ids)
            if r is not None
        ]


def drop_near_duplicates(service: SearchService, hits: list, space: str) -> list:
    """Hits in order, without those whose stored vector is within `DUPLICATE_COSINE` of a kept one."""
    ids, vectors = service.index.stored_vectors([hit.id for hit in hits], space)
    by_id = {int(item_id): vector for item_id, vector in zip(ids, vectors)}
    kept, kept_vectors = [], []
    for hit in hits:
        vector = by_id.get(hit.id)
        if vector is None:
            continue
        if kept_vectors and float(np.max(np.stack(kept_vectors) @ vector)) > DUPLICATE_COSINE:
            continue
        kept.append(hit)
        kept_vectors.append(vector)
    return kept


def fetch_image(url: str, limit: int) -> bytes:
    """An http(s) URL's body, at most ``limit`` bytes, within `IMAGE_URL_TIMEOUT_S`."""
    if urlsplit(url).scheme not in ("http", "https"):
        raise ApiError(422, "image_url must be an http or https URL")
    try:
        with urllib.request.urlopen(url, timeout=IMAGE_URL_TIMEOUT_S) as response:  # noqa: S310 (scheme checked)
            data = response.read(limit + 1)
    except Exception as error:
        raise ApiError(400, f"cannot fetch image_url: {type(error).__name__}: {error}") from None
    if len(data) > limit:
        raise ApiError(413, f"the image at image_url is larger than the limit of {limit:,} bytes")
    if not data:
        raise ApiError(400, "the image at image_url is empty")
    return data
