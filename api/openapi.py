"""The OpenAPI 3.1 document, built per server: bodies and responses come from the same pydantic
models the routes validate and serialize with, so the document cannot drift from the code."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from api.schemas import (
    ID_PATTERN,
    IDEMPOTENCY_KEY_PATTERN,
    PAGE_SIZE_DEFAULT,
    PAGE_SIZE_MAX,
    RESPONSE_MODELS,
    CancelBuild,
    TriggerShapes,
)
from genloop.settings import Settings
from persistence.repository import MAX_LOG_PAGE
from workflows.stages import Stage

_JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_response(description: str, schema: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": {_JSON: {"schema": _ref(schema)}}}
    if headers:
        response["headers"] = headers
    return response


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    return _json_response(description, "ErrorBody", headers)


def _header(description: str, **schema: Any) -> dict[str, Any]:
    return {"description": description, "schema": {"type": "string", **schema}}


def _id_param(name: str, where: str = "path", description: str = "") -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "description": description or f"The {name.replace('_', ' ')}.",
        "schema": {"type": "string", "pattern": ID_PATTERN, "minLength": 1, "maxLength": 64},
    }


_UNAVAILABLE = _error(
    "`service_unavailable`: the database or Temporal cannot be reached; retry later.",
    {"Retry-After": _header("Seconds to wait before retrying.", pattern="^[0-9]+$")},
)
_INTERNAL = _error("`internal_error`: an unexpected failure; the body carries no internal detail.")
_NOT_FOUND = _error("`not_found`: no build with this id.")
_BAD_ID = _error("`invalid_parameter`: a path parameter, query parameter or header is malformed.")


def _body_errors(max_body_bytes: int) -> dict[str, Any]:
    return {
        "403": _error("`forbidden`: a request from another site's page (foreign `Origin` or `Sec-Fetch-Site`)."),
        "413": _error(f"`payload_too_large`: the body is larger than {max_body_bytes} bytes."),
        "415": _error("`unsupported_media_type`: the body is not `application/json` (UTF-8)."),
        "422": _error("`validation_failed`: the JSON does not match the body schema (unknown fields included)."),
    }


def openapi_document(*, shapes: TriggerShapes, settings: Settings) -> dict[str, Any]:
    auth, max_body_bytes = settings.api_requires_token, settings.api.max_body_bytes
    models: list[tuple[type[BaseModel], Any]] = [(m, "validation") for m in shapes.models]
    models.append((CancelBuild, "validation"))
    models += [(m, "serialization") for m in RESPONSE_MODELS]
    _, defs = models_json_schema(models, by_alias=True, ref_template="#/components/schemas/{model}")

    common: dict[str, Any] = {
        "421": _error("`misdirected_request`: the Host header names neither a loopback address nor a configured "
                      "public name (`api.public_hosts`)."),
        "500": _INTERNAL,
    }
    if auth:
        common["401"] = _error(
            "`unauthorized`: missing or wrong bearer token.",
            {"WWW-Authenticate": _header("The authentication scheme.", enum=["Bearer"])},
        )
    open_access = {"security": []} if auth else {}
    body_errors = _body_errors(max_body_bytes)
    trigger_errors = _body_errors(settings.api.max_edit_body_bytes)
    build_id = [_id_param("build_id")]

    paths: dict[str, Any] = {
        "/v1/projects/{project_id}/builds": {
            "parameters": [_id_param("project_id")],
            "post": {
                "operationId": "triggerBuild",
                "summary": "Start a build: a new app from a `goal`, or the next version of the project's line.",
                "description": (
                    "Exactly one shape: `{goal}` builds a new app; `{change, base?, edits?}` asks the runner "
                    "to change the files of `base`; `{edits, base?}` writes/deletes files of `base`; `{base}` "
                    "restores a version (a new version with exactly its files). `base` defaults to the "
                    "project's newest READY version; changes without `base` build in the order they were sent, "
                    "each on the result of the one before. Unknown base: 404; a base without files: 409; a "
                    "free-text `change` to a runner that cannot write code: 422."
                ),
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "description": "Retries with the same key return the same build; reusing a key "
                        "with a different body is a 409.",
                        "schema": {
                            "type": "string",
                            "pattern": IDEMPOTENCY_KEY_PATTERN,
                            "minLength": 1,
                            "maxLength": 255,
                        },
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {_JSON: {"schema": {"oneOf": [_ref(m.__name__) for m in shapes.models]}}},
                },
                "responses": {
                    "202": _json_response(
                        "The build is queued (or, for a repeated Idempotency-Key, the existing build).",
                        "BuildRef",
                        {"Location": _header("The build's URL path.")},
                    ),
                    "400": _error("`malformed_json` or `invalid_parameter`."),
                    "404": _error("`not_found`: `base` names no build or version of this project."),
                    "409": _error(
                        "`conflict`: the Idempotency-Key was used with a different body; the base has "
                        "no files; the project has no version to change yet; too many changes waiting."
                    ),
                    **trigger_errors,
                    "503": _UNAVAILABLE,
                    **common,
                },
            },
            "get": {
                "operationId": "listBuilds",
                "summary": "The project's builds, newest first.",
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": PAGE_SIZE_MAX,
                            "default": PAGE_SIZE_DEFAULT,
                        },
                    },
                    _id_param("cursor", "query", "The `next_cursor` of the previous page."),
                ],
                "responses": {
                    "200": _json_response("A page of builds.", "BuildPage"),
                    "400": _error("`invalid_parameter`: a malformed limit or cursor, or an unknown query parameter."),
                    "404": _error("`not_found`: the cursor names no build of this project."),
                    "503": _UNAVAILABLE,
                    **common,
                },
            },
        },
        "/v1/builds/{build_id}": {
            "parameters": [_id_param("build_id")],
            "get": {
                "operationId": "getBuild",
                "summary": "The build's stage, history and outcome.",
                "responses": {
                    "200": _json_response("The build.", "BuildDetail"),
                    "400": _BAD_ID,
                    "404": _NOT_FOUND,
                    "503": _UNAVAILABLE,
                    **common,
                },
            },
        },
        "/v1/builds/{build_id}/events": {
            "parameters": [_id_param("build_id")],
            "get": {
                "operationId": "buildEvents",
                "summary": "Server-Sent Events: the build's progress until it ends.",
                "description": (
                    "Events: `build.stage.started` (data: StageEvent), `build.ready` (ReadyEvent), "
                    "`build.failed` (FailedEvent), `build.cancelled` (StageEvent). Each event's `id` is "
                    "the transition's sequence number, so `Last-Event-ID` resumes after it. A "
                    "`: heartbeat` comment is sent every 15 s without events. The stream closes after "
                    "the terminal event; for a build that has already ended, that one event is all "
                    "it sends. With `logs=1` the build's log lines are interleaved as `build.log` events "
                    "(data: LogEvent) and every event's `id` is `T.L` (the last stage event's and the last "
                    "log line's seq sent so far): `Last-Event-ID` resumes both, without a gap or a repeat; "
                    "for a build that has ended, the lines the client lacks come before the outcome."
                ),
                "parameters": [
                    {
                        "name": "logs",
                        "in": "query",
                        "required": False,
                        "description": "`1`/`true`: interleave `build.log` events.",
                        "schema": {"type": "string", "enum": ["1", "true", "0", "false"]},
                    },
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "description": "`T` without logs; `T` or `T.L` with `logs=1`.",
                        "schema": {"type": "string", "pattern": "^[0-9]{1,9}([.][0-9]{1,9})?$"},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "The event stream.",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "204": {"description": "The build has ended and the client has its last event: do not reconnect."},
                    "400": _BAD_ID,
                    "404": _NOT_FOUND,
                    "503": _UNAVAILABLE,
                    **common,
                },
            },
        },
        "/v1/builds/{build_id}/logs": {
            "parameters": build_id,
            "get": {
                "operationId": "buildLogs",
                "summary": "The build's log: runner progress, install output, the app's output during CHECKS.",
                "description": (
                    "Lines in seq order, secrets redacted, at most `logs.cap_bytes` per build (then one "
                    "truncation line). Page with `after` (the previous page's `next_after`); `tail=N` gives "
                    "the last N lines instead. `follow=app` (alone) streams the running app's output after "
                    "READY as Server-Sent Events `app.log` (data: `{stream, text, at}`), live from its "
                    "sandbox and not stored: 409 when the build is not READY or its app is not running."
                ),
                "parameters": [
                    {
                        "name": "after",
                        "in": "query",
                        "required": False,
                        "description": "Lines with a larger seq.",
                        "schema": {"type": "integer", "minimum": 0, "default": 0},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LOG_PAGE, "default": 1000},
                    },
                    {
                        "name": "tail",
                        "in": "query",
                        "required": False,
                        "description": "The last N lines.",
                        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LOG_PAGE},
                    },
                    {
                        "name": "stage",
                        "in": "query",
                        "required": False,
                        "description": "Only this stage's lines.",
                        "schema": {"type": "string", "enum": [s.value for s in Stage]},
                    },
                    {
                        "name": "q",
                        "in": "query",
                        "required": False,
                        "description": "Only lines containing this text (case-insensitive).",
                        "schema": {"type": "string", "minLength": 1, "maxLength": 200},
                    },
                    {"name": "follow", "in": "query", "required": False, "schema": {"type": "string", "enum": ["app"]}},
                ],
                "responses": {
                    "200": {
                        "description": "A page of lines (`Accept: application/x-ndjson`: one LogEvent per "
                        "line), or with `follow=app` the event stream.",
                        "content": {
                            _JSON: {"schema": _ref("LogPage")},
                            "application/x-ndjson": {"schema": _ref("LogEvent")},
                            "text/event-stream": {"schema": {"type": "string"}},
                        },
                    },
                    "400": _error("`invalid_parameter`: a malformed parameter, an unknown one, or after with tail."),
                    "404": _NOT_FOUND,
                    "409": _error("`conflict`: `follow=app` on a build whose app is not running."),
                    "503": _UNAVAILABLE,
                    **common,
                },
            },
        },
        "/v1/builds/{build_id}/cancel": {
            "parameters": [_id_param("build_id")],
            "post": {
                "operationId": "cancelBuild",
                "summary": "Ask a running build to stop; it ends `cancelled` and its sandbox is removed.",
                "requestBody": {
                    "required": False,
                    "description": "Optional, but every POST must be `application/json` (send `{}` for none).",
                    "content": {_JSON: {"schema": _ref("CancelBuild")}},
                },
                "responses": {
                    "202": _json_response("Cancellation requested; follow the events for the outcome.", "BuildRef"),
                    "400": _error("`malformed_json` or `invalid_parameter`."),
                    "404": _NOT_FOUND,
                    "409": _error("`conflict`: the build has already finished."),
                    **body_errors,
                    "503": _UNAVAILABLE,
                    **common,
                },
            },
        },
        "/v1/projects/{project_id}": {
            "parameters": [_id_param("project_id")],
            "get": {
                "operationId": "getProject",
                "summary": "The project: its goal, newest READY version, every version with its lineage, and "
                "the changes waiting to be built.",
                "responses": {
                    "200": _json_response("The project.", "ProjectView"),
                    "400": _BAD_ID,
                    "404": _error("`not_found`: the project has no builds."),
                    "503": _UNAVAILABLE,
                    **common,
                },
            },
        },
        "/v1/builds/{build_id}/files": {
            "parameters": build_id,
            "get": {
                "operationId": "listFiles",
                "summary": "The build's files (empty until CODE has finished).",
                "responses": {
                    "200": _json_response("Path, size and sha256 of each file.", "FileList"),
                    "400": _BAD_ID,
                    "404": _NOT_FOUND,
                    "503": _UNAVAILABLE,
                    **common,
                },
            },
        },
        "/v1/builds/{build_id}/files/{path}": {
            "parameters": [
                *build_id,
                {
                    "name": "path",
                    "in": "path",
                    "required": True,
                    "description": "A file path, as listed.",
                    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                },
            ],
            "get": {
                "operationId": "getFile",
                "summary": "One file's content (text/plain for UTF-8 text, application/octet-stream otherwise).",
                "responses": {
                    "200": {
                        "description": "The content.",
                        "content": {
                            "text/plain": {"schema": {"type": "string"}},
                            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                        },
                    },
                    "400": _error("`invalid_parameter`: a malformed build id or an unsafe path."),
                    "404": _error("`not_found`: no such build, or no such file in it."),
                    "503": _UNAVAILABLE,
                    **common,
                },
            },
        },
        "/v1/builds/{build_id}/diff": {
            "parameters": build_id,
            "get": {
                "operationId": "diffBuild",
                "summary": "A unified diff to this build from `against` (default: its base; nothing, for a new app).",
                "parameters": [_id_param("against", "query", "A build id or build_version of the same project.")],
                "responses": {
                    "200": {"description": "The diff.", "content": {"text/x-diff": {"schema": {"type": "string"}}}},
                    "400": _BAD_ID,
                    "404": _error("`not_found`: no such build, or `against` is not a version of its project."),
                    "503": _UNAVAILABLE,
                    **common,
                },
            },
        },
        "/v1/builds/{build_id}/preview/wake": {
            "parameters": build_id,
            "post": {
                "operationId": "wakePreview",
                "summary": "Wake the version now (resume its sandbox, or serve it again from its files); answers "
                "when it is live, or why it cannot be.",
                "requestBody": {"required": False, "content": {_JSON: {"schema": {"type": "object"}}}},
                "responses": {
                    "200": _json_response("The version's preview state.", "PreviewOut"),
                    "400": _BAD_ID,
                    "404": _NOT_FOUND,
                    "409": _error("`conflict`: not a READY version with a preview URL, or removed by retention."),
                    **body_errors,
                    "503": _UNAVAILABLE,
                    **common,
                },
            },
        },
        "/v1/builds/{build_id}/preview/pause": {
            "parameters": build_id,
            "post": {
                "operationId": "pausePreview",
                "summary": "Pause the version now; its next request wakes it.",
                "requestBody": {"required": False, "content": {_JSON: {"schema": {"type": "object"}}}},
                "responses": {
                    "200": _json_response("The version's preview state.", "PreviewOut"),
                    "400": _BAD_ID,
                    "404": _NOT_FOUND,
                    "409": _error("`conflict`: the version is not being served."),
                    **body_errors,
                    "503": _UNAVAILABLE,
                    **common,
                },
            },
        },
        "/healthz": {
            "get": {
                "operationId": "health",
                "summary": "Database and Temporal reachability.",
                **open_access,
                "responses": {
                    "200": _json_response("Everything is reachable.", "Health"),
                    "503": _json_response("At least one component is unavailable.", "Health"),
                    "500": _INTERNAL,
                },
            },
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document.",
                **open_access,
                "responses": {
                    "200": {"description": "The OpenAPI document.", "content": {_JSON: {"schema": {"type": "object"}}}},
                    "500": _INTERNAL,
                },
            },
        },
    }

    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "genloop",
            "version": "1.0.0",
            "description": "Turn a goal into a running app preview. Every READY version is also served at "
            "its own stable URL (`preview_url`, a host of its own: `v3--my-project.localhost:<port>`) by the "
            "preview gateway in this process; those hosts never reach these routes. Every error is "
            '`{"error": {"code", "message"}}`; unknown routes answer 404 and wrong methods 405 '
            "in that shape.",
        },
        "paths": paths,
        "components": {"schemas": defs["$defs"]},
    }
    if auth:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
    return document
