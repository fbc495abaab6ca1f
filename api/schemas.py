"""Request and response bodies: the single source for validation and for the OpenAPI document.

Patterns are written in the syntax ECMA-262 and Python's `re` share (no `\\s`, whose sets differ
between the two), so a client validating against /openapi.json and this server agree exactly.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model, model_validator

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


STACKS = ("python", "node")
CHANGE_MAX_CHARS = 4000
EDITS_MAX = 200
EDIT_PATH_MAX_CHARS = 255
VERSION_REF_PATTERN = "^[A-Za-z0-9_-]{1,64}$"  # a build id or a build_version (build_v0_3)

Change = Annotated[str, StringConstraints(min_length=1, max_length=CHANGE_MAX_CHARS, pattern=GOAL_PATTERN)]
VersionRef = Annotated[str, StringConstraints(pattern=VERSION_REF_PATTERN)]
EditPath = Annotated[str, StringConstraints(min_length=1, max_length=EDIT_PATH_MAX_CHARS, pattern=TEXT_PATTERN)]


class FileEditIn(_Strict):
    """One file: its new full content, or `"delete": true`."""

    path: EditPath = Field(description="Relative to the project root; no `..`, not absolute.")
    content: Annotated[str, StringConstraints(pattern=TEXT_PATTERN)] | None = Field(
        None, description="The file's new content (UTF-8 text)."
    )
    delete: bool = Field(False, description="Remove the file instead.")

    @model_validator(mode="after")
    def _content_or_delete(self) -> FileEditIn:
        if (self.content is None) == (not self.delete):
            raise ValueError("give exactly one of `content` and `\"delete\": true`")
        return self


class TriggerShapes:
    """The trigger body's shapes for a server offering `runners` (the first is the default). Exactly
    one shape applies, chosen by which of `goal`, `change`, `edits`, `base` the body has."""

    def __init__(self, runners: tuple[str, ...]) -> None:
        runner_type: Any = Literal[runners]  # type: ignore[valid-type]
        runner = (runner_type, Field(runners[0], description="Code generator to use."))
        base = (VersionRef | None, Field(None, description="The version to start from: a build_version "
                "(`build_v0_3`) or a build id of this project. Default: the newest READY version (for "
                "changes sent back to back, the result of the change before)."))
        edits = (Annotated[list[FileEditIn], Field(min_length=1, max_length=EDITS_MAX)],
                 Field(description="Files to write or delete, applied before the runner sees the files."))
        self.new_app = create_model(
            "NewApp", __base__=_Strict,
            goal=(Goal, Field(description="What to build, in plain words (not blank).")),
            runner=runner,
            stack=(Literal[STACKS], Field("python", description="What the app is written in.")),  # type: ignore[valid-type]
        )
        self.change = create_model(
            "ChangeApp", __base__=_Strict,
            change=(Change, Field(description="What to change, in plain words; needs a runner that writes code.")),
            base=base, edits=(edits[0] | None, Field(None, description=edits[1].description)), runner=runner,
        )
        self.edits = create_model("EditFiles", __base__=_Strict, edits=edits, base=base, runner=runner)
        self.restore = create_model(
            "RestoreVersion", __base__=_Strict,
            base=(VersionRef, Field(description="The version whose files the new version gets, unchanged.")),
            runner=runner,
        )

    @property
    def models(self) -> tuple[type[_Strict], ...]:
        return (self.new_app, self.change, self.edits, self.restore)

    def model_for(self, body: object) -> type[_Strict] | None:
        """The shape `body` is meant to be, by its keys; None when it is none of them."""
        if not isinstance(body, dict):
            return None
        if "goal" in body:
            return self.new_app
        if "change" in body:
            return self.change
        if "edits" in body:
            return self.edits
        if "base" in body:
            return self.restore
        return None


class CancelBuild(_Strict):
    reason: Annotated[
        str, StringConstraints(min_length=1, max_length=REASON_MAX_CHARS, pattern=TEXT_PATTERN)
    ] = "cancelled by user"


class Links(_Out):
    self_: str = Field(serialization_alias="self")
    events: str
    cancel: str
    logs: str = Field(description="The build's log (GET; `?follow=app` after READY).")
    web_ui: str | None = Field(description="The workflow in the Temporal Web UI; null until a run exists.")


class PreviewOut(_Out):
    """A version's preview after a wake or a pause."""

    build_id: str
    state: PreviewStateName
    preview_url: str | None
    message: str = ""
    debug_id: str = ""


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


class LogEvent(_Out):
    """`data` of the `build.log` event; also one line of `GET /v1/builds/{id}/logs`."""

    seq: int = Field(ge=1, description="The line's number in the build's log (the `after` cursor).")
    stage: Stage
    attempt: int = Field(ge=0, description="The build's attempt that wrote it (1: the first try, 2: the first fix).")
    stream: str = Field(description="`stdout`, `stderr`, or `system` (what genloop itself says).")
    text: str = Field(description="The line, secrets redacted, control characters escaped as \\xNN.")
    at: datetime


class LogPage(_Out):
    lines: list[LogEvent]
    next_after: int = Field(description="Pass as `after` to read on (the last line's seq; `after` when empty).")
    truncated: bool = Field(description="The build's log reached its cap; later output was dropped.")


class EditedPath(_Out):
    path: str
    op: Literal["write", "delete"]


class Lineage(_Out):
    """Where a version comes from."""

    kind: Literal["new", "change"]
    base_build_id: str | None = Field(description="The build it started from (a change).")
    base_version: str | None
    change: str | None = Field(description="The change text (capped), if one was sent.")
    edited_paths: list[EditedPath]
    note: str | None = Field(description="Why it built on this base, when not the one expected.")


class Usage(_Out):
    input_tokens: int
    output_tokens: int
    calls: int
    model: str | None


class PreviewStateName(str, Enum):
    LIVE = "live"
    PAUSED = "paused"
    WAKING = "waking"
    REMOVED = "removed"
    FAILED = "failed"


class BuildSummary(_Out):
    build_id: str
    project_id: str
    goal: str
    stage: Stage
    label: str
    message: str
    preview_url: str | None = Field(description="The version's URL: stable for as long as the version is kept.")
    sandbox_preview_url: str | None = Field(description="The URL of the sandbox serving it now (changes when it is "
                                            "served again).")
    preview_state: PreviewStateName | None = Field(description="live, paused (wakes on the next request), waking, "
                                                   "removed (retention; the URL answers 410), failed (cannot start).")
    preview_woken_at: datetime | None
    build_version: str | None
    error_message: str | None = Field(description="Safe to show to users; internal detail is never exposed.")
    debug_id: str | None = Field(description="Quote this to support: it finds the internal error detail.")
    runner: str | None
    stack: str
    lineage: Lineage
    attempt: int = Field(description="The attempt running or last run (1: the first; more after fix attempts).")
    max_attempts: int
    usage: Usage
    created_at: datetime
    updated_at: datetime
    links: Links


class AttemptOut(_Out):
    """Why one attempt failed, as the fix loop showed it to the runner (tail, redacted)."""

    attempt: int
    stage: Stage
    command: str
    exit_code: int | None
    output: str
    at: datetime


class BuildDetail(BuildSummary):
    sandbox_id: str | None
    sandbox_host: str | None = Field(description="The local sandbox host that has the sandbox (null on E2B).")
    history: list[TransitionOut]
    attempts: list[AttemptOut]


class FileOut(_Out):
    path: str
    size: int
    sha256: str


class FileList(_Out):
    build_id: str
    files: list[FileOut]


class ProjectView(_Out):
    project_id: str
    goal: str | None = Field(description="The goal of the newest READY version's line.")
    newest_ready: BuildSummary | None
    versions: list[BuildSummary] = Field(description="Every build of the project, oldest first.")
    pending: list[str] = Field(description="Build ids of changes waiting to be built, in order.")


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
    BuildRef, BuildDetail, BuildPage, Health, ErrorBody, StageEvent, ReadyEvent, FailedEvent, FileList, ProjectView,
    PreviewOut, LogEvent, LogPage,
)
