"""Every error leaves the API as `{"error": {"code", "message"}}` with the right status.

Client mistakes raise `ApiError` (4xx); `GenloopError` kinds from the repository map onto statuses
here; anything else is a 500 whose body says nothing about the cause (the log has the traceback).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from temporalio.service import RPCError, RPCStatusCode

from api.schemas import ErrorCode
from genloop.errors import ErrorKind, GenloopError

log = logging.getLogger("genloop.api")

RETRY_AFTER_S = "5"
UNAVAILABLE_MESSAGE = "The build service is temporarily unavailable. Please retry shortly."
INTERNAL_MESSAGE = "Internal server error."

# Transient kinds are all 503 (see genloop_error); these are the permanent ones a request can hit.
_KIND_STATUS: Mapping[ErrorKind, tuple[int, ErrorCode]] = {
    ErrorKind.NOT_FOUND: (404, ErrorCode.NOT_FOUND),
    ErrorKind.CONFLICT: (409, ErrorCode.CONFLICT),
    ErrorKind.INVALID_INPUT: (400, ErrorCode.INVALID_PARAMETER),
    ErrorKind.ILLEGAL_TRANSITION: (409, ErrorCode.CONFLICT),
}

# Temporal answers that mean "not reachable / overloaded now", as opposed to a bug in the request.
TEMPORAL_UNAVAILABLE = frozenset(
    {RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.RESOURCE_EXHAUSTED}
)


class ApiError(Exception):
    def __init__(self, status: int, code: ErrorCode, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def unavailable() -> ApiError:
    return ApiError(503, ErrorCode.SERVICE_UNAVAILABLE, UNAVAILABLE_MESSAGE, {"Retry-After": RETRY_AFTER_S})


def error_response(
    status: int, code: ErrorCode, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"code": code.value, "message": message}}, status_code=status, headers=headers)


async def api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.headers)


async def genloop_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, GenloopError)
    if exc.kind.transient:
        # The detail may name hosts; it goes to the log only.
        log.warning("dependency unavailable: %s", exc)
        err = unavailable()
        return error_response(err.status, err.code, err.message, err.headers)
    if exc.kind in _KIND_STATUS:
        status, code = _KIND_STATUS[exc.kind]
        # These details are written for the caller (a missing id, an unknown cursor).
        return error_response(status, code, exc.detail or exc.kind.friendly)
    log.error("unexpected %s", exc)
    return error_response(500, ErrorCode.INTERNAL_ERROR, INTERNAL_MESSAGE)


async def rpc_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RPCError)
    if exc.status in TEMPORAL_UNAVAILABLE:
        log.warning("temporal unavailable: %s", exc)
        err = unavailable()
        return error_response(err.status, err.code, err.message, err.headers)
    log.error("temporal call failed: %s (%s)", exc, exc.status)
    return error_response(500, ErrorCode.INTERNAL_ERROR, INTERNAL_MESSAGE)


_HTTP_CODES = {
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
}


async def http_error(_request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own 404 (no route) and 405 (wrong method, with its Allow header)."""
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, ErrorCode.INVALID_PARAMETER)
    message = "No such route." if exc.status_code == 404 else HTTPStatus(exc.status_code).phrase
    return error_response(exc.status_code, code, message, exc.headers)


async def internal_error(_request: Request, _exc: Exception) -> JSONResponse:
    # Starlette's ServerErrorMiddleware re-raises after this, so the traceback reaches the log.
    return error_response(500, ErrorCode.INTERNAL_ERROR, INTERNAL_MESSAGE)


EXCEPTION_HANDLERS = {
    ApiError: api_error,
    GenloopError: genloop_error,
    RPCError: rpc_error,
    HTTPException: http_error,
    Exception: internal_error,
}
