"""Request parsing with limits: every mistake in a request becomes a 4xx with a readable message.

The fields of each request are pydantic models (``extra="forbid"``, constraints from the service's
`ServeConfig`), built once per app by `request_models`, so the OpenAPI schema at ``/docs`` shows the
limits the service really enforces.

413: body, image, text or list too large; 415: a content type the route does not take; 400: a body or
image that cannot be read; 422: a value of the wrong type or out of range; 404: an unknown item.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import string
import warnings
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from PIL import Image
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request

from polyclip.images import ImageDecodeError
from polyclip.serve.config import ServeConfig
from polyclip.zero_shot import template_sets

MAX_TEMPLATES = 16
MAX_PROMPTS = 1024  # labels x templates encoded for one classifier
MAX_EMBEDDING_DIM = 8192  # an `embedding_input` longer than any model's embedding is refused unread
ITEM_ID = re.compile(r"[0-9]{1,18}")  # ASCII digits only: str.isdigit() also takes "²" and "١"
TOO_LARGE = {"string_too_long", "too_long"}  # pydantic error types answered 413 rather than 422


class ApiError(Exception):
    """An error answered as ``{"error": message, "status": status}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# -- bodies
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
    """The body as a JSON object, whatever the declared content type (the caller checks that)."""
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


def form_values(form: FormData, lists: frozenset[str] = frozenset(), files: frozenset[str] = frozenset()):
    """The text fields of a form as a dict for a model: ``lists`` may repeat, every other field is
    given at most once; ``files`` (the upload) are left to `read_upload`."""
    values: dict[str, Any] = {}
    for name, value in form.multi_items():
        if name in files:
            continue
        if isinstance(value, UploadFile):
            raise ApiError(422, f"form field {name!r} must be a value, not a file")
        if name in lists:
            values.setdefault(name, []).append(value)
        elif name in values:
            raise ApiError(422, f"form field {name!r} is given more than once")
        else:
            values[name] = value
    return values


def validate(model: type[BaseModel], data: dict[str, Any]) -> Any:
    """``model(**data)``, with every failure turned into one readable 413 or 422."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        problems = error.errors(include_url=False, include_input=False)
        allowed = ", ".join(sorted(model.model_fields))
        parts = []
        for problem in problems:
            where = ".".join(str(part) for part in problem["loc"]) or "body"
            if problem["type"] == "extra_forbidden":
                parts.append(f"unknown field {where!r}; allowed: {allowed}")
            else:
                parts.append(f"{where}: {problem['msg']}")
        status = 413 if all(problem["type"] in TOO_LARGE for problem in problems) else 422
        raise ApiError(status, "; ".join(parts)) from None


# -- values
def parse_item_id(value: str) -> int:
    if not ITEM_ID.fullmatch(value):
        raise ApiError(404, "no indexed item with that id (ids are positive integers in ASCII digits)")
    return int(value)


def parse_filter(value: Any) -> dict[str, Any] | None:
    """A metadata filter: an object, or JSON text of one (forms). Its conditions are checked by the index."""
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


def check_template(template: str, longest_label: int, config: ServeConfig) -> str:
    """A prompt template is user text formatted with `str.format`: it must hold exactly one bare ``{}``
    field (no name, index, attribute, conversion or format spec: ``{:>100000000}`` would pad every
    prompt to 100 MB) and its prompts must fit the text limit. Doubled braces are literal braces."""
    try:
        fields = [
            (name, spec, conversion)
            for _, name, spec, conversion in string.Formatter().parse(template)
            if name is not None
        ]
    except ValueError as error:  # a lone "{" or "}"
        raise ApiError(422, f"template {template!r} is not a valid format string: {error}") from None
    if len(fields) != 1 or fields[0] != ("", "", None):
        raise ApiError(
            422,
            f"template {template!r} must contain exactly one '{{}}' for the label, with nothing inside "
            "the braces (write '{{' and '}}' for literal braces)",
        )
    longest = len(template.replace("{{", "{").replace("}}", "}")) - 2 + longest_label
    if longest > config.max_text_chars:
        raise ApiError(
            413,
            f"template {template!r} makes prompts of {longest:,} characters; the limit is {config.max_text_chars:,}",
        )
    return template


def resolve_service_templates(values: list[str], labels: list[str], config: ServeConfig) -> list[str]:
    """The templates of a /classify request: literal templates, or the name of a built-in set."""
    if not values:
        return ["a photo of a {}."]
    sets = template_sets()
    if len(values) == 1 and values[0] in sets:
        return list(sets[values[0]])
    if len(values) > MAX_TEMPLATES:
        raise ApiError(413, f"{len(values)} templates; the limit is {MAX_TEMPLATES}")
    longest_label = max(map(len, labels))
    return [check_template(value, longest_label, config) for value in values]


def split_labels(values: list[str], config: ServeConfig) -> list[str]:
    """Labels repeated as fields, or one field holding ``"cat, dog, bird"``; distinct, non-empty."""
    parts = values[0].split(",") if len(values) == 1 else values
    labels = [part.strip() for part in parts if part.strip()]
    if not labels:
        raise ApiError(
            422, "classify needs at least one label ('labels' form field, repeated or comma separated)"
        )
    if len(labels) > config.max_labels:
        raise ApiError(413, f"{len(labels)} labels; the limit is {config.max_labels}")
    if len(set(labels)) != len(labels):
        raise ApiError(422, "labels must be distinct")
    for label in labels:
        if len(label) > config.max_text_chars:
            raise ApiError(
                413, f"a label has {len(label):,} characters; the limit is {config.max_text_chars:,}"
            )
    return labels


def decode_base64_image(value: str) -> bytes:
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "'image' is not valid base64") from None
    if not data:
        raise ApiError(400, "'image' is empty")
    return data


# -- uploads
async def read_upload(form: FormData, config: ServeConfig, name: str = "image") -> bytes:
    uploads = form.getlist(name)
    if not uploads:
        raise ApiError(422, f"the form needs an {name!r} file")
    upload = uploads[0]
    if len(uploads) > 1:
        raise ApiError(422, f"the form has {len(uploads)} {name!r} fields; send one")
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


# -- the request models
Space = Literal["image", "caption"]
FORBID = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class RequestModels:
    search_json: type[BaseModel]
    search_form: type[BaseModel]
    image_form: type[BaseModel]
    embed_json: type[BaseModel]
    classify_form: type[BaseModel]
    knn: type[BaseModel]
    metadata: type[BaseModel]

    def openapi(self, json_model: type[BaseModel] | None, form_model: type[BaseModel] | None) -> dict:
        """``openapi_extra`` for a route that reads its body itself (JSON, or a form with an image)."""
        content = {}
        if json_model is not None:
            content["application/json"] = {"schema": json_model.model_json_schema()}
        if form_model is not None:
            schema = form_model.model_json_schema()
            schema["properties"] = {"image": {"type": "string", "format": "binary"}, **schema["properties"]}
            schema["required"] = ["image", *schema.get("required", [])]
            content["multipart/form-data"] = {"schema": schema}
        return {"requestBody": {"required": True, "content": content}}


def request_models(config: ServeConfig) -> RequestModels:
    """The request models of one service, their limits taken from ``config``."""
    Text = Annotated[str, StringConstraints(min_length=1, max_length=config.max_text_chars)]
    # JSON: an integer, not a boolean or a string; forms: the digits of one (lax parsing)
    StrictK = Annotated[int, Field(ge=1, le=config.max_k, strict=True)]
    FormK = Annotated[int, Field(ge=1, le=config.max_k)]
    Count = Annotated[int, Field(ge=1, strict=True, description=f"capped at {config.max_k}")]

    def not_blank(value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("is empty")
        return value

    class SearchJson(BaseModel):
        """A text query ('text'), or the neighbours of an indexed item ('like': its id)."""

        model_config = FORBID
        text: Text | None = None
        like: Annotated[int, Field(ge=0, strict=True)] | None = Field(None, description="an item id")
        k: StrictK = 10
        filter: dict[str, Any] | None = Field(None, description="metadata conditions, e.g. {'split': 'test'}")
        space: Space = "image"
        _blank = field_validator("text")(not_blank)

        @model_validator(mode="after")
        def _one_query(self):
            if (self.text is None) == (self.like is None):
                raise ValueError(
                    "JSON search needs 'text' or 'like' (an item id), one of them "
                    "(or send a multipart form with an 'image' file)"
                )
            return self

    class ImageForm(BaseModel):
        """The 'image' file alone."""

        model_config = FORBID

    class SearchForm(BaseModel):
        """An image query: the 'image' file and these fields."""

        model_config = FORBID
        k: FormK = 10
        filter: str | None = Field(None, description="metadata conditions as JSON text")
        space: Space = "image"

    class EmbedJson(BaseModel):
        """Texts to embed: 'texts' (a list) or 'text' (one), as /search takes it."""

        model_config = FORBID
        texts: Annotated[list[Text], Field(min_length=1, max_length=config.max_texts)] | None = None
        text: Text | None = None
        _blank = field_validator("text")(not_blank)

        @field_validator("texts")
        @classmethod
        def _no_blank(cls, values):
            for value in values or ():
                not_blank(value)
            return values

    class ClassifyForm(BaseModel):
        """Zero-shot classification of the 'image' file."""

        model_config = FORBID
        labels: Annotated[list[str], Field(min_length=1, max_length=config.max_labels)]
        template: Annotated[
            list[Annotated[str, StringConstraints(max_length=config.max_text_chars)]],
            Field(
                max_length=MAX_TEMPLATES,
                description="literal templates with one '{}' each, or the name of a built-in set",
            ),
        ] = []
        k: FormK | None = None

    class KnnRequest(BaseModel):
        """clip-retrieval's /knn-service request (`clip_retrieval.clip_back.KnnService`)."""

        model_config = FORBID
        text: Annotated[str, StringConstraints(max_length=config.max_text_chars)] | None = None
        image: str | None = Field(None, description="base64 of an encoded image")
        image_url: str | None = Field(None, description="refused unless the service allows image URLs")
        embedding_input: Annotated[list[float], Field(max_length=MAX_EMBEDDING_DIM)] | None = None
        modality: Literal["image", "text"] = Field("image", description="search image or caption vectors")
        num_images: Count = 40
        num_result_ids: Count | None = None
        indice_name: Annotated[str, StringConstraints(max_length=200)] | None = None
        deduplicate: bool = False
        use_mclip: bool = False
        use_safety_model: bool = False
        use_violence_detector: bool = False
        aesthetic_score: int | Literal[""] | None = None
        aesthetic_weight: float | Literal[""] | None = None

    class MetadataRequest(BaseModel):
        """clip-retrieval's /metadata request."""

        model_config = FORBID
        ids: Annotated[list[Annotated[int, Field(ge=0, strict=True)]], Field(max_length=config.max_k)]
        indice_name: Annotated[str, StringConstraints(max_length=200)] | None = None

    return RequestModels(
        SearchJson, SearchForm, ImageForm, EmbedJson, ClassifyForm, KnnRequest, MetadataRequest
    )
