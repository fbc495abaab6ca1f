"""The preview gateway: every READY version at one URL that never changes.

`http://v3--my-project.localhost:8000/` (or `https://v3--my-project.<preview.public_origin>`) is
served by the API process but never reaches an API route: requests whose Host names a version go
here, everything else to the API. Preview URLs are public links (no token), as E2B's are.

The gateway looks the version up by its host label (`jobs.preview_label`) and forwards the request
(method, path, query, headers, body; streamed responses; WebSockets) to the sandbox recorded for it,
never to a host or port taken from the request. When the version is paused or its sandbox is gone,
it asks the version's PreviewWorkflow to wake it (update-with-start, so versions built before the
workflow existed get one) and holds the request up to `preview.wake_hold_s`; wakes are single-flight
per process, and the workflow makes them single-flight across processes. Every forwarded request is
activity: the workflow is touched at most every TOUCH_EVERY_S per version.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import time
from typing import Any

import httpx
from starlette.types import ASGIApp, Receive, Scope, Send
from temporalio.client import WithStartWorkflowOperation
from temporalio.common import WorkflowIDConflictPolicy

from activities.preview import preview_policy
from genloop.errors import GenloopError
from genloop.http import HOP_BY_HOP, LoopbackTransport, host_name, is_localhost_name, preview_label_of
from genloop.settings import Settings
from persistence.models import Job
from persistence.repository import JobRepository
from workflows.preview import PreviewWorkflow
from workflows.types import PreviewInput, PreviewState, WakeRequest, WakeResult, preview_workflow_id

log = logging.getLogger("genloop.api.gateway")

TOUCH_EVERY_S = 30.0
MAX_BODY_BYTES = 32 * 1024 * 1024  # a request body is read before forwarding, so a wake can follow a dead upstream
RETRY_AFTER_S = 5
UPSTREAM_TIMEOUT = httpx.Timeout(connect=5.0, read=None, write=None, pool=None)
# What a sandbox's edge answers when the sandbox (or its app) is not there: wake, do not pass it on.
_GONE_MARKERS = ("was not found", "port is not open", "not running")


class VersionGone(Exception):
    """The sandbox recorded for a version did not answer as a live app."""


class PreviewGateway:
    def __init__(self, settings: Settings, repo: JobRepository, temporal: Any) -> None:
        self.settings = settings
        self.repo = repo
        self.temporal = temporal  # api.services.TemporalGateway
        self.policy = preview_policy(settings)
        self._domain = _preview_domain(settings)
        self._wakes: dict[str, asyncio.Task[WakeResult]] = {}
        self._touched: dict[str, float] = {}
        self._http = httpx.AsyncClient(transport=LoopbackTransport(), timeout=UPSTREAM_TIMEOUT, follow_redirects=False)

    async def aclose(self) -> None:
        for task in self._wakes.values():
            task.cancel()
        await self._http.aclose()

    def label_for(self, scope: Scope) -> str | None:
        """The version label when this request's Host is a version URL of this gateway's domain."""
        host = _header(scope, b"host")
        label = preview_label_of(host)
        if label is None or host is None:
            return None
        rest = host_name(host).split(".", 1)[1]
        return label if rest == self._domain or (self._domain == "localhost" and is_localhost_name(rest)) else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send, label: str) -> None:
        try:
            job = await self.repo.find_by_label(label)
        except GenloopError:
            await _page(scope, send, 503, "Previews are temporarily unavailable. Please retry shortly.",
                        headers={"retry-after": str(RETRY_AFTER_S)})
            return
        if job is None:
            await _page(scope, send, 404, "No version is served at this address.")
            return
        if job.preview_state == PreviewState.REMOVED:
            await self._removed(scope, send, job)
            return
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send, job)
            return
        body = await _read_body(receive)
        if body is None:
            await _page(scope, send, 413, f"The request body is larger than {MAX_BODY_BYTES} bytes.")
            return
        unreachable = None
        if job.preview_state in (None, PreviewState.LIVE) and job.sandbox_preview_url:
            try:
                await self._forward(scope, send, job, job.sandbox_preview_url, body)
                return
            except VersionGone:
                unreachable = job.sandbox_id
        result = await self._wake(job, unreachable)
        if result is not None and result.state == PreviewState.LIVE and result.sandbox_preview_url:
            try:
                await self._forward(scope, send, job, result.sandbox_preview_url, body)
                return
            except VersionGone:
                pass
            # Paused (or lost) again between its wake and this request (a request slower than the
            # idle pause): wake it once more, naming the sandbox that did not answer.
            with contextlib.suppress(GenloopError):
                job = await self.repo.find_by_label(label) or job
            result = await self._wake(job, job.sandbox_id)
            if result is not None and result.state == PreviewState.LIVE and result.sandbox_preview_url:
                try:
                    await self._forward(scope, send, job, result.sandbox_preview_url, body)
                    return
                except VersionGone:
                    result = None
        if result is None:
            await _page(scope, send, 503, "This preview is starting. The page reloads by itself.",
                        headers={"retry-after": str(RETRY_AFTER_S)}, refresh=True)
        elif result.state == PreviewState.REMOVED:
            await self._removed(scope, send, job)
        else:
            await _page(scope, send, 503, result.message or "This version could not be started.",
                        debug_id=result.debug_id, headers={"retry-after": str(int(self.policy.retry_failed_s))})

    # --- forwarding ---

    async def _forward(self, scope: Scope, send: Send, job: Job, upstream: str, body: bytes) -> None:
        url = httpx.URL(upstream).copy_with(raw_path=_raw_path(scope))
        headers = [(k, v) for k, v in _headers(scope) if k.lower() not in HOP_BY_HOP and k.lower() != "host"]
        headers += [
            ("x-forwarded-host", _header(scope, b"host") or ""),
            ("x-forwarded-proto", scope.get("scheme", "http")),
        ]
        request = self._http.build_request(scope["method"], url, headers=headers, content=body)
        try:
            response = await self._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise VersionGone(str(exc)) from None
        try:
            if response.status_code == 502:
                text = (await response.aread()).decode(errors="replace")
                if any(marker in text for marker in _GONE_MARKERS):
                    raise VersionGone(text[:200])
                await _send_response(send, response, text.encode())
                return
            await send({
                "type": "http.response.start",
                "status": response.status_code,
                "headers": [(k, v) for k, v in response.headers.raw if k.decode("latin-1").lower() not in HOP_BY_HOP],
            })
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except httpx.HTTPError as exc:  # headers are out: all that is left is to cut the response short
            log.info("preview %s: upstream failed mid-response: %s", job.preview_label, exc)
        finally:
            await response.aclose()
        self._touch(job)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send, job: Job) -> None:
        """Dev servers' live reload: a WebSocket to the version's app, message for message."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import WebSocketException

        upstream = job.sandbox_preview_url if job.preview_state == PreviewState.LIVE else None
        if upstream is None:
            result = await self._wake(job, None)
            upstream = result.sandbox_preview_url if result is not None else None
        if upstream is None:
            await send({"type": "websocket.close", "code": 1013})  # try again later
            return
        target = httpx.URL(upstream)
        ws_url = str(target.copy_with(scheme="wss" if target.scheme == "https" else "ws", raw_path=_raw_path(scope)))
        extra = {"host": "127.0.0.1", "port": target.port} if is_localhost_name(target.host) else {}
        protocols = [p.strip() for p in (_header(scope, b"sec-websocket-protocol") or "").split(",") if p.strip()]
        try:
            async with connect(ws_url, subprotocols=protocols or None, open_timeout=10, **extra) as upstream_ws:
                await receive()  # websocket.connect
                await send({"type": "websocket.accept", "subprotocol": upstream_ws.subprotocol})
                self._touch(job)

                async def client_to_app() -> None:
                    while True:
                        message = await receive()
                        if message["type"] == "websocket.disconnect":
                            await upstream_ws.close()
                            return
                        await upstream_ws.send(message.get("bytes") or message.get("text") or "")

                async def app_to_client() -> None:
                    async for data in upstream_ws:
                        key = "bytes" if isinstance(data, bytes) else "text"
                        await send({"type": "websocket.send", key: data})
                    await send({"type": "websocket.close", "code": 1000})

                tasks = [asyncio.ensure_future(client_to_app()), asyncio.ensure_future(app_to_client())]
                _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
        except (TimeoutError, OSError, WebSocketException) as exc:
            log.info("preview %s: websocket upstream failed: %s", job.preview_label, exc)
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": 1011})

    # --- waking ---

    async def _wake(self, job: Job, unreachable: str | None) -> WakeResult | None:
        """The version awake (or why it cannot be): None when it is still waking after wake_hold_s.
        `unreachable`: the sandbox that did not answer (so a version recorded as live is woken too)."""
        task = self._wakes.get(job.id)
        if task is None or task.done():
            task = asyncio.ensure_future(self._request_wake(job, unreachable))
            self._wakes[job.id] = task
            task.add_done_callback(
                lambda _t, key=job.id: self._wakes.pop(key, None) if self._wakes.get(key) is _t else None
            )
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.settings.preview.wake_hold_s)
        except TimeoutError:
            return None
        except Exception as exc:  # noqa: BLE001 - Temporal unreachable or the update refused: the page says retry
            log.warning("preview %s: wake failed: %s", job.preview_label, exc)
            return None

    async def wake_now(self, job: Job) -> WakeResult:
        """Wake a version by hand (the API's wake route): waits for the whole wake."""
        return await self._request_wake(job, None)

    async def _request_wake(self, job: Job, unreachable: str | None) -> WakeResult:
        client = await self.temporal.client()
        start = WithStartWorkflowOperation(
            PreviewWorkflow.run,
            PreviewInput(
                build_id=job.id, project_id=job.project_id, policy=self.policy, sandbox_id=job.sandbox_id,
                sandbox_preview_url=job.sandbox_preview_url, state=job.preview_state or PreviewState.PAUSED,
                ready_at=job.created_at.isoformat(),
            ),
            id=preview_workflow_id(job.id),
            task_queue=self.settings.temporal.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            static_summary=f"{job.project_id} · {job.build_version} · {job.preview_url}",
        )
        self._touched[job.id] = time.monotonic()
        return await client.execute_update_with_start_workflow(
            PreviewWorkflow.wake, WakeRequest(unreachable=unreachable), start_workflow_operation=start,
            result_type=WakeResult,
        )

    def _touch(self, job: Job) -> None:
        now = time.monotonic()
        if now - self._touched.get(job.id, 0.0) < TOUCH_EVERY_S:
            return
        self._touched[job.id] = now
        asyncio.ensure_future(self._send_touch(job.id))

    async def _send_touch(self, build_id: str) -> None:
        try:
            client = await self.temporal.client()
            await client.get_workflow_handle(preview_workflow_id(build_id)).signal(PreviewWorkflow.touch)
        except Exception as exc:  # noqa: BLE001 - activity reporting is best effort; the next request retries
            log.debug("touch %s: %s", build_id, exc)
            self._touched.pop(build_id, None)

    async def _removed(self, scope: Scope, send: Send, job: Job) -> None:
        newest = await self.repo.newest_ready(job.project_id)
        link = newest.preview_url if newest is not None and newest.preview_state != PreviewState.REMOVED else None
        await _page(scope, send, 410, f"Version {job.build_version} of {job.project_id} is no longer served.",
                    link=link, link_text=f"the newest version ({newest.build_version})" if newest else "")


def _preview_domain(settings: Settings) -> str:
    origin = settings.preview.public_origin
    return host_name(origin.partition("://")[2]) if origin else "localhost"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _headers(scope: Scope) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]


def _raw_path(scope: Scope) -> bytes:
    path = scope.get("raw_path") or scope["path"].encode()
    return path + (b"?" + scope["query_string"] if scope.get("query_string") else b"")


async def _read_body(receive: Receive) -> bytes | None:
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return bytes(body)
        body += message.get("body", b"")
        if len(body) > MAX_BODY_BYTES:
            return None
        if not message.get("more_body", False):
            return bytes(body)


async def _send_response(send: Send, response: httpx.Response, body: bytes) -> None:
    headers = [(k, v) for k, v in response.headers.raw if k.decode("latin-1").lower() not in HOP_BY_HOP]
    headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _page(scope: Scope, send: Send, status: int, message: str, *, headers: dict[str, str] | None = None,
                debug_id: str = "", refresh: bool = False, link: str | None = None, link_text: str = "") -> None:
    """A small page for browsers (Accept: text/html), JSON for everything else. Never a traceback."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1013 if status == 503 else 1008})
        return
    accept = _header(scope, b"accept") or ""
    if "text/html" in accept:
        extra = f'<p>Quote <code>{html.escape(debug_id)}</code> to support.</p>' if debug_id else ""
        if link:
            extra += f'<p>Go to <a href="{html.escape(link)}">{html.escape(link_text or link)}</a>.</p>'
        meta = f'<meta http-equiv="refresh" content="{RETRY_AFTER_S}">' if refresh else ""
        body = (f"<!doctype html><html><head><meta charset='utf-8'>{meta}<title>genloop preview</title></head>"
                f"<body><p>{html.escape(message)}</p>{extra}</body></html>").encode()
        media_type = b"text/html; charset=utf-8"
    else:
        error: dict[str, Any] = {"code": _CODES.get(status, "unavailable"), "message": message}
        if debug_id:
            error["debug_id"] = debug_id
        if link:
            error["newest_version_url"] = link
        body = json.dumps({"error": error}).encode()
        media_type = b"application/json"
    raw = [(b"content-type", media_type), (b"content-length", str(len(body)).encode()), (b"cache-control", b"no-store")]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


_CODES = {404: "not_found", 410: "gone", 413: "payload_too_large", 503: "service_unavailable"}


class PreviewDispatch:
    """The outermost middleware: version hosts go to the gateway, never to an API route; every other
    Host goes on to the API (whose own guard refuses names it does not answer to)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            gateway: PreviewGateway | None = getattr(scope["app"].state, "gateway", None)
            label = gateway.label_for(scope) if gateway is not None else None
            if label is not None:
                await gateway(scope, receive, send, label)
                return
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})  # the API itself has no WebSockets
                return
        await self.app(scope, receive, send)
