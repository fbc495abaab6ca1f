"""Adapter over the official `anthropic` SDK: the Messages API with tools, streamed with
`client.messages.stream(...)`."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx2

from activities.runners.providers.base import (
    AssistantMessage,
    KeyScrubber,
    Message,
    ModelReply,
    ModelRequest,
    OnDelta,
    Stop,
    ToolCall,
    ToolResults,
    UserMessage,
    status_error,
    stream_error,
)
from genloop.errors import ErrorKind, GenloopError, redact_secrets

_STOPS: dict[str | None, Stop] = {
    "end_turn": "end", "stop_sequence": "end", "tool_use": "tool_use", "max_tokens": "length",
    "model_context_window_exceeded": "length",
}


class AnthropicClient:
    provider = "anthropic"

    def __init__(self, *, api_key: str, base_url: str, model: str, timeout_s: float, stream: bool = True) -> None:
        self.model = model
        self._api_key = api_key
        self.base_url = base_url or None  # None: the SDK's default (ANTHROPIC_BASE_URL or api.anthropic.com)
        self._timeout_s = timeout_s
        self._stream = stream
        self._scrub = KeyScrubber(api_key)

    def __repr__(self) -> str:
        return f"AnthropicClient(base_url={redact_secrets(self.base_url or '')!r}, model={self.model!r})"

    async def complete(self, request: ModelRequest, on_delta: OnDelta) -> ModelReply:
        params: dict[str, Any] = {
            "model": self.model,
            "system": request.system,
            "messages": [_message(m) for m in request.messages],
            "tools": [{"name": t.name, "description": t.description, "input_schema": t.parameters}
                      for t in request.tools],
            "tool_choice": _tool_choice(request.tool_choice),
            "max_tokens": request.max_tokens,
        }
        try:
            # A client per call: its connection pool never outlives the call (or a cancel).
            async with anthropic.AsyncAnthropic(api_key=self._api_key, base_url=self.base_url, max_retries=0,
                                                timeout=self._timeout_s) as client:
                if not self._stream:
                    return _from_message(await client.messages.create(**params))
                async with client.messages.stream(**params) as stream:
                    async for event in stream:
                        if event.type == "content_block_delta":
                            delta = event.delta
                            if delta.type == "text_delta":
                                on_delta(len(delta.text))
                            elif delta.type == "input_json_delta":
                                on_delta(len(delta.partial_json))
                            elif delta.type == "thinking_delta":
                                on_delta(len(delta.thinking))
                    return _from_message(await stream.get_final_message())
        except anthropic.APIResponseValidationError as exc:
            detail = f"anthropic answer malformed: {self._scrub(exc.message)}"
            raise GenloopError(ErrorKind.RUNNER_FAILED, detail) from None
        except anthropic.APIStatusError as exc:
            message = exc.api_message or exc.message
            if exc.status_code < 400:  # an error event inside a 200 stream
                raise stream_error(self.provider, str(exc.type or ""), message, self._scrub) from None
            raise status_error(self.provider, exc.status_code, exc.response.headers, message, self._scrub) from None
        except anthropic.APITimeoutError:
            raise GenloopError(ErrorKind.SERVICE_BUSY, f"anthropic call timed out after {self._timeout_s:g}s") from None
        except anthropic.APIConnectionError as exc:
            raise GenloopError(ErrorKind.NETWORK, f"anthropic endpoint unreachable: {self._scrub(str(exc))}") from None
        except httpx2.TimeoutException:  # raised as is by the SDK while it reads a stream
            raise GenloopError(ErrorKind.SERVICE_BUSY, f"anthropic call timed out after {self._timeout_s:g}s") from None
        except httpx2.TransportError as exc:
            raise GenloopError(ErrorKind.NETWORK, f"anthropic stream broke: {type(exc).__name__}") from None
        except anthropic.AnthropicError as exc:
            raise GenloopError(ErrorKind.RUNNER_FAILED, f"anthropic client: {self._scrub(str(exc))}") from None
        except ValueError as exc:  # the SDK's stream accumulator could not parse a tool call's JSON
            detail = f"anthropic tool arguments are not JSON: {self._scrub(str(exc))[:300]}"
            raise GenloopError(ErrorKind.RUNNER_FAILED, detail) from None


def _tool_choice(choice: str) -> dict[str, str]:
    if choice == "auto":
        return {"type": "auto"}
    if choice == "required":
        return {"type": "any"}
    return {"type": "tool", "name": choice}


def _message(message: Message) -> dict[str, Any]:
    if isinstance(message, UserMessage):
        return {"role": "user", "content": message.text}
    if isinstance(message, AssistantMessage):
        blocks: list[dict[str, Any]] = []
        if message.text.strip():  # the API rejects empty text blocks
            blocks.append({"type": "text", "text": message.text})
        blocks += [{"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments or {}}
                   for c in message.tool_calls]
        return {"role": "assistant", "content": blocks}
    if isinstance(message, ToolResults):
        results: list[dict[str, Any]] = [
            {"type": "tool_result", "tool_use_id": r.call_id, "content": r.content, "is_error": r.is_error}
            for r in message.results
        ]
        if message.note:
            results.append({"type": "text", "text": message.note})
        return {"role": "user", "content": results}
    raise TypeError(f"unknown message {type(message).__name__}")


def _from_message(message: Any) -> ModelReply:
    text: list[str] = []
    calls: list[ToolCall] = []
    for block in message.content:
        if block.type == "text":
            text.append(block.text)
        elif block.type == "tool_use":
            arguments = block.input if isinstance(block.input, dict) else None
            calls.append(ToolCall(id=block.id, name=block.name, raw_arguments=json.dumps(block.input),
                                  arguments=arguments))
    usage = message.usage
    cached = (getattr(usage, "cache_creation_input_tokens", None) or 0) + (
        getattr(usage, "cache_read_input_tokens", None) or 0
    )
    return ModelReply(
        text="".join(text),
        tool_calls=calls,
        stop=_STOPS.get(message.stop_reason, "other"),
        input_tokens=usage.input_tokens + cached,
        output_tokens=usage.output_tokens,
    )
