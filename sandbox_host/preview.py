"""Preview proxy: `http://{port}-{sandbox_id}.localhost:{hostport}/...` → that sandbox's port.

A sandbox has its own network namespace, so its ports are unreachable from the host. On the first
request for a port the agent opens a unix socket in the sandbox's run directory that connects to
127.0.0.1:port inside the namespace; the proxy speaks HTTP/1.1 through it. Two sandboxes serving
on 8080 therefore never collide, with each other or with the host's own services.
"""

from __future__ import annotations

import logging
import re

import httpx
from starlette.types import Receive, Scope, Send

from sandbox_host.agent_client import AgentCallError, AgentUnavailable, fd_path
from sandbox_host.envd import error_response, sandbox_gone_response
from sandbox_host.sandboxes import Sandbox, SandboxManager

log = logging.getLogger("sandbox_host.preview")

PREVIEW_HOST = re.compile(r"^(\d{1,5})-([a-z0-9]+)\.")
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
UPSTREAM_TIMEOUT = httpx.Timeout(connect=5.0, read=None, write=None, pool=None)


def parse_preview_host(host: str) -> tuple[int, str] | None:
    match = PREVIEW_HOST.match(host)
    if match is None:
        return None
    return int(match.group(1)), match.group(2)


class PreviewProxy:
    def __init__(self, manager: SandboxManager):
        self.manager = manager

    async def _upstream(self, sandbox: Sandbox, port: int) -> httpx.AsyncClient:
        async with sandbox.lock:
            client = sandbox.previews.get(port)
            if client is None:
                assert sandbox.agent is not None
                reply = await sandbox.agent.call("expose", port=port)
                socket_fd = sandbox.socket_fd(reply["socket"])
                client = httpx.AsyncClient(
                    transport=httpx.AsyncHTTPTransport(uds=fd_path(socket_fd)),
                    timeout=UPSTREAM_TIMEOUT,
                    follow_redirects=False,
                )
                sandbox.previews[port] = client
            return client

    async def __call__(self, scope: Scope, receive: Receive, send: Send, port: int, sandbox_id: str) -> None:
        sandbox = self.manager.get(sandbox_id)
        if sandbox is None:
            await sandbox_gone_response(sandbox_id)(scope, receive, send)
            return
        if not 1 <= port <= 65535:
            await error_response(400, f"invalid port {port}")(scope, receive, send)
            return
        try:
            client = await self._upstream(sandbox, port)
        except (AgentUnavailable, AgentCallError, OSError):
            await sandbox_gone_response(sandbox_id)(scope, receive, send)
            return

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
        url = httpx.URL(
            "http://sandbox", raw_path=path + (b"?" + scope["query_string"] if scope["query_string"] else b"")
        )
        request = client.build_request(scope["method"], url, headers=headers, content=body())
        try:
            response = await client.send(request, stream=True)
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
