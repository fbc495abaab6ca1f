"""One ASGI app on one port: preview proxy, envd and control plane, told apart per request.

Host: {port}-{sandbox_id}.localhost:{hostport}   → preview proxy (preview.py)
E2b-Sandbox-Id: {sandbox_id}                      → that sandbox's envd (envd.py)
anything else                                     → control plane (control.py), X-API-Key required

Before any of that, the Host header must name this host (`HostNames`): a web page on a rebinding
domain (evil.example resolving to 127.0.0.1) is same-origin with whatever answers there, so a name
the host does not know gets 421 and nothing is forwarded.
"""

from __future__ import annotations

import hmac

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Message, Receive, Scope, Send

from genloop.http import HostNames, host_name, is_localhost_name
from sandbox_host import envd
from sandbox_host.cloud import cloud_only_feature, cloud_only_message
from sandbox_host.config import HostConfig
from sandbox_host.control import ControlPlane
from sandbox_host.preview import PreviewProxy, parse_preview_host
from sandbox_host.sandboxes import Sandbox, SandboxManager


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


class _LimitedReceive:
    """Counts an upload's bytes as they arrive and stops it at the limit (413, never a 500)."""

    def __init__(self, receive: Receive, limit: int):
        self._receive = receive
        self._limit = self._remaining = limit
        self.body_done = False

    async def __call__(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self.body_done = not message.get("more_body", False)
            self._remaining -= len(message.get("body", b""))
            if self._remaining < 0:
                raise envd.UploadTooLarge()
        else:
            self.body_done = True
        return message

    async def drain(self) -> None:
        """Read (and drop) what is left of a refused upload, up to a few times the limit, so the
        client reads the 413 instead of a connection reset while it is still sending."""
        budget = 4 * self._limit
        while not self.body_done and budget > 0:
            message = await self._receive()
            budget -= len(message.get("body", b""))
            self.body_done = message["type"] != "http.request" or not message.get("more_body", False)


class HostApp:
    def __init__(self, manager: SandboxManager, config: HostConfig):
        self.manager = manager
        self.config = config
        assert config.api_key, "HostConfig.with_api_key() first: the control plane always requires a key"
        self.api_key = config.api_key.encode()
        preview_names = [] if is_localhost_name(host_name(config.preview_domain)) else [f"*.{config.preview_domain}"]
        self.host_names = HostNames(config.host, [*config.public_hosts, *preview_names], localhost_subdomains=True)
        self.control = ControlPlane(manager, config).app()
        # An auto-resumed sandbox gets at least 300 s before its timeout, as on E2B.
        resume_timeout_s = min(max(config.default_timeout_s, 300), config.max_timeout_s)
        self.preview = PreviewProxy(manager, config.max_preview_connections, resume_timeout_s)
        self.connect_apps = envd.build_connect_apps(manager)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1003})
            return
        host = _header(scope, b"host")
        if not self.host_names.allows(host):
            message = "unknown Host name: use 127.0.0.1 or localhost, or list the name in sandbox_host.public_hosts"
            await envd.error_response(421, message)(scope, receive, send)
            return
        preview = parse_preview_host(host or "")
        if preview is not None:
            await self.preview(scope, receive, send, *preview)
            return
        sandbox_id = _header(scope, b"e2b-sandbox-id")
        if sandbox_id is None and scope["path"] == "/files" and "signature=" in scope["query_string"].decode("latin-1"):
            # A signed file URL of the SDK in sandbox_url mode: its signature names the sandbox.
            sandbox_id = envd.signed_sandbox_id(self.manager, Request(scope).query_params, scope["method"])
            if sandbox_id is None:
                await envd.error_response(401, "invalid signature")(scope, receive, send)
                return
        if sandbox_id is not None:
            await self._envd(scope, receive, send, sandbox_id)
            return
        if scope["path"] == "/health":  # readiness, no secrets involved
            health = {
                "status": "ok",
                "isolated": self.config.isolated,
                "mode": self.config.mode,
                "host_id": self.config.host_id,
            }
            await JSONResponse(health)(scope, receive, send)
            return
        if not self._api_key_ok(_header(scope, b"x-api-key")):
            await envd.error_response(401, "invalid or missing API key (X-API-Key)")(scope, receive, send)
            return
        if (feature := cloud_only_feature(scope["path"])) is not None:
            await envd.error_response(501, cloud_only_message(feature))(scope, receive, send)
            return
        await self.control(scope, receive, send)

    def _api_key_ok(self, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(presented.encode(), self.api_key)

    def _access_error(self, scope: Scope, request: Request, sandbox: Sandbox) -> str | None:
        """None when the request may use this sandbox's envd; otherwise why not (envd's wording)."""
        token = sandbox.record.access_token
        presented = _header(scope, b"x-access-token")
        if presented is not None:
            if hmac.compare_digest(presented.encode(), token.encode()):
                return None
            return "invalid or missing access token (X-Access-Token)"
        if scope["path"] == "/files":  # the SDK's signed download_url/upload_url
            return envd.signature_error(request.query_params, scope["method"], token)
        return "invalid or missing access token (X-Access-Token)"

    async def _envd(self, scope: Scope, receive: Receive, send: Send, sandbox_id: str) -> None:
        sandbox = self.manager.get(sandbox_id)
        if sandbox is None:
            await envd.sandbox_gone_response(sandbox_id)(scope, receive, send)
            return
        request = Request(scope, receive)
        if (denied := self._access_error(scope, request, sandbox)) is not None:
            await envd.error_response(401, denied)(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        if path == "/health" and method == "GET":
            response = await envd.health(request)
        elif path == "/files" and method == "GET":
            response = await envd.read_file(request, sandbox)
        elif path == "/files" and method == "POST":
            limited = _LimitedReceive(receive, self.config.max_upload_bytes)
            try:
                response = await envd.write_files(Request(scope, limited), sandbox, self.config.max_upload_bytes)
            except envd.UploadTooLarge:
                response = envd.error_response(413, f"upload exceeds the limit of {self.config.max_upload_bytes} bytes")
            if response.status_code == 413:
                await limited.drain()
        else:
            app = next((a for prefix, a in self.connect_apps.items() if path.startswith(prefix)), None)
            if app is None:
                response = envd.error_response(404, f"no envd route {method} {path}")
            else:
                await app(scope, receive, send)
                return
        await response(scope, receive, send)
