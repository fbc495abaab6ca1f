"""Test doubles for model providers: real HTTP servers that speak each wire protocol the way the
official SDKs expect it, answering from a per-test script.

- `FakeOpenAIServer`: `POST /v1/chat/completions`, plain JSON or (`"stream": true`) SSE chunks with
  `delta.tool_calls` fragments and, with `stream_options.include_usage`, a final usage chunk.
- `FakeAnthropicServer`: `POST /v1/messages`, plain JSON or SSE (`message_start`, `content_block_*`
  with `input_json_delta` partial JSON, `message_delta` with `stop_reason` and usage, `message_stop`).

In a test:

    async with FakeOpenAIServer(write_files({"app.py": "..."}), text("hi")) as server:
        runner = LLMRunner.for_endpoint(provider=server.provider, base_url=server.base_url, api_key="k")
        ...
        server.requests[0].body["tools"]

Each scripted answer is used once, in order: `write_files(...)`, `edit_file(...)`, `text(...)`,
`tool_calls(...)` (several calls in one answer), `error(status, retry_after=...)`, `slow(...)`; add
more with `server.script(...)`. When the script runs out the server answers `default` (None: a 400 that
fails the test's build permanently, never a retry loop). `server.env()` is the GENLOOP_RUNNER_* variables
that point a worker's LLM runner at the server. From another process: `python -m
tests.helpers.fake_models openai --port 8765` serves until killed; script it with `POST /_fake/script`
(`{"replies": [reply_to_json(r), ...]}`) and read what it saw with `GET /_fake/requests`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

FAKE_MODEL = "fake-model"
FAKE_KEY = "sk-fake-model-key"


# --- the script ---

@dataclass
class ToolUse:
    name: str
    arguments: dict[str, Any] | str  # a str is sent verbatim (malformed JSON for tests)

    @property
    def raw(self) -> str:
        return self.arguments if isinstance(self.arguments, str) else json.dumps(self.arguments)


@dataclass
class Reply:
    """One scripted model answer: text and/or tool calls."""

    text: str = ""
    tool_uses: list[ToolUse] = field(default_factory=list)
    cut_off: bool = False  # ends with finish_reason "length" / stop_reason "max_tokens", output half-sent
    input_tokens: int | None = None  # None: about the request's characters / 4
    output_tokens: int | None = None  # None: about the answer's characters / 4
    chunk_chars: int = 64  # streamed in pieces of this many characters
    stall_s: float = 0.0  # after the first piece, hold the answer this long (cancel tests)


@dataclass
class ErrorReply:
    """An HTTP error in the provider's own error format."""

    status: int
    message: str = "scripted error"
    headers: dict[str, str] = field(default_factory=dict)
    error_type: str = ""  # empty: the provider's usual type for the status


ScriptItem = Reply | ErrorReply


def write_files(files: Mapping[str, str], delete: Iterable[str] = (), summary: str = "Wrote the files.") -> Reply:
    args = {"files": [{"path": p, "content": c} for p, c in files.items()], "delete": list(delete), "summary": summary}
    return Reply(tool_uses=[ToolUse("write_files", args)])


def edit_file(path: str, old: str, new: str) -> Reply:
    return Reply(tool_uses=[ToolUse("edit_file", {"path": path, "old": old, "new": new})])


def tool_calls(*replies: Reply, text: str = "") -> Reply:
    """Several tool calls in one answer, e.g. tool_calls(edit_file(...), edit_file(...))."""
    return Reply(text=text, tool_uses=[u for r in replies for u in r.tool_uses])


def text(answer: str) -> Reply:
    return Reply(text=answer)


def error(status: int, *, retry_after: str | float | None = None, message: str = "scripted error",
          error_type: str = "") -> ErrorReply:
    headers = {} if retry_after is None else {"retry-after": str(retry_after)}
    return ErrorReply(status=status, message=message, headers=headers, error_type=error_type)


def slow(reply: Reply | None = None, stall_s: float = 60.0) -> Reply:
    """An answer that starts streaming, then stalls for `stall_s` before the rest."""
    base = reply or write_files({"app.py": "print('slow')\n" * 50})
    return Reply(**{**asdict(base), "tool_uses": base.tool_uses, "stall_s": stall_s, "chunk_chars": 16})


def reply_to_json(item: ScriptItem) -> dict[str, Any]:
    return {"kind": "error" if isinstance(item, ErrorReply) else "reply", **asdict(item)}


def reply_from_json(data: Mapping[str, Any]) -> ScriptItem:
    data = dict(data)
    kind = data.pop("kind", "reply")
    if kind == "error":
        return ErrorReply(**data)
    uses = [ToolUse(**u) for u in data.pop("tool_uses", [])]
    return Reply(tool_uses=uses, **data)


@dataclass
class RecordedRequest:
    path: str
    headers: dict[str, str]  # lower-case names
    body: dict[str, Any]

    @property
    def key(self) -> str:
        """The credential the client sent (x-api-key, or the bearer token)."""
        auth = self.headers.get("authorization", "")
        return self.headers.get("x-api-key") or (auth[7:] if auth.lower().startswith("bearer ") else "")

    @property
    def streaming(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def max_tokens(self) -> int | None:
        return self.body.get("max_tokens") or self.body.get("max_completion_tokens")

    @property
    def tool_names(self) -> list[str]:
        return [t.get("function", t).get("name") for t in self.body.get("tools", [])]

    @property
    def forced_tool(self) -> str | None:
        """The tool the request forces: a name, "any" for any tool (OpenAI "required"), None for none."""
        choice = self.body.get("tool_choice")
        if choice in ("required", {"type": "any"}):
            return "any"
        if isinstance(choice, dict):
            return choice.get("name") or (choice.get("function") or {}).get("name")
        return None

    def texts(self) -> list[str]:
        """Every piece of text the request carries (system, messages, tool results), in order."""
        out: list[str] = []
        system = self.body.get("system")
        if isinstance(system, str):
            out.append(system)
        for message in self.body.get("messages", []):
            content = message.get("content")
            if isinstance(content, str):
                out.append(content)
            for block in content if isinstance(content, list) else []:
                if isinstance(block.get("text"), str):
                    out.append(block["text"])
                if isinstance(block.get("content"), str):
                    out.append(block["content"])
        return out

    def tool_results(self) -> list[tuple[str, bool | None]]:
        """(content, is_error) of every tool result sent back to the model (is_error None: OpenAI has none)."""
        out: list[tuple[str, bool | None]] = []
        for message in self.body.get("messages", []):
            if message.get("role") == "tool":
                out.append((message.get("content", ""), None))
            content = message.get("content")
            for block in content if isinstance(content, list) else []:
                if block.get("type") == "tool_result":
                    out.append((block.get("content", ""), block.get("is_error")))
        return out


# --- the servers ---

class FakeModelServer:
    """Base of the provider fakes: a uvicorn server on 127.0.0.1 (a free port unless given), started
    and stopped as an async context manager. `api_key`, when set, is the only key accepted (401 else)."""

    provider: ClassVar[str]
    route: ClassVar[str]

    def __init__(self, *replies: ScriptItem, default: ScriptItem | None = None, api_key: str | None = None,
                 port: int = 0) -> None:
        self.queue: deque[ScriptItem] = deque(replies)
        self.default = default
        self.api_key = api_key
        self.port = port
        self.requests: list[RecordedRequest] = []
        self.streams_closed_early = 0  # answers the client hung up on before they were complete
        self._closed_early: asyncio.Event | None = None
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._counter = 0

    # scripting
    def script(self, *replies: ScriptItem) -> None:
        self.queue.extend(replies)

    def reset(self) -> None:
        """Forget the script and what was seen (a server shared by several tests)."""
        self.queue.clear()
        self.requests.clear()
        self.default = None
        self.streams_closed_early = 0
        if self._closed_early is not None:
            self._closed_early = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """What the provider's SDK (and GENLOOP_RUNNER_LLM_BASE_URL) takes as its base URL."""
        return self.url

    def env(self, *, model: str = FAKE_MODEL, api_key: str = FAKE_KEY) -> dict[str, str]:
        """Environment that makes genloop's settings use the LLM runner against this server."""
        return {
            "GENLOOP_RUNNER_KIND": "llm",
            "GENLOOP_RUNNER_LLM_PROVIDER": self.provider,
            "GENLOOP_RUNNER_LLM_BASE_URL": self.base_url,
            "GENLOOP_RUNNER_LLM_MODEL": model,
            "GENLOOP_RUNNER_LLM_API_KEY": api_key,
        }

    async def wait_closed_early(self, timeout: float = 5.0) -> None:
        """Until a client has hung up on an answer in progress (cancel tests)."""
        assert self._closed_early is not None, "server not started"
        await asyncio.wait_for(self._closed_early.wait(), timeout)

    # lifecycle
    async def __aenter__(self) -> FakeModelServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if not self.port:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
        self._closed_early = asyncio.Event()
        config = uvicorn.Config(self.app(), host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="off", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                await self._task  # raises why it could not start
                raise RuntimeError("fake model server exited at start")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
            self._server = self._task = None

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route(self.route, self._handle, methods=["POST"]),
            Route("/_fake/script", self._control_script, methods=["POST"]),
            Route("/_fake/requests", self._control_requests, methods=["GET"]),
        ])

    # control routes (scripting from another process)
    async def _control_script(self, request: Request) -> JSONResponse:
        body = await request.json()
        if body.get("reset"):
            self.reset()
        self.script(*(reply_from_json(r) for r in body.get("replies", [])))
        if "default" in body:
            self.default = reply_from_json(body["default"]) if body["default"] else None
        return JSONResponse({"queued": len(self.queue)})

    async def _control_requests(self, request: Request) -> JSONResponse:
        return JSONResponse({"requests": [asdict(r) for r in self.requests],
                             "streams_closed_early": self.streams_closed_early})

    # the model endpoint
    async def _handle(self, request: Request) -> Response:
        raw = await request.body()
        body = json.loads(raw)
        recorded = RecordedRequest(request.url.path, {k.lower(): v for k, v in request.headers.items()}, body)
        self.requests.append(recorded)
        if self.api_key is not None and recorded.key != self.api_key:
            return self._error(ErrorReply(401, "invalid x-api-key"))
        item = self.queue.popleft() if self.queue else self.default
        if item is None:
            return self._error(ErrorReply(400, "fake model server: the script has no reply left"))
        if isinstance(item, ErrorReply):
            return self._error(item)
        self._counter += 1
        usage_in = item.input_tokens if item.input_tokens is not None else len(raw) // 4 + 1
        model = str(body.get("model", FAKE_MODEL))
        if body.get("stream"):
            return _Stream(self, self._events(item, model, usage_in, body), item)
        if item.stall_s:
            return _Stream(self, [json.dumps(self._message(item, model, usage_in)).encode()], item,
                           media_type="application/json")
        return JSONResponse(self._message(item, model, usage_in))

    def _error(self, item: ErrorReply) -> Response:
        raise NotImplementedError

    def _message(self, reply: Reply, model: str, usage_in: int) -> dict[str, Any]:
        raise NotImplementedError

    def _events(self, reply: Reply, model: str, usage_in: int, body: Mapping[str, Any]) -> list[bytes]:
        raise NotImplementedError

    def _note_closed_early(self) -> None:
        self.streams_closed_early += 1
        if self._closed_early is not None:
            self._closed_early.set()


def _pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), max(1, size))]


def _cut(reply: Reply) -> tuple[str, list[tuple[ToolUse, str]]]:
    """The text and each call's argument text as sent: a cut-off answer stops halfway."""
    parts = [(u, u.raw) for u in reply.tool_uses]
    if not reply.cut_off:
        return reply.text, parts
    if parts:
        last, raw = parts[-1]
        return reply.text, [*parts[:-1], (last, raw[: max(1, len(raw) // 2)])]
    return reply.text[: max(1, len(reply.text) // 2)], []


def _output_tokens(reply: Reply, sent_text: str, parts: list[tuple[ToolUse, str]]) -> int:
    if reply.output_tokens is not None:
        return reply.output_tokens
    return (len(sent_text) + sum(len(raw) for _, raw in parts)) // 4 + 1


class FakeOpenAIServer(FakeModelServer):
    """OpenAI Chat Completions (and every compatible server's dialect of it)."""

    provider = "openai"
    route = "/v1/chat/completions"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"  # the OpenAI SDK's base URL includes /v1

    def _error(self, item: ErrorReply) -> Response:
        default_type = {400: "invalid_request_error", 401: "invalid_api_key", 403: "permission_denied",
                        404: "not_found", 429: "rate_limit_exceeded"}.get(item.status, "server_error")
        body = {"error": {"message": item.message, "type": item.error_type or default_type, "param": None,
                          "code": None}}
        return JSONResponse(body, status_code=item.status, headers=item.headers)

    def _finish(self, reply: Reply) -> str:
        return "length" if reply.cut_off else "tool_calls" if reply.tool_uses else "stop"

    def _message(self, reply: Reply, model: str, usage_in: int) -> dict[str, Any]:
        sent_text, parts = _cut(reply)
        message: dict[str, Any] = {"role": "assistant", "content": sent_text or None}
        if parts:
            message["tool_calls"] = [
                {"id": f"call_{self._counter}_{i}", "type": "function", "function": {"name": u.name, "arguments": raw}}
                for i, (u, raw) in enumerate(parts)
            ]
        out = _output_tokens(reply, sent_text, parts)
        return {
            "id": f"chatcmpl-{self._counter}", "object": "chat.completion", "created": 1700000000, "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": self._finish(reply), "logprobs": None}],
            "usage": {"prompt_tokens": usage_in, "completion_tokens": out, "total_tokens": usage_in + out},
        }

    def _events(self, reply: Reply, model: str, usage_in: int, body: Mapping[str, Any]) -> list[bytes]:
        sent_text, parts = _cut(reply)
        base = {"id": f"chatcmpl-{self._counter}", "object": "chat.completion.chunk", "created": 1700000000,
                "model": model}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            data = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            return f"data: {json.dumps(data)}\n\n".encode()

        events = [chunk({"role": "assistant", "content": ""})]
        events += [chunk({"content": piece}) for piece in _pieces(sent_text, reply.chunk_chars)]
        for i, (use, raw) in enumerate(parts):
            events.append(chunk({"tool_calls": [{"index": i, "id": f"call_{self._counter}_{i}", "type": "function",
                                                 "function": {"name": use.name, "arguments": ""}}]}))
            events += [chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
                       for piece in _pieces(raw, reply.chunk_chars)]
        events.append(chunk({}, self._finish(reply)))
        if (body.get("stream_options") or {}).get("include_usage"):
            out = _output_tokens(reply, sent_text, parts)
            usage = {"prompt_tokens": usage_in, "completion_tokens": out, "total_tokens": usage_in + out}
            events.append(f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n".encode())
        events.append(b"data: [DONE]\n\n")
        return events


class FakeAnthropicServer(FakeModelServer):
    """Anthropic Messages."""

    provider = "anthropic"
    route = "/v1/messages"

    def _error(self, item: ErrorReply) -> Response:
        default_type = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                        404: "not_found_error", 429: "rate_limit_error", 529: "overloaded_error"}.get(
            item.status, "api_error")
        body = {"type": "error", "error": {"type": item.error_type or default_type, "message": item.message}}
        return JSONResponse(body, status_code=item.status, headers=item.headers)

    def _stop(self, reply: Reply) -> str:
        return "max_tokens" if reply.cut_off else "tool_use" if reply.tool_uses else "end_turn"

    def _blocks(self, reply: Reply) -> tuple[str, list[tuple[ToolUse, str]], list[dict[str, Any]]]:
        sent_text, parts = _cut(reply)
        blocks: list[dict[str, Any]] = [{"type": "text", "text": sent_text}] if sent_text else []
        for i, (use, raw) in enumerate(parts):
            try:
                value = json.loads(raw)
            except ValueError:
                value = {}
            blocks.append({"type": "tool_use", "id": f"toolu_{self._counter}_{i}", "name": use.name, "input": value})
        return sent_text, parts, blocks

    def _message(self, reply: Reply, model: str, usage_in: int) -> dict[str, Any]:
        sent_text, parts, blocks = self._blocks(reply)
        return {
            "id": f"msg_{self._counter}", "type": "message", "role": "assistant", "model": model, "content": blocks,
            "stop_reason": self._stop(reply), "stop_sequence": None,
            "usage": {"input_tokens": usage_in, "output_tokens": _output_tokens(reply, sent_text, parts)},
        }

    def _events(self, reply: Reply, model: str, usage_in: int, body: Mapping[str, Any]) -> list[bytes]:
        sent_text, parts, _ = self._blocks(reply)

        def event(name: str, data: dict[str, Any]) -> bytes:
            return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode()

        events = [
            event("message_start", {"message": {
                "id": f"msg_{self._counter}", "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": usage_in, "output_tokens": 1},
            }}),
            event("ping", {}),
        ]
        index = 0
        if sent_text:
            events.append(event("content_block_start", {"index": index, "content_block": {"type": "text", "text": ""}}))
            events += [event("content_block_delta", {"index": index, "delta": {"type": "text_delta", "text": piece}})
                       for piece in _pieces(sent_text, reply.chunk_chars)]
            events.append(event("content_block_stop", {"index": index}))
            index += 1
        for i, (use, raw) in enumerate(parts):
            start = {"type": "tool_use", "id": f"toolu_{self._counter}_{i}", "name": use.name, "input": {}}
            events.append(event("content_block_start", {"index": index, "content_block": start}))
            events += [event("content_block_delta", {"index": index,
                                                     "delta": {"type": "input_json_delta", "partial_json": piece}})
                       for piece in _pieces(raw, reply.chunk_chars)]
            events.append(event("content_block_stop", {"index": index}))
            index += 1
        out = _output_tokens(reply, sent_text, parts)
        events.append(event("message_delta", {"delta": {"stop_reason": self._stop(reply), "stop_sequence": None},
                                              "usage": {"output_tokens": out}}))
        events.append(event("message_stop", {}))
        return events


class _Stream(Response):
    """Sends the pieces of an answer, stalling after the first one when the script says so, and
    notices a client that hangs up (the cancel tests assert the server saw it)."""

    def __init__(self, server: FakeModelServer, pieces: list[bytes], reply: Reply,
                 media_type: str = "text/event-stream") -> None:
        # Not Response.__init__: it would announce content-length 0 for the empty body.
        self.status_code = 200
        self.background = None
        self.media_type = media_type
        self.init_headers({"cache-control": "no-cache"})
        self.server = server
        self.pieces = pieces
        self.reply = reply

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hung_up = asyncio.ensure_future(_disconnected(receive))
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            for i, piece in enumerate(self.pieces):
                if hung_up.done():
                    self.server._note_closed_early()
                    return
                await send({"type": "http.response.body", "body": piece, "more_body": True})
                if i == 0 and self.reply.stall_s:
                    await asyncio.wait({hung_up}, timeout=self.reply.stall_s)
                await asyncio.sleep(0)
            if hung_up.done():
                self.server._note_closed_early()
                return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            self.server._note_closed_early()
        finally:
            hung_up.cancel()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


SERVERS: dict[str, type[FakeModelServer]] = {"openai": FakeOpenAIServer, "anthropic": FakeAnthropicServer}


async def _serve_forever(provider: str, port: int, script: str | None) -> None:
    server = SERVERS[provider](port=port)
    if script:
        with open(script) as f:
            data = json.load(f)
        server.script(*(reply_from_json(r) for r in data.get("replies", [])))
        if data.get("default"):
            server.default = reply_from_json(data["default"])
    async with server:
        print(f"FAKE_MODEL_BASE_URL={server.base_url}", flush=True)
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a scripted fake model provider (test double).")
    parser.add_argument("provider", choices=sorted(SERVERS))
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--script", help='JSON file: {"replies": [...], "default": {...}}')
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve_forever(args.provider, args.port, args.script))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
