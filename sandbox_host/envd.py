"""envd for every sandbox: the HTTP file API and the Process/Filesystem Connect services.

The SDK (sandbox_url mode) sends each envd request to the host with `E2b-Sandbox-Id`; app.py has
already checked that the sandbox exists and the access token matches. Here requests become agent
operations, and agent answers become what envd would have said.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import hashlib
import hmac
import re
import secrets
import tempfile
import time
import zlib
from collections.abc import AsyncIterator
from typing import IO, Any

from connectrpc.code import Code
from connectrpc.codec import proto_binary_codec, proto_json_codec
from connectrpc.errors import ConnectError
from e2b.envd.filesystem import filesystem_connect, filesystem_pb
from e2b.envd.process import process_connect, process_pb
from protobuf import Oneof
from protobuf.wkt import Timestamp
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from sandbox_host.agent_client import AgentCallError, AgentStream, AgentUnavailable
from sandbox_host.sandboxes import Sandbox, SandboxManager

SANDBOX_ID_HEADER = "e2b-sandbox-id"
SPOOL_IN_MEMORY_BYTES = 1024 * 1024
DEFAULT_KEEPALIVE_S = 50.0

_CONNECT_CODES = {
    "invalid_argument": Code.INVALID_ARGUMENT,
    "not_found": Code.NOT_FOUND,
    "already_exists": Code.ALREADY_EXISTS,
    "permission_denied": Code.PERMISSION_DENIED,
    "resource_exhausted": Code.RESOURCE_EXHAUSTED,
    "unimplemented": Code.UNIMPLEMENTED,
}
_HTTP_STATUS = {
    "invalid_argument": 400,
    "not_found": 404,
    "already_exists": 409,
    "permission_denied": 403,
    "resource_exhausted": 507,
    "unimplemented": 501,
}


def not_found_message(sandbox_id: str) -> str:
    # "was not found" is what the SDK looks for to raise SandboxNotRunningException.
    return f"The sandbox {sandbox_id} was not found"


def sandbox_gone_response(sandbox_id: str) -> JSONResponse:
    """What E2B's edge answers for a sandbox that does not exist (any more)."""
    return JSONResponse({"code": 502, "message": not_found_message(sandbox_id), "sandboxId": sandbox_id}, 502)


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status)


# ---------------------------------------------------------------------------------------- signed URLs
def _expected_signature(query, operation: str, token: str) -> str:
    """The SDK's v1 signature of a file URL (e2b/sandbox/signature.py, envd's generateSignature)."""
    path, user, expiration = query.get("path", ""), query.get("username", ""), query.get("signature_expiration")
    parts = [path, operation, user, token] + ([expiration] if expiration is not None else [])
    return "v1_" + base64.b64encode(hashlib.sha256(":".join(parts).encode()).digest()).rstrip(b"=").decode()


def _operation(method: str) -> str:
    return "read" if method == "GET" else "write"


def signature_error(query, method: str, token: str) -> str | None:
    """None when the file URL's signature is valid now; otherwise envd's message for it."""
    signature = query.get("signature")
    if not signature:
        return "missing signature query parameter"
    if not hmac.compare_digest(signature.encode(), _expected_signature(query, _operation(method), token).encode()):
        return "invalid signature"
    expiration = query.get("signature_expiration")
    if expiration is not None and (not expiration.isdigit() or int(expiration) < time.time()):
        return "signature is already expired"
    return None


def signed_sandbox_id(manager: SandboxManager, query, method: str) -> str | None:
    """The sandbox whose access token signed this file URL. With an explicit sandbox URL
    (`sandbox_url`, E2B_SANDBOX_URL) the SDK's download_url/upload_url name no sandbox, only the
    signature does: only that sandbox's token produces it."""
    if not query.get("signature"):
        return None
    operation = _operation(method)
    for sandbox in manager.list():
        expected = _expected_signature(query, operation, sandbox.record.access_token)
        if hmac.compare_digest(query["signature"].encode(), expected.encode()):
            return sandbox.sandbox_id
    return None


class UploadTooLarge(Exception):
    pass


# ---------------------------------------------------------------------------------------- codecs
class _StrictCodec:
    """A codec whose decode failures are the client's fault (INVALID_ARGUMENT), not a server error."""

    def __init__(self, inner):
        self._inner = inner

    def name(self) -> str:
        return self._inner.name()

    def encode(self, message) -> bytes:
        return self._inner.encode(message)

    def decode(self, data, message_class):
        try:
            return self._inner.decode(data, message_class)
        except ConnectError:
            raise
        except Exception as exc:
            raise ConnectError(Code.INVALID_ARGUMENT, f"malformed {message_class.__name__} message: {exc}") from None


CODECS = [_StrictCodec(proto_json_codec()), _StrictCodec(proto_binary_codec())]


# ---------------------------------------------------------------------------------------- helpers
class _Services:
    def __init__(self, manager: SandboxManager):
        self._manager = manager

    def sandbox(self, ctx) -> Sandbox:
        sandbox_id = ctx.request_headers.get(SANDBOX_ID_HEADER, "")
        sandbox = self._manager.get(sandbox_id)
        if sandbox is None or sandbox.agent is None:
            raise ConnectError(Code.UNAVAILABLE, not_found_message(sandbox_id))
        return sandbox

    async def call(self, sandbox: Sandbox, op: str, **fields: Any) -> dict[str, Any]:
        assert sandbox.agent is not None
        try:
            return await sandbox.agent.call(op, **fields)
        except AgentCallError as exc:
            raise ConnectError(_CONNECT_CODES.get(exc.code, Code.INTERNAL), exc.message) from None
        except AgentUnavailable:
            raise await self.gone_error(sandbox) from None

    async def open(self, sandbox: Sandbox, op: str, **fields: Any) -> AgentStream:
        assert sandbox.agent is not None
        try:
            return await sandbox.agent.open(op, **fields)
        except AgentUnavailable:
            raise await self.gone_error(sandbox) from None

    async def next_message(self, sandbox: Sandbox, stream: AgentStream, wait: float) -> dict[str, Any] | None:
        """The stream's next message; None when `wait` seconds pass without one (time for a keepalive).
        An agent error or the end of the stream is raised as the Connect error E2B's edge sends."""
        try:
            message = await asyncio.wait_for(stream.read_message(), wait)
        except TimeoutError:
            return None
        except AgentCallError as exc:
            raise ConnectError(_CONNECT_CODES.get(exc.code, Code.INTERNAL), exc.message) from None
        except (OSError, ValueError):
            message = None
        if message is None:
            raise await self.stream_ended_error(sandbox)
        return message

    async def stream_ended_error(self, sandbox: Sandbox) -> ConnectError:
        """A stream whose sandbox went away under it ends as E2B's edge ends it: UNAVAILABLE with a
        message that does not say why, so the SDK probes the sandbox's health (502 "not found" once it
        is gone) and raises SandboxNotRunningException "... reached its end of life while the request
        was in flight"."""
        error = await self.gone_error(sandbox)
        if not sandbox.gone.is_set():
            return error
        return ConnectError(
            Code.UNAVAILABLE, f"the connection to sandbox {sandbox.sandbox_id} ended before the stream completed"
        )

    @staticmethod
    async def gone_error(sandbox: Sandbox) -> ConnectError:
        # An agent that stops answering is almost always a sandbox being torn down: give the host a
        # moment to notice so the client gets the precise "not found" answer.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(sandbox.gone.wait(), 2)
        if sandbox.gone.is_set():
            return ConnectError(Code.UNAVAILABLE, not_found_message(sandbox.sandbox_id))
        return ConnectError(Code.UNAVAILABLE, f"the agent of sandbox {sandbox.sandbox_id} is not answering")


def _selector(selector: process_pb.ProcessSelector | None) -> dict[str, Any]:
    match selector.selector if selector is not None else None:
        case Oneof(field="pid", value=pid):
            return {"pid": pid}
        case Oneof(field="tag", value=tag):
            return {"tag": tag}
    raise ConnectError(Code.INVALID_ARGUMENT, "a process selector (pid or tag) is required")


def _process_event(event: dict[str, Any]) -> process_pb.ProcessEvent:
    kind = event["e"]
    if kind == "start":
        return process_pb.ProcessEvent(event=Oneof("start", process_pb.ProcessEvent.StartEvent(pid=event["pid"])))
    if kind in ("stdout", "stderr", "pty"):
        data = process_pb.ProcessEvent.DataEvent(output=Oneof(kind, base64.b64decode(event["d"])))
        return process_pb.ProcessEvent(event=Oneof("data", data))
    end = process_pb.ProcessEvent.EndEvent(
        exit_code=event["exit_code"], exited=event["exited"], status=event["status"], error=event.get("err")
    )
    return process_pb.ProcessEvent(event=Oneof("end", end))


def _keepalive_interval(ctx) -> float:
    try:
        return max(1.0, float(ctx.request_headers.get("keepalive-ping-interval", DEFAULT_KEEPALIVE_S)))
    except ValueError:
        return DEFAULT_KEEPALIVE_S


_FILE_TYPES = {"file": filesystem_pb.FileType.FILE, "dir": filesystem_pb.FileType.DIRECTORY}


def _entry(entry: dict[str, Any]) -> filesystem_pb.EntryInfo:
    file_type = _FILE_TYPES.get(entry["type"], filesystem_pb.FileType.UNSPECIFIED)
    return filesystem_pb.EntryInfo(
        name=entry["name"],
        type=file_type,
        path=entry["path"],
        size=entry["size"],
        mode=entry["mode"],
        permissions=entry["permissions"],
        owner=entry["owner"],
        group=entry["group"],
        modified_time=Timestamp.from_datetime(datetime.datetime.fromtimestamp(entry["mtime"], datetime.UTC)),
        symlink_target=entry["symlink_target"],
        is_symlink=entry["is_symlink"],
        metadata=entry.get("metadata") or {},
    )


# ---------------------------------------------------------------------------------------- process
class ProcessService(_Services, process_connect.Process):
    async def start(self, request: process_pb.StartRequest, ctx) -> AsyncIterator[process_pb.StartResponse]:
        sandbox = self.sandbox(ctx)
        config = request.process or process_pb.ProcessConfig()
        size = request.pty.size if request.pty is not None else None
        stream = await self.open(
            sandbox,
            "start",
            cmd=config.cmd,
            args=list(config.args),
            envs=dict(config.envs),
            cwd=config.cwd if config.has_field("cwd") else None,
            stdin=request.stdin if request.has_field("stdin") else True,
            tag=request.tag if request.has_field("tag") else None,
            timeout_ms=ctx.timeout_ms,
            pty=None if request.pty is None else {"rows": size.rows if size else 0, "cols": size.cols if size else 0},
        )
        async for event in self._relay(sandbox, stream, ctx):
            yield process_pb.StartResponse(event=event)

    async def connect(self, request: process_pb.ConnectRequest, ctx) -> AsyncIterator[process_pb.ConnectResponse]:
        sandbox = self.sandbox(ctx)
        stream = await self.open(sandbox, "connect", **_selector(request.process))
        async for event in self._relay(sandbox, stream, ctx):
            yield process_pb.ConnectResponse(event=event)

    async def _relay(self, sandbox: Sandbox, stream: AgentStream, ctx) -> AsyncIterator[process_pb.ProcessEvent]:
        keepalive = _keepalive_interval(ctx)
        try:
            while True:
                message = await self.next_message(sandbox, stream, keepalive)
                if message is None:
                    # Keepalives keep proxies from idling the stream out and let the server notice
                    # a client that left a quiet command.
                    yield process_pb.ProcessEvent(event=Oneof("keepalive", process_pb.ProcessEvent.KeepAlive()))
                    continue
                if message.get("deadline_exceeded"):
                    # As envd: the stream's deadline ended the process, and the stream with it.
                    raise ConnectError(Code.DEADLINE_EXCEEDED, "the command's deadline (Connect-Timeout-Ms) expired")
                yield _process_event(message)
                if message["e"] == "end":
                    return
        finally:
            await stream.close()

    async def list(self, request: process_pb.ListRequest, ctx) -> process_pb.ListResponse:
        reply = await self.call(self.sandbox(ctx), "list")
        return process_pb.ListResponse(
            processes=[
                process_pb.ProcessInfo(
                    pid=p["pid"],
                    tag=p["tag"],
                    config=process_pb.ProcessConfig(cmd=p["cmd"], args=p["args"], envs=p["envs"], cwd=p["cwd"]),
                )
                for p in reply["processes"]
            ]
        )

    async def send_signal(self, request: process_pb.SendSignalRequest, ctx) -> process_pb.SendSignalResponse:
        if request.signal not in (process_pb.Signal.SIGKILL, process_pb.Signal.SIGTERM):
            raise ConnectError(Code.INVALID_ARGUMENT, "signal must be SIGKILL or SIGTERM")
        await self.call(self.sandbox(ctx), "signal", signal=request.signal.value, **_selector(request.process))
        return process_pb.SendSignalResponse()

    async def send_input(self, request: process_pb.SendInputRequest, ctx) -> process_pb.SendInputResponse:
        await self._send_input(self.sandbox(ctx), request.process, request.input)
        return process_pb.SendInputResponse()

    async def _send_input(
        self, sandbox: Sandbox, selector: process_pb.ProcessSelector | None, data: process_pb.ProcessInput | None
    ) -> None:
        match data.input if data is not None else None:
            case Oneof(field="stdin" | "pty" as kind, value=raw):
                pass
            case _:
                raise ConnectError(Code.INVALID_ARGUMENT, "input must be stdin or pty data")
        fields = _selector(selector)
        await self.call(sandbox, "send_input", data=base64.b64encode(raw).decode(), pty=kind == "pty", **fields)

    async def stream_input(self, request: AsyncIterator[process_pb.StreamInputRequest], ctx):
        """Ordered input: a start event naming the process, then data events (and keepalives)."""
        sandbox = self.sandbox(ctx)
        selector = None
        async for message in request:
            match message.event:
                case Oneof(field="start", value=start):
                    selector = start.process
                    _selector(selector)
                case Oneof(field="data", value=data):
                    if selector is None:
                        raise ConnectError(Code.INVALID_ARGUMENT, "the input stream must start with a start event")
                    await self._send_input(sandbox, selector, data.input)
        return process_pb.StreamInputResponse()

    async def update(self, request: process_pb.UpdateRequest, ctx) -> process_pb.UpdateResponse:
        size = request.pty.size if request.pty is not None else None
        if size is None:
            raise ConnectError(Code.INVALID_ARGUMENT, "a PTY size is required")
        await self.call(self.sandbox(ctx), "resize", rows=size.rows, cols=size.cols, **_selector(request.process))
        return process_pb.UpdateResponse()

    async def close_stdin(self, request: process_pb.CloseStdinRequest, ctx) -> process_pb.CloseStdinResponse:
        await self.call(self.sandbox(ctx), "close_stdin", **_selector(request.process))
        return process_pb.CloseStdinResponse()


# ---------------------------------------------------------------------------------------- filesystem
MAX_WATCHERS_PER_SANDBOX = 64
# A polling watcher nobody polls must not grow without bound in the host's memory.
MAX_UNREAD_EVENTS = 65536
_EVENT_TYPES = {
    "create": filesystem_pb.EventType.CREATE,
    "write": filesystem_pb.EventType.WRITE,
    "remove": filesystem_pb.EventType.REMOVE,
    "rename": filesystem_pb.EventType.RENAME,
    "chmod": filesystem_pb.EventType.CHMOD,
}


def _fs_event(message: dict[str, Any]) -> filesystem_pb.FilesystemEvent:
    entry = message.get("entry")
    return filesystem_pb.FilesystemEvent(
        name=message["name"], type=_EVENT_TYPES[message["type"]], entry=_entry(entry) if entry else None
    )


class _Watcher:
    """A CreateWatcher watch: its agent stream, and the events nobody has fetched yet."""

    def __init__(self, sandbox_id: str, stream: AgentStream):
        self.sandbox_id = sandbox_id
        self.stream = stream
        self.events: list[filesystem_pb.FilesystemEvent] = []
        self.error: ConnectError | None = None
        self.task = asyncio.ensure_future(self._collect())

    async def _collect(self) -> None:
        try:
            while (message := await self.stream.read_message()) is not None:
                if len(self.events) >= MAX_UNREAD_EVENTS:
                    self.error = ConnectError(
                        Code.RESOURCE_EXHAUSTED, f"watcher error: more than {MAX_UNREAD_EVENTS} unread events"
                    )
                    await self.stream.close()
                    return
                self.events.append(_fs_event(message))
            self.error = ConnectError(Code.INTERNAL, "watcher event channel closed")
        except AgentCallError as exc:
            self.error = ConnectError(_CONNECT_CODES.get(exc.code, Code.INTERNAL), exc.message)
        except (OSError, ValueError):
            self.error = ConnectError(Code.INTERNAL, "watcher event channel closed")

    async def close(self) -> None:
        self.task.cancel()
        await self.stream.close()


class FilesystemService(_Services, filesystem_connect.Filesystem):
    def __init__(self, manager: SandboxManager):
        super().__init__(manager)
        self._watchers: dict[str, _Watcher] = {}

    async def _open_watch(self, sandbox: Sandbox, request) -> AgentStream:
        stream = await self.open(
            sandbox,
            "watch",
            path=request.path,
            recursive=request.recursive,
            include_entry=request.include_entry,
            allow_network_mounts=request.allow_network_mounts,
        )
        try:
            started = await stream.read_message()
        except AgentCallError as exc:
            await stream.close()
            raise ConnectError(_CONNECT_CODES.get(exc.code, Code.INTERNAL), exc.message) from None
        except (OSError, ValueError):
            started = None
        if started is None:
            await stream.close()
            raise await self.gone_error(sandbox)
        return stream

    async def watch_dir(
        self, request: filesystem_pb.WatchDirRequest, ctx
    ) -> AsyncIterator[filesystem_pb.WatchDirResponse]:
        sandbox = self.sandbox(ctx)
        stream = await self._open_watch(sandbox, request)
        keepalive = _keepalive_interval(ctx)
        timeout_ms = ctx.timeout_ms
        deadline = None if timeout_ms is None else asyncio.get_running_loop().time() + timeout_ms / 1000
        try:
            yield filesystem_pb.WatchDirResponse(event=Oneof("start", filesystem_pb.WatchDirResponse.StartEvent()))
            while True:
                wait = keepalive
                if deadline is not None:
                    wait = min(wait, deadline - asyncio.get_running_loop().time())
                    if wait <= 0:
                        raise ConnectError(Code.DEADLINE_EXCEEDED, "the watch's deadline (Connect-Timeout-Ms) expired")
                message = await self.next_message(sandbox, stream, wait)
                if message is None:
                    if deadline is None or asyncio.get_running_loop().time() < deadline:
                        keep = filesystem_pb.WatchDirResponse.KeepAlive()
                        yield filesystem_pb.WatchDirResponse(event=Oneof("keepalive", keep))
                    continue
                yield filesystem_pb.WatchDirResponse(event=Oneof("filesystem", _fs_event(message)))
        finally:
            await stream.close()

    async def create_watcher(
        self, request: filesystem_pb.CreateWatcherRequest, ctx
    ) -> filesystem_pb.CreateWatcherResponse:
        sandbox = self.sandbox(ctx)
        for watcher_id, watcher in list(self._watchers.items()):  # those of sandboxes that ended
            if self._manager.get(watcher.sandbox_id) is None:
                del self._watchers[watcher_id]
                await watcher.close()
        if sum(w.sandbox_id == sandbox.sandbox_id for w in self._watchers.values()) >= MAX_WATCHERS_PER_SANDBOX:
            raise ConnectError(
                Code.RESOURCE_EXHAUSTED, f"a sandbox may have at most {MAX_WATCHERS_PER_SANDBOX} watchers"
            )
        stream = await self._open_watch(sandbox, request)
        watcher_id = "w" + secrets.token_hex(10)
        self._watchers[watcher_id] = _Watcher(sandbox.sandbox_id, stream)
        return filesystem_pb.CreateWatcherResponse(watcher_id=watcher_id)

    def _watcher(self, sandbox: Sandbox, watcher_id: str) -> _Watcher:
        watcher = self._watchers.get(watcher_id)
        if watcher is None or watcher.sandbox_id != sandbox.sandbox_id:
            raise ConnectError(Code.NOT_FOUND, f"watcher with id {watcher_id} not found")
        return watcher

    async def get_watcher_events(
        self, request: filesystem_pb.GetWatcherEventsRequest, ctx
    ) -> filesystem_pb.GetWatcherEventsResponse:
        sandbox = self.sandbox(ctx)
        watcher = self._watcher(sandbox, request.watcher_id)
        if watcher.error is not None and not watcher.events:
            raise watcher.error
        events, watcher.events = watcher.events, []
        return filesystem_pb.GetWatcherEventsResponse(events=events)

    async def remove_watcher(
        self, request: filesystem_pb.RemoveWatcherRequest, ctx
    ) -> filesystem_pb.RemoveWatcherResponse:
        watcher = self._watcher(self.sandbox(ctx), request.watcher_id)
        del self._watchers[request.watcher_id]
        await watcher.close()
        return filesystem_pb.RemoveWatcherResponse()

    async def stat(self, request: filesystem_pb.StatRequest, ctx) -> filesystem_pb.StatResponse:
        reply = await self.call(self.sandbox(ctx), "stat", path=request.path)
        return filesystem_pb.StatResponse(entry=_entry(reply["entry"]))

    async def list_dir(self, request: filesystem_pb.ListDirRequest, ctx) -> filesystem_pb.ListDirResponse:
        reply = await self.call(self.sandbox(ctx), "list_dir", path=request.path, depth=request.depth or 1)
        return filesystem_pb.ListDirResponse(entries=[_entry(e) for e in reply["entries"]])

    async def make_dir(self, request: filesystem_pb.MakeDirRequest, ctx) -> filesystem_pb.MakeDirResponse:
        await self.call(self.sandbox(ctx), "make_dir", path=request.path)
        return filesystem_pb.MakeDirResponse()

    async def remove(self, request: filesystem_pb.RemoveRequest, ctx) -> filesystem_pb.RemoveResponse:
        await self.call(self.sandbox(ctx), "remove", path=request.path)
        return filesystem_pb.RemoveResponse()

    async def move(self, request: filesystem_pb.MoveRequest, ctx) -> filesystem_pb.MoveResponse:
        reply = await self.call(self.sandbox(ctx), "move", source=request.source, destination=request.destination)
        return filesystem_pb.MoveResponse(entry=_entry(reply["entry"]))


# ---------------------------------------------------------------------------------------- HTTP API
def _agent_error_response(exc: AgentCallError) -> JSONResponse:
    return error_response(_HTTP_STATUS.get(exc.code, 500), exc.message)


async def health(request: Request) -> Response:
    return Response(status_code=204)


async def read_file(request: Request, sandbox: Sandbox) -> Response:
    path = request.query_params.get("path")
    if not path:
        return error_response(400, "the path query parameter is required")
    assert sandbox.agent is not None
    try:
        stream = await sandbox.agent.open("read", path=path)
        header = await stream.read_message()
    except AgentCallError as exc:
        return _agent_error_response(exc)
    except (AgentUnavailable, OSError):
        return sandbox_gone_response(sandbox.sandbox_id)
    if header is None:
        await stream.close()
        return sandbox_gone_response(sandbox.sandbox_id)

    async def body() -> AsyncIterator[bytes]:
        remaining = header["size"]
        try:
            while remaining:
                chunk = await stream.reader.read(min(remaining, 65536))
                if not chunk:
                    return
                remaining -= len(chunk)
                yield chunk
        finally:
            await stream.close()

    filename = path.rsplit("/", 1)[-1]
    return StreamingResponse(
        body(),
        media_type="application/octet-stream",
        headers={"content-length": str(header["size"]), "content-disposition": f'attachment; filename="{filename}"'},
    )


class _Spool:
    """An upload body on its way to the agent: in memory when small, on disk when not."""

    def __init__(self, path: str, file: IO[bytes], size: int):
        self.path = path
        self.file = file
        self.size = size


async def _spool_body(request: Request, limit: int) -> _Spool:
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY_BYTES)
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding not in ("identity", "gzip"):
        raise ValueError(f"unsupported content-encoding {encoding!r}")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding == "gzip" else None
    size = 0
    async for chunk in request.stream():
        if inflater is not None:
            try:
                # Bounded decompression: a small gzip bomb must not inflate past the limit.
                chunk = inflater.decompress(chunk, limit + 1 - size)
            except zlib.error as exc:
                raise ValueError(f"invalid gzip body: {exc}") from None
        size += len(chunk)
        if size > limit:
            raise UploadTooLarge()
        await asyncio.to_thread(spool.write, chunk)
    spool.seek(0)
    return _Spool(request.query_params.get("path", ""), spool, size)


async def _spool_multipart(request: Request) -> list[_Spool]:
    form = await request.form(max_files=10_000, max_fields=10_000)
    spools = []
    default_path = request.query_params.get("path")
    uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
    for upload in uploads:
        # Like envd: the query's path names a single uploaded file, otherwise each part's filename.
        path = default_path if default_path and len(uploads) == 1 else (upload.filename or "")
        spools.append(_Spool(path, upload.file, upload.size or 0))
    return spools


METADATA_HEADER_PREFIX = "x-metadata-"
_METADATA_KEY = re.compile(r"\A[a-z0-9!#$%&'*+\-.^_`|~]+\Z")
_METADATA_VALUE = re.compile(r"\A[\x20-\x7e]*\Z")


def upload_metadata(request: Request) -> dict[str, str]:
    """The upload's `X-Metadata-<key>` headers (envd 0.6.2): keys lowercased, the first value of each."""
    metadata: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()[len(METADATA_HEADER_PREFIX) :] if name.lower().startswith(METADATA_HEADER_PREFIX) else ""
        if not key or key in metadata:
            continue
        if not _METADATA_KEY.match(key) or not _METADATA_VALUE.match(value):
            raise ValueError(f"invalid metadata {key!r}: keys are HTTP tokens, values printable US-ASCII")
        metadata[key] = value
    return metadata


async def write_files(request: Request, sandbox: Sandbox, max_upload_bytes: int) -> Response:
    try:
        metadata = upload_metadata(request)
    except ValueError as exc:
        return error_response(400, str(exc))
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_upload_bytes:
        return error_response(413, f"upload exceeds the limit of {max_upload_bytes} bytes")
    content_type = request.headers.get("content-type", "")
    try:
        if content_type.startswith("multipart/form-data"):
            spools = await _spool_multipart(request)
        else:
            spools = [await _spool_body(request, max_upload_bytes)]
    except UploadTooLarge:
        return error_response(413, f"upload exceeds the limit of {max_upload_bytes} bytes")
    except (MultiPartException, HTTPException, ValueError, KeyError) as exc:
        return error_response(400, f"malformed upload: {getattr(exc, 'detail', exc)}")
    try:
        if not spools:
            return error_response(400, "the upload contains no file")
        if any(not s.path for s in spools):
            return error_response(400, "every uploaded file needs a path")
        return await _send_spools(sandbox, spools, metadata)
    finally:
        for spool in spools:
            spool.file.close()


async def _send_spools(sandbox: Sandbox, spools: list[_Spool], metadata: dict[str, str]) -> Response:
    assert sandbox.agent is not None
    try:
        await sandbox.agent.call("check_writable", paths=[s.path for s in spools])
        written = []
        for spool in spools:
            stream = await sandbox.agent.open("write", path=spool.path, size=spool.size, metadata=metadata)
            try:
                while chunk := await asyncio.to_thread(spool.file.read, 65536):
                    await stream.write(chunk)
                reply = await stream.read_message()
            finally:
                await stream.close()
            if reply is None:
                return sandbox_gone_response(sandbox.sandbox_id)
            entry = reply["entry"]
            written.append(
                {
                    "name": entry["name"],
                    "type": entry["type"],
                    "path": entry["path"],
                    "metadata": entry["metadata"] or None,
                }
            )
    except AgentCallError as exc:
        return _agent_error_response(exc)
    except (AgentUnavailable, OSError):
        return sandbox_gone_response(sandbox.sandbox_id)
    return JSONResponse(written)


def build_connect_apps(manager: SandboxManager) -> dict[str, Any]:
    return {
        "/process.Process/": process_connect.ProcessASGIApplication(ProcessService(manager), codecs=CODECS),
        "/filesystem.Filesystem/": filesystem_connect.FilesystemASGIApplication(
            FilesystemService(manager), codecs=CODECS
        ),
    }
