"""Reading client input: path and query parameters, headers and JSON bodies, each mistake a 4xx."""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from api.errors import ApiError
from api.schemas import ID_PATTERN, ErrorCode, TriggerShapes, fullmatch

M = TypeVar("M", bound=BaseModel)

_ID = fullmatch(ID_PATTERN)
_DIGITS = re.compile(r"[0-9]{1,9}\Z")


def invalid(message: str) -> ApiError:
    return ApiError(400, ErrorCode.INVALID_PARAMETER, message)


def path_id(request: Request, name: str) -> str:
    value = request.path_params[name]
    if not _ID.match(value):
        raise invalid(f"{name} must be 1-64 characters from A-Z, a-z, 0-9, '_' and '-'")
    return value


def optional_id(value: str | None, name: str) -> str | None:
    if value is not None and not _ID.match(value):
        raise invalid(f"{name} must be 1-64 characters from A-Z, a-z, 0-9, '_' and '-'")
    return value


def header(request: Request, name: str, pattern: re.Pattern[str], description: str) -> str | None:
    values = request.headers.getlist(name)
    if not values:
        return None
    if len(values) > 1 or not pattern.match(values[0]):
        raise invalid(f"the {name} header must be {description}")
    return values[0]


def bounded_int(value: str | None, name: str, *, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    if not _DIGITS.match(value) or not low <= int(value) <= high:
        raise invalid(f"{name} must be an integer from {low} to {high}")
    return int(value)


def query(request: Request, allowed: frozenset[str]) -> dict[str, str]:
    """Query parameters, each at most once; unknown ones are mistakes, not silently ignored."""
    params = request.query_params
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise invalid(f"unknown query parameter {unknown[0]!r}")
    repeated = sorted(k for k in params if len(params.getlist(k)) > 1)
    if repeated:
        raise invalid(f"query parameter {repeated[0]!r} given more than once")
    return dict(params)


def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length")
    return (length is not None and length != "0") or "transfer-encoding" in request.headers


def is_json_media_type(content_type: str | None) -> bool:
    """`application/json`, optionally with a UTF-8 charset."""
    if content_type is None:
        return False
    media_type, *params = (p.strip().lower() for p in content_type.split(";"))
    charsets = [p.partition("=")[2].strip('"') for p in params if p.startswith("charset=")]
    return media_type == "application/json" and all(c in ("utf-8", "utf8") for c in charsets)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def json_body(request: Request, model: type[M], max_bytes: int, *, required: bool = True) -> M | None:
    """The body parsed into `model`: 415 not JSON, 413 too big (declared or streamed), 400 not
    parseable, 422 parseable but not what `model` accepts. None when optional and absent."""
    if not required and not _has_body(request):
        return None
    return _validated(model, await _json(request, max_bytes))


async def shaped_body(request: Request, shapes: TriggerShapes, max_bytes: int) -> BaseModel:
    """A body that must be exactly one of `shapes` (chosen by its keys): 422 when it is none."""
    data = await _json(request, max_bytes)
    model = shapes.model_for(data)
    if model is None:
        raise ApiError(422, ErrorCode.VALIDATION_FAILED, SHAPES_MESSAGE)
    return _validated(model, data)


SHAPES_MESSAGE = (
    "body: must be exactly one of {\"goal\"} (a new app), {\"change\", \"base\"?, \"edits\"?} (a change), "
    "{\"edits\", \"base\"?} (file edits) or {\"base\"} (restore a version), each with an optional \"runner\""
)


def _validated(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, ErrorCode.VALIDATION_FAILED, _describe(exc)) from None


async def _json(request: Request, max_bytes: int) -> Any:
    if not is_json_media_type(request.headers.get("content-type")):
        raise ApiError(415, ErrorCode.UNSUPPORTED_MEDIA_TYPE, "the body must be application/json (UTF-8)")
    too_large = ApiError(413, ErrorCode.PAYLOAD_TOO_LARGE, f"the body must be at most {max_bytes} bytes")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise too_large
    # Counted while streaming too: chunked bodies declare no length, and a declared one may lie.
    received = bytearray()
    async for chunk in request.stream():
        received += chunk
        if len(received) > max_bytes:
            raise too_large
    try:
        return json.loads(received.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ApiError(400, ErrorCode.MALFORMED_JSON, "the body is not valid JSON") from None


_MESSAGES = {
    "extra_forbidden": "unknown field",
    "missing": "required",
    "string_pattern_mismatch": "must not be blank and must not contain NUL characters",
    "string_unicode": "must be valid Unicode text (no unpaired surrogates)",
    "model_type": "must be a JSON object",
    "model_attributes_type": "must be a JSON object",
    "dict_type": "must be a JSON object",
}


def _describe(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in err["loc"]) or "body"
        problems.append(f"{where}: {_MESSAGES.get(err['type'], err['msg'])}")
    return "; ".join(problems)
