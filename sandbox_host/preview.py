"""Preview proxy: `http://{port}-{sandbox_id}.localhost:{hostport}/...` → that sandbox's port.

A sandbox has its own network namespace, so its ports are unreachable from the host. Each HTTP
connection the proxy opens to a sandbox is a `forward` operation on that sandbox's agent socket
(the host-only one, see agent_client.py): the agent connects to 127.0.0.1:port inside the namespace,
answers one ok line, then splices bytes both ways. No per-port socket files exist, so there is no
name a sandbox could plant for the host to follow. Two sandboxes serving 8080 never collide, with
each other or with the host's own services.

Each sandbox may have at most `max_preview_connections` such connections open at once; past that a
request gets 503 (logged once per sandbox), so one sandbox's previews cannot use up the host's
descriptors.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpcore
import httpx
from starlette.types import Receive, Scope, Send

from genloop.http import HOP_BY_HOP
from sandbox_host.envd import error_response, sandbox_gone_response
from sandbox_host.sandboxes import Sandbox, SandboxLimitReached, SandboxManager, SandboxStartError

log = logging.getLogger("sandbox_host.preview")

PREVIEW_HOST = re.compile(r"^(\d{1,5})-([a-z0-9]+)\.")
UPSTREAM_TIMEOUT = httpx.Timeout(connect=5.0, read=None, write=None, pool=None)


def parse_preview_host(host: str) -> tuple[int, str] | None:
    match = PREVIEW_HOST.match(host)
    if match is None:
        return None
    return int(match.group(1)), match.group(2)


class PreviewBusy(Exception):
    """The sandbox already has its maximum of open preview connections."""


class _ForwardedStream(httpcore.AsyncNetworkStream):
    """The agent connection after the ok line: bytes read past that line come first."""

    def __init__(self, inner: httpcore.AsyncNetworkStream, leftover: bytes, on_close: Callable[[], None]):
        self._inner = inner
        self._leftover = leftover
        self._on_close: Callable[[], None] | None = on_close

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._leftover:
            data, self._leftover = self._leftover[:max_bytes], self._leftover[max_bytes:]
            return data
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        if self._on_close is not None:
            self._on_close()
            self._on_close = None
        await self._inner.aclose()

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class AgentForwardBackend(httpcore.AsyncNetworkBackend):
    """Network backend for one sandbox's preview client: "connecting" to sandbox:PORT opens the
    agent socket and asks the agent to forward to PORT; the URL's host is never resolved."""

    def __init__(self, agent_socket: Path, max_connections: int, on_refused: Callable[[], None]):
        self._inner = httpcore.AnyIOBackend()
        self._agent_socket = str(agent_socket)
        self._max_connections = max_connections
        self._on_refused = on_refused
        self.active = 0

    def _release(self) -> None:
        self.active -= 1

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if self.active >= self._max_connections:
            self._on_refused()
            raise PreviewBusy()
        self.active += 1
        stream: httpcore.AsyncNetworkStream | None = None
        try:
            stream = await self._inner.connect_unix_socket(self._agent_socket, timeout)
            await stream.write(json.dumps({"op": "forward", "port": port}).encode() + b"\n", timeout)
            buffer = b""
            while b"\n" not in buffer:
                chunk = await stream.read(4096, timeout)
                if not chunk or len(buffer) > 4096:
                    raise httpcore.ConnectError("the sandbox agent closed the connection")
                buffer += chunk
            line, leftover = buffer.split(b"\n", 1)
            reply = json.loads(line)
            if "error" in reply:
                raise httpcore.ConnectError(str(reply["error"].get("message")))
        except BaseException:
            self.active -= 1
            if stream is not None:
                await stream.aclose()
            raise
        return _ForwardedStream(stream, leftover, self._release)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise NotImplementedError("previews connect through the agent only")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class AgentForwardTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with its connection pool on an AgentForwardBackend."""

    def __init__(self, backend: AgentForwardBackend, limits: httpx.Limits):
        super().__init__(verify=False, limits=limits)  # plain HTTP inside: no CA bundle to load
        self._pool = httpcore.AsyncConnectionPool(
            network_backend=backend,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True,
            http2=False,
        )


class PreviewProxy:
    def __init__(self, manager: SandboxManager, max_connections: int, resume_timeout_s: int = 300):
        self.manager = manager
        self.max_connections = max_connections
        self.resume_timeout_s = resume_timeout_s  # the life an auto-resumed sandbox gets

    async def _auto_resume(self, sandbox_id: str) -> Sandbox | None:
        """A paused sandbox created with auto-resume is resumed by the request that reaches it (as
        E2B's proxy does; concurrent requests share one resume), then the request goes on."""
        paused = self.manager.paused.get(sandbox_id)
        if paused is None or not paused.record.auto_resume:
            return None
        try:
            await self.manager.resume(sandbox_id, self.resume_timeout_s)
        except (SandboxLimitReached, SandboxStartError) as exc:
            log.error("sandbox %s: auto-resume failed: %s", sandbox_id, exc)
            return None
        return self.manager.get(sandbox_id)

    def _client(self, sandbox: Sandbox) -> httpx.AsyncClient:
        if sandbox.preview is None:

            def refused() -> None:
                sandbox.preview_refusals += 1
                if sandbox.preview_refusals == 1:
                    log.warning(
                        "sandbox %s: preview refused: %d open connections is the cap (logged once per sandbox)",
                        sandbox.sandbox_id,
                        self.max_connections,
                    )

            backend = AgentForwardBackend(sandbox.agent_socket, self.max_connections, refused)
            # The pool itself does not cap: the backend refuses at once instead of queueing requests.
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=20)
            sandbox.preview = httpx.AsyncClient(
                transport=AgentForwardTransport(backend, limits), timeout=UPSTREAM_TIMEOUT, follow_redirects=False
            )
        return sandbox.preview

    async def __call__(self, scope: Scope, receive: Receive, send: Send, port: int, sandbox_id: str) -> None:
        sandbox = self.manager.get(sandbox_id) or await self._auto_resume(sandbox_id)
        if sandbox is None:
            await sandbox_gone_response(sandbox_id)(scope, receive, send)
            return
        if not 1 <= port <= 65535:
            await error_response(400, f"invalid port {port}")(scope, receive, send)
            return
        client = self._client(sandbox)

        async def body():
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                yield message.get("body", b"")
                if not message.get("more_body", False):
                    return

        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k.decode("latin-1").lower() not in HOP_BY_HOP
        ]
        headers.append(("x-forwarded-proto", scope.get("scheme", "http")))
        if scope.get("client"):
            headers.append(("x-forwarded-for", scope["client"][0]))
        path = scope.get("raw_path") or scope["path"].encode()
        # The port in the URL is what the backend asks the agent to forward to.
        url = httpx.URL(
            f"http://sandbox:{port}", raw_path=path + (b"?" + scope["query_string"] if scope["query_string"] else b"")
        )
        request = client.build_request(scope["method"], url, headers=headers, content=body())
        try:
            response = await client.send(request, stream=True)
        except PreviewBusy:
            await error_response(503, "this sandbox has too many open preview connections")(scope, receive, send)
            return
        except httpx.HTTPError:
            # The forwarder closes the connection when nothing listens on the port.
            message = "The sandbox is running but port is not open"
            await error_response(502, message)(scope, receive, send)
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [
                        (k, v) for k, v in response.headers.raw if k.decode("latin-1").lower() not in HOP_BY_HOP
                    ],
                }
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except httpx.HTTPError as exc:
            # Headers are out: all that is left is to cut the response short.
            log.info("preview %s:%d: upstream failed mid-response: %s", sandbox_id, port, exc)
        finally:
            await response.aclose()
