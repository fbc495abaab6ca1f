"""Request and response bodies: the single source for validation and for the OpenAPI document.

Patterns are written in the syntax ECMA-262 and Python's `re` share (no `\\s`, whose sets differ
between the two), so a client validating against /openapi.json and this server agree exactly.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model

from workflows.stages import Stage

ID_PATTERN = "^[A-Za-z0-9_-]{1,64}$"
# Visible ASCII only: the key is hashed into the build id and echoed in logs.
IDEMPOTENCY_KEY_PATTERN = "^[\\x21-\\x7e]{1,255}$"
GOAL_MAX_CHARS = 4000
REASON_MAX_CHARS = 500
PAGE_SIZE_DEFAULT = 20
PAGE_SIZE_MAX = 100

# Exactly the characters Python's str.isspace() accepts, which is what the pipeline's own blank-goal
# check uses. NUL is refused: PostgreSQL TEXT cannot store it. (Unpaired surrogates, which UTF-8
# cannot encode, are not Unicode text and fail string validation before any pattern is applied.)
# Both patterns end in a class that admits "\n", so Python's `$` quirk cannot change their meaning.
_WHITESPACE = "\\t-\\r\\x1c-\\x20\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
TEXT_PATTERN = "^[^\\x00]*$"
GOAL_PATTERN = f"^[{_WHITESPACE}]*[^{_WHITESPACE}\\x00][^\\x00]*$"


def fullmatch(pattern: str) -> re.Pattern[str]:
    """The compiled form of a `^...$` pattern with ECMA semantics: Python's `$` would also accept a
    trailing newline, `\\Z` does not."""
    return re.compile(pattern.removesuffix("$") + "\\Z")


class _Strict(BaseModel):
    # Unknown fields are errors, and "1" is not accepted for a string nor 1 for a boolean.
    model_config = ConfigDict(extra="forbid", strict=True, regex_engine="python-re")


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


Goal = Annotated[str, StringConstraints(min_length=1, max_length=GOAL_MAX_CHARS, pattern=GOAL_PATTERN)]


def trigger_body_model(runners: tuple[str, ...]) -> type[_Strict]:
    """The trigger body for a server offering `runners` (the first is the default): the enum in the
    OpenAPI document is exactly what this server accepts."""
    runner_type: Any = Literal[runners]  # type: ignore[valid-type]
    return create_model(
        "TriggerBuild",
        __base__=_Strict,
        goal=(Goal, Field(description="What to build, in plain words (not blank).")),
        runner=(runner_type, Field(runners[0], description="Code generator to use.")),
    )


class CancelBuild(_Strict):
    reason: Annotated[
        str, StringConstraints(min_length=1, max_length=REASON_MAX_CHARS, pattern=TEXT_PATTERN)
    ] = "cancelled by user"


class Links(_Out):
    self_: str = Field(serialization_alias="self")
    events: str
    cancel: str
    web_ui: str | None = Field(description="The workflow in the Temporal Web UI; null until a run exists.")


class BuildRef(_Out):
    """A build just triggered or asked to cancel."""

    build_id: str
    project_id: str
    status: Stage
    links: Links


class TransitionOut(_Out):
    seq: int = Field(ge=1)
    stage: Stage
    label: str
    message: str
    at: datetime


class StageEvent(_Out):
    """`data` of `build.stage.started` and `build.cancelled` events."""

    stage: Stage
    label: str
    message: str
    at: datetime


class ReadyEvent(StageEvent):
    """`data` of the `build.ready` event."""

    preview_url: str | None
    build_version: str | None


class FailedEvent(StageEvent):
    """`data` of the `build.failed` event."""

    error_message: str | None
    debug_id: str | None


class BuildSummary(_Out):
    build_id: str
    project_id: str
    goal: str
    stage: Stage
    label: str
    message: str
    preview_url: str | None
    build_version: str | None
    error_message: str | None = Field(description="Safe to show to users; internal detail is never exposed.")
    debug_id: str | None = Field(description="Quote this to support: it finds the internal error detail.")
    created_at: datetime
    updated_at: datetime
    links: Links


class BuildDetail(BuildSummary):
    sandbox_id: str | None
    history: list[TransitionOut]


class BuildPage(_Out):
    builds: list[BuildSummary]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class ComponentStatus(str, Enum):
    OK = "ok"
    UNAVAILABLE = "unavailable"


class ComponentHealth(_Out):
    status: ComponentStatus


class Components(_Out):
    database: ComponentHealth
    temporal: ComponentHealth


class Health(_Out):
    status: ComponentStatus
    components: Components


class ErrorCode(str, Enum):
    MALFORMED_JSON = "malformed_json"
    INVALID_PARAMETER = "invalid_parameter"
    VALIDATION_FAILED = "validation_failed"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    MISDIRECTED = "misdirected_request"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    CONFLICT = "conflict"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    SERVICE_UNAVAILABLE = "service_unavailable"
    INTERNAL_ERROR = "internal_error"


class ErrorDetail(_Out):
    code: ErrorCode
    message: str


class ErrorBody(_Out):
    error: ErrorDetail


RESPONSE_MODELS: tuple[type[BaseModel], ...] = (
    BuildRef, BuildDetail, BuildPage, Health, ErrorBody, StageEvent, ReadyEvent, FailedEvent,
)
