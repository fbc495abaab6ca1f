"""Adapter over the official `openai` SDK: Chat Completions with tools. With a base URL it speaks to
any OpenAI-compatible server (OpenAI, OpenRouter, vLLM, Ollama, llama.cpp's server, LM Studio), so it
sticks to what they all implement: `tools`, `tool_choice`, `stream` + `stream_options.include_usage`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import httpx2
import openai

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
    parse_arguments,
    status_error,
    stream_error,
)
from genloop.errors import ErrorKind, GenloopError, redact_secrets

_STOPS: dict[str | None, Stop] = {"stop": "end", "tool_calls": "tool_use", "function_call": "tool_use",
                                  "length": "length"}


class OpenAIClient:
    provider = "openai"

    def __init__(self, *, api_key: str, base_url: str, model: str, timeout_s: float, stream: bool = True) -> None:
        self.model = model
        self._api_key = api_key
        self.base_url = base_url or None  # None: the SDK's default (OPENAI_BASE_URL or api.openai.com)
        self._timeout_s = timeout_s
        self._stream = stream
        self._scrub = KeyScrubber(api_key)
        # OpenAI's own API wants max_completion_tokens (its reasoning models reject max_tokens); every
        # compatible server understands max_tokens, not all of them the newer name.
        host = urlsplit(base_url).hostname if base_url else "api.openai.com"
        self._max_tokens_param = "max_completion_tokens" if host == "api.openai.com" else "max_tokens"

    def __repr__(self) -> str:
        return f"OpenAIClient(base_url={redact_secrets(self.base_url or '')!r}, model={self.model!r})"

    async def complete(self, request: ModelRequest, on_delta: OnDelta) -> ModelReply:
        params: dict[str, Any] = {
            "model": self.model,
            "messages": _messages(request.system, request.messages),
            "tools": [
                {"type": "function", "function": {"name": t.name, "description": t.description,
                                                  "parameters": t.parameters}}
                for t in request.tools
            ],
            "tool_choice": _tool_choice(request.tool_choice),
            self._max_tokens_param: request.max_tokens,
        }
        try:
            # A client per call: its connection pool never outlives the call (or a cancel), and no
            # event loop is captured at construction.
            async with openai.AsyncOpenAI(api_key=self._api_key, base_url=self.base_url, max_retries=0,
                                          timeout=self._timeout_s) as client:
                if not self._stream:
                    completion = await client.chat.completions.create(**params)
                    return _from_completion(completion)
                stream = await client.chat.completions.create(
                    **params, stream=True, stream_options={"include_usage": True}
                )
                async with stream:
                    return await _from_stream(stream, on_delta)
        except openai.APIResponseValidationError as exc:
            detail = f"openai answer malformed: {self._scrub(exc.message)}"
            raise GenloopError(ErrorKind.RUNNER_FAILED, detail) from None
        except openai.APIStatusError as exc:
            raise status_error(self.provider, exc.status_code, exc.response.headers, exc.message, self._scrub) from None
        except openai.APITimeoutError:
            raise GenloopError(ErrorKind.SERVICE_BUSY, f"openai call timed out after {self._timeout_s:g}s") from None
        except openai.APIConnectionError as exc:
            raise GenloopError(ErrorKind.NETWORK, f"openai endpoint unreachable: {self._scrub(str(exc))}") from None
        except openai.APIError as exc:  # an error event inside a 200 stream
            kind = exc.type or (exc.body.get("type") if isinstance(exc.body, dict) else None) or "error"
            raise stream_error(self.provider, str(kind), exc.message, self._scrub) from None
        except httpx2.TimeoutException:  # raised as is by the SDK while it reads a stream
            raise GenloopError(ErrorKind.SERVICE_BUSY, f"openai call timed out after {self._timeout_s:g}s") from None
        except httpx2.TransportError as exc:
            raise GenloopError(ErrorKind.NETWORK, f"openai stream broke: {type(exc).__name__}") from None
        except openai.OpenAIError as exc:
            raise GenloopError(ErrorKind.RUNNER_FAILED, f"openai client: {self._scrub(str(exc))}") from None


def _tool_choice(choice: str) -> Any:
    if choice in ("auto", "required"):
        return choice
    return {"type": "function", "function": {"name": choice}}


def _messages(system: str, messages: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"role": "system", "content": system}]
    for message in messages:
        out.extend(_message(message))
    return out


def _message(message: Message) -> list[dict[str, Any]]:
    if isinstance(message, UserMessage):
        return [{"role": "user", "content": message.text}]
    if isinstance(message, AssistantMessage):
        entry: dict[str, Any] = {"role": "assistant", "content": message.text or None}
        if message.tool_calls:
            entry["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.raw_arguments}}
                for c in message.tool_calls
            ]
        return [entry]
    if isinstance(message, ToolResults):
        out: list[dict[str, Any]] = [
            {"role": "tool", "tool_call_id": r.call_id, "content": r.content} for r in message.results
        ]
        if message.note:
            out.append({"role": "user", "content": message.note})
        return out
    raise TypeError(f"unknown message {type(message).__name__}")


def _call(index: int, call_id: str | None, name: str | None, raw: str) -> ToolCall:
    raw = raw or "{}"
    return ToolCall(id=call_id or f"call_{index}", name=name or "", raw_arguments=raw, arguments=parse_arguments(raw))


def _from_completion(completion: Any) -> ModelReply:
    if not completion.choices:
        raise GenloopError(ErrorKind.RUNNER_FAILED, "openai answer has no choices")
    choice = completion.choices[0]
    message = choice.message
    calls = [
        _call(i, tc.id, tc.function.name, tc.function.arguments)
        for i, tc in enumerate(message.tool_calls or [])
        if getattr(tc, "function", None) is not None
    ]
    usage = completion.usage
    return ModelReply(
        text=message.content or "",
        tool_calls=calls,
        stop=_STOPS.get(choice.finish_reason, "other"),
        input_tokens=usage.prompt_tokens if usage else None,
        output_tokens=usage.completion_tokens if usage else None,
    )


async def _from_stream(stream: Any, on_delta: OnDelta) -> ModelReply:
    text: list[str] = []
    calls: dict[int, dict[str, Any]] = {}  # index -> id, name, argument fragments
    finish: str | None = None
    usage = None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices[:1] if chunk.choices else ():
            delta = choice.delta
            if choice.finish_reason:
                finish = choice.finish_reason
            if delta is None:
                continue
            if delta.content:
                text.append(delta.content)
                on_delta(len(delta.content))
            # Reasoning servers (vLLM, DeepSeek) stream thoughts outside `content`: they cost tokens too.
            thought = getattr(delta, "reasoning_content", None) or getattr(delta, "reasoning", None)
            if isinstance(thought, str) and thought:
                on_delta(len(thought))
            for tc in delta.tool_calls or ():
                # Some servers omit `index`; a fragment without an id continues the last call.
                index = tc.index if tc.index is not None else (
                    max(calls) if calls and not tc.id else len(calls)
                )
                entry = calls.setdefault(index, {"id": None, "name": None, "args": []})
                if tc.id:
                    entry["id"] = tc.id
                if tc.function is not None:
                    if tc.function.name:
                        entry["name"] = tc.function.name
                    if tc.function.arguments:
                        entry["args"].append(tc.function.arguments)
                        on_delta(len(tc.function.arguments))
    return ModelReply(
        text="".join(text),
        tool_calls=[_call(i, c["id"], c["name"], "".join(c["args"])) for i, c in sorted(calls.items())],
        stop=_STOPS.get(finish, "other"),
        input_tokens=usage.prompt_tokens if usage else None,
        output_tokens=usage.completion_tokens if usage else None,
    )
