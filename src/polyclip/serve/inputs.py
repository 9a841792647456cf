"""Request parsing with limits: every mistake in a request becomes a 4xx with a readable message.

413: body, image or text too large; 415: a content type the route does not take; 400: a body or
image that cannot be read; 422: a value of the wrong type or out of range; 404: an unknown item.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from typing import Any

import torch
from PIL import Image
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request

from polyclip.images import ImageDecodeError
from polyclip.serve.config import ServeConfig


class ApiError(Exception):
    """An error answered as ``{"error": message, "status": status}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def content_kind(request: Request) -> str:
    """``"json"`` or ``"multipart"``; anything else is a 415."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        return "json"
    if content_type == "multipart/form-data":
        return "multipart"
    raise ApiError(
        415,
        f"unsupported content type {content_type or '(none)'!r}: send application/json, "
        "or multipart/form-data with an 'image' file",
    )


async def read_json(request: Request) -> dict[str, Any]:
    body = await request.body()
    try:
        data = json.loads(body)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise ApiError(400, f"the body is not valid JSON: {error}") from None
    except RecursionError:
        raise ApiError(400, "the JSON body is nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(422, f"the JSON body must be an object, got {type(data).__name__}")
    return data


async def read_form(request: Request, config: ServeConfig) -> FormData:
    try:
        return await request.form(max_files=1, max_fields=config.max_labels + 16, max_part_size=1024 * 1024)
    except ApiError:
        raise
    except Exception as error:  # starlette raises MultiPartException / HTTPException for malformed bodies
        if getattr(error, "status_code", None) == 413:
            raise
        raise ApiError(
            400, f"cannot read the multipart form: {getattr(error, 'detail', None) or error}"
        ) from None


def reject_unknown(data: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ApiError(
            422, f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(allowed))}"
        )


def parse_k(value: Any, config: ServeConfig, default: int = 10) -> int:
    if value is None or value == "":
        return default
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ApiError(422, f"k must be an integer, got {value!r}") from None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(422, f"k must be an integer, got {value!r}")
    if not 1 <= value <= config.max_k:
        raise ApiError(422, f"k must be between 1 and {config.max_k}, got {value}")
    return value


def check_text(value: Any, config: ServeConfig, what: str = "text") -> str:
    if not isinstance(value, str):
        raise ApiError(422, f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ApiError(422, f"{what} is empty")
    if len(value) > config.max_text_chars:
        raise ApiError(413, f"{what} has {len(value):,} characters; the limit is {config.max_text_chars:,}")
    return value


def parse_filter(value: Any) -> dict[str, Any] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):  # multipart forms carry the filter as JSON text
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise ApiError(422, "filter must be a JSON object of metadata conditions") from None
    if not isinstance(value, dict):
        raise ApiError(422, 'filter must be an object of metadata conditions, e.g. {"split": "test"}')
    return value or None


def parse_space(value: Any) -> str:
    if value in (None, ""):
        return "image"
    if value not in ("image", "caption"):
        raise ApiError(422, f"space must be 'image' or 'caption', got {value!r}")
    return value


def form_field(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if isinstance(value, UploadFile):
        raise ApiError(422, f"form field {name!r} must be a value, not a file")
    return value


async def read_upload(form: FormData, config: ServeConfig, name: str = "image") -> bytes:
    upload = form.get(name)
    if upload is None:
        raise ApiError(422, f"the form needs an {name!r} file")
    if not isinstance(upload, UploadFile):
        raise ApiError(422, f"form field {name!r} must be a file upload")
    declared = (upload.content_type or "").split(";")[0].strip().lower()
    if declared and not declared.startswith("image/") and declared != "application/octet-stream":
        raise ApiError(415, f"the {name!r} file is declared as {declared!r}; upload an image (image/*)")
    data = await upload.read()
    if not data:
        raise ApiError(400, f"the {name!r} file is empty")
    return data


def decode_pixels(data: bytes, preprocess, config: ServeConfig) -> torch.Tensor:
    """Encoded image bytes -> (3, H, W) preprocessed tensor, refusing decompression bombs before decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except Image.DecompressionBombError:
        raise ApiError(
            413, f"the image has too many pixels; the limit is {config.max_image_pixels:,}"
        ) from None
    except Exception as error:
        raise ApiError(400, f"the upload is not a readable image: {type(error).__name__}: {error}") from None
    if width * height > config.max_image_pixels:
        raise ApiError(
            413,
            f"the image is {width} x {height} = {width * height:,} pixels; the limit is {config.max_image_pixels:,}",
        )
    try:
        return preprocess(data)
    except ImageDecodeError as error:
        raise ApiError(400, f"the upload is not a readable image: {error}") from None
