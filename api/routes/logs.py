"""Build logs: a page of stored lines (`after`, `limit`, `stage`, `tail`, `q`), and `follow=app`: the
running app's output after READY, read live from its sandbox through the e2b SDK (not stored)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from datetime import UTC, datetime
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from activities.build import APP_PIDFILE
from activities.logs import printable, split_long
from activities.sandbox import SandboxClient, SandboxConfig
from api import reading as read
from api.errors import ApiError
from api.feed import HEARTBEAT_S, SSE_HEADERS
from api.routes.common import get_job, json_response, services
from api.schemas import ErrorCode, LogEvent, LogPage
from genloop.errors import redact_secrets
from genloop.settings import ConfigError
from persistence.repository import MAX_LOG_PAGE
from workflows.stages import Stage

log = logging.getLogger("genloop.api.logs")

_PARAMS = frozenset({"after", "limit", "stage", "tail", "follow", "q"})
Q_MAX_CHARS = 200
LOG_LIMIT_DEFAULT = 1000
NDJSON = "application/x-ndjson"
_STAGES = {s.value: s for s in Stage}


async def build_logs(request: Request) -> Response:
    svc = services(request)
    job = await get_job(svc, read.path_id(request, "build_id"))
    params = read.query(request, _PARAMS)
    follow = params.get("follow")
    if follow is not None:
        if follow != "app":
            raise read.invalid("follow must be `app`")
        if set(params) != {"follow"}:
            raise read.invalid("follow=app takes no other query parameter")
        return await _follow_app(svc, job)
    if "after" in params and "tail" in params:
        raise read.invalid("after and tail cannot be combined")
    after = read.bounded_int(params.get("after"), "after", default=0, low=0, high=999_999_999)
    limit = read.bounded_int(params.get("limit"), "limit", default=LOG_LIMIT_DEFAULT, low=1, high=MAX_LOG_PAGE)
    tail = params.get("tail")
    tail_n = read.bounded_int(tail, "tail", default=0, low=1, high=MAX_LOG_PAGE) if tail is not None else None
    stage = params.get("stage")
    if stage is not None and stage not in _STAGES:
        raise read.invalid(f"stage must be one of {', '.join(_STAGES)}")
    q = params.get("q")
    if q is not None and (not 1 <= len(q) <= Q_MAX_CHARS or "\x00" in q):
        raise read.invalid(f"q must be 1-{Q_MAX_CHARS} characters (no NUL)")
    rows = await svc.repo.list_logs(job.id, after=after, limit=limit, stage=stage, tail=tail_n, contains=q)
    lines = [LogEvent(seq=r.seq, stage=Stage(r.stage), attempt=r.attempt, stream=r.stream, text=r.text, at=r.at)
             for r in rows]
    if NDJSON in request.headers.get("accept", ""):
        # One JSON object per line, for tools that read logs line by line (jq, grep).
        body = "".join(line.model_dump_json() + "\n" for line in lines)
        return Response(body, media_type=NDJSON)
    page = LogPage(lines=lines, next_after=lines[-1].seq if lines else after,
                   truncated=await svc.repo.log_truncated(job.id))
    return json_response(page)


async def _follow_app(svc, job) -> Response:
    if job.stage is not Stage.READY or not job.sandbox_id:
        raise ApiError(409, ErrorCode.CONFLICT, f"build {job.id} has no running app to follow ({job.stage.value})")
    if job.preview_state not in (None, "live"):
        # Connecting would resume a paused sandbox behind its preview workflow's back.
        raise ApiError(409, ErrorCode.CONFLICT, f"the version is {job.preview_state}: wake it first (preview/wake)")
    try:
        sandboxes = SandboxClient(SandboxConfig.from_settings(svc.settings))
    except ConfigError as exc:
        log.warning("follow=app: no sandbox access: %s", exc)
        raise ApiError(503, ErrorCode.SERVICE_UNAVAILABLE, "the sandbox service is not configured here") from None
    try:
        sandbox = await sandboxes.connect(job.sandbox_id)
        app = [p for p in await sandbox.commands.list() if APP_PIDFILE in " ".join([p.cmd, *p.args])]
    except Exception as exc:  # noqa: BLE001 - the sandbox is gone or paused: say so, not a 500
        log.info("follow=app of sandbox %s: %s", job.sandbox_id, redact_secrets(str(exc)))
        app = []
    if not app:
        raise ApiError(409, ErrorCode.CONFLICT, "the app is not running (its sandbox is paused or gone)")
    return AppLogResponse(sandbox, app[0].pid)


class AppLogResponse(Response):
    """`app.log` events (data: {stream, text, at}) for each line the app prints from now on, until
    the app exits or the client leaves. Live only: no ids, nothing to resume."""

    media_type = "text/event-stream"

    def __init__(self, sandbox: Any, pid: int) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers(SSE_HEADERS)
        self._sandbox = sandbox
        self._pid = pid

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lines: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=10_000)
        partial = {"stdout": "", "stderr": ""}

        def on(stream: str):
            def take(chunk: str) -> None:
                *complete, partial[stream] = (partial[stream] + chunk).split("\n")
                for text in complete:
                    for piece in split_long(redact_secrets(printable(text.rstrip("\r")))):
                        data = json.dumps({"stream": stream, "text": piece, "at": datetime.now(UTC).isoformat()})
                        with contextlib.suppress(asyncio.QueueFull):  # a reader that stopped reading loses lines
                            lines.put_nowait(f"event: app.log\ndata: {data}\n\n".encode())
            return take

        # timeout=0: attaching with a deadline would end the app at that deadline.
        handle = await self._sandbox.commands.connect(
            self._pid, timeout=0, on_stdout=on("stdout"), on_stderr=on("stderr")
        )

        async def ended() -> None:
            with contextlib.suppress(Exception):
                await handle.wait()
            await lines.put(None)

        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        try:
            async with anyio.create_task_group() as tasks:

                async def stream() -> None:
                    while True:
                        try:
                            frame = await asyncio.wait_for(lines.get(), HEARTBEAT_S)
                        except TimeoutError:
                            frame = b": heartbeat\n\n"
                        if frame is None:
                            break
                        await send({"type": "http.response.body", "body": frame, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    tasks.cancel_scope.cancel()

                async def disconnected() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tasks.cancel_scope.cancel()

                tasks.start_soon(ended)
                tasks.start_soon(stream)
                tasks.start_soon(disconnected)
        finally:
            with contextlib.suppress(Exception):
                await handle.disconnect()
