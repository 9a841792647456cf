"""Settings of the search service; every limit protects the one shared model from a single request."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # loopback by default: exposing the service is an explicit choice
    port: int = 8000
    api_key: str | None = None  # when set, every route except / and /health needs header X-API-Key
    model: str | None = None  # pin: serve this model, and refuse an index built with another
    device: str | None = None
    dtype: str | None = None  # default: the dtype the index was built with
    # origins whose pages may read the answers (CORS); none by default: no CORS headers are sent
    cors_origins: tuple[str, ...] = field(default_factory=tuple)
    collection_root: str | None = None  # paths are shown relative to this (default: their common folder)
    index_name: str | None = None  # the name /indices-list gives (default: the index folder's name)
    allow_image_urls: bool = False  # /knn-service fetching `image_url` (the server makes the request)
    # limits on input
    max_upload_bytes: int = 16 * 1024 * 1024  # whole request body
    max_image_pixels: int = 40_000_000  # width x height of an uploaded image (decompression bombs)
    max_text_chars: int = 1_000  # one query, label, template or text to embed
    max_texts: int = 64  # texts per /embed request
    max_labels: int = 256  # labels per /classify request
    max_k: int = 1_000  # results per query (clip-retrieval's larger counts are capped to this)
    # dynamic batching
    max_batch: int = 32  # items per forward pass; 1 disables batching
    max_wait_ms: float = 2.0  # how long a non-full batch waits for more requests
    thumbnail_size: int = 256  # longest side of /images/{id} thumbnails
    thumbnail_cache: int = 512  # thumbnails kept in memory

    def __post_init__(self) -> None:
        if self.api_key is None:
            self.api_key = os.environ.get("POLYCLIP_API_KEY") or None
        self.cors_origins = tuple(self.cors_origins)
        for origin in self.cors_origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(
                    f"a CORS origin is '*' or a scheme and host such as http://localhost:3000, got {origin!r}"
                )
        for name in (
            "max_upload_bytes",
            "max_image_pixels",
            "max_text_chars",
            "max_texts",
            "max_labels",
            "max_k",
            "max_batch",
            "thumbnail_size",
            "thumbnail_cache",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
