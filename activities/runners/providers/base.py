"""The small interface between the provider-neutral loop (`activities.runners.llm`) and the adapters
over each official SDK: a conversation and tools go in; text and/or tool calls, the stop reason and
usage come out. Also the one mapping of provider HTTP failures onto genloop's error taxonomy, and the
scrubbing that keeps the API key out of every message.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from genloop.errors import ErrorKind, GenloopError, redact_secrets


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    raw_arguments: str  # as the model wrote them (JSON text); replayed verbatim in the history
    arguments: dict[str, Any] | None  # parsed; None when `raw_arguments` is not a JSON object


@dataclass(frozen=True)
class UserMessage:
    text: str


@dataclass(frozen=True)
class AssistantMessage:
    text: str = ""
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class ToolResult:
    call_id: str
    content: str
    is_error: bool = False


@dataclass(frozen=True)
class ToolResults:
    """The answer to every tool call of the previous assistant message, plus an optional note."""

    results: tuple[ToolResult, ...]
    note: str = ""


Message = UserMessage | AssistantMessage | ToolResults

# "auto": the model may answer in text; "required": some tool; any other value: that tool by name.
ToolChoice = str


@dataclass(frozen=True)
class ModelRequest:
    system: str
    messages: Sequence[Message]
    tools: Sequence[ToolSpec]
    tool_choice: ToolChoice
    max_tokens: int


Stop = Literal["end", "tool_use", "length", "other"]


@dataclass
class ModelReply:
    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    stop: Stop = "end"
    input_tokens: int | None = None  # as the provider reported them; None: it did not say
    output_tokens: int | None = None


OnDelta = Callable[[int], None]  # called with the number of characters each streamed delta carried


class ModelClient(Protocol):
    """One provider's adapter. `complete` opens its SDK client for the call and closes it (and any
    stream) before returning or raising, cancellation included."""

    provider: str
    model: str
    base_url: str | None  # None: the SDK's default endpoint

    async def complete(self, request: ModelRequest, on_delta: OnDelta) -> ModelReply: ...


def parse_arguments(raw: str) -> dict[str, Any] | None:
    try:
        value = json.loads(raw) if raw.strip() else {}
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


# --- errors ---

class KeyScrubber:
    """Removes the API key (and what `redact_secrets` removes) from a message."""

    def __init__(self, key: str) -> None:
        self._key = key

    def __call__(self, text: str) -> str:
        if self._key:
            text = text.replace(self._key, "***")
        return redact_secrets(text)

    def __repr__(self) -> str:
        return "KeyScrubber(***)"


def retry_after_s(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds the server asked us to wait: `retry-after-ms`, or `retry-after` as seconds or an HTTP date."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = (headers.get("retry-after") or "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def status_error(
    provider: str, status: int, headers: Mapping[str, str] | None, message: str, scrub: KeyScrubber
) -> GenloopError:
    """A provider's HTTP error status as a GenloopError of the right kind."""
    wait = retry_after_s(headers)
    if status in (401, 403):
        # The provider's text may quote part of the key ("sk-ab***yz"): leave it out altogether.
        return GenloopError(ErrorKind.AUTH_FAILED, f"{provider} refused the API key ({status})")
    detail = f"{provider} answered {status}: {scrub(message)[:500]}"
    if status == 429:
        return GenloopError(ErrorKind.RATE_LIMITED, detail, retry_after_s=wait)
    if status in (408, 409) or status >= 500:
        return GenloopError(ErrorKind.SERVICE_BUSY, detail, retry_after_s=wait)
    return GenloopError(ErrorKind.RUNNER_FAILED, detail)


def stream_error(provider: str, error_type: str, message: str, scrub: KeyScrubber) -> GenloopError:
    """An error event in the middle of a stream (the HTTP status was already 200)."""
    detail = f"{provider} stream failed ({error_type or 'error'}): {scrub(message)[:500]}"
    if "rate_limit" in error_type:
        return GenloopError(ErrorKind.RATE_LIMITED, detail)
    if error_type in ("authentication_error", "permission_error"):
        return GenloopError(ErrorKind.AUTH_FAILED, f"{provider} refused the API key mid-stream")
    if error_type in ("invalid_request_error", "not_found_error"):
        return GenloopError(ErrorKind.RUNNER_FAILED, detail)
    return GenloopError(ErrorKind.SERVICE_BUSY, detail)  # overloaded, api_error, unknown: a retry may help
