"""The control plane, as `e2b.AsyncSandbox` calls it (bodies built from the SDK's own API models)."""

from __future__ import annotations

import datetime
import logging
import os
import urllib.parse
from typing import Any

from e2b.api.client.models import (
    ListedSandbox,
    NewSandbox,
    NewSandboxV2,
    SandboxDetail,
    SandboxLifecycle,
    SandboxOnTimeout,
    SandboxState,
)
from e2b.api.client.models import Sandbox as SandboxModel
from e2b.api.client.types import Unset
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandbox_host.config import ENVD_VERSION, TEMPLATE_ALIAS, HostConfig
from sandbox_host.envd import error_response
from sandbox_host.sandboxes import (
    PAUSED,
    SandboxLimitReached,
    SandboxManager,
    SandboxPauseError,
    SandboxRecord,
    SandboxStartError,
)

log = logging.getLogger("sandbox_host.control")

CLIENT_ID = "local"
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def _utc(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC)


def _state(record: SandboxRecord) -> SandboxState:
    return SandboxState.PAUSED if record.state == PAUSED else SandboxState.RUNNING


def _lifecycle(record: SandboxRecord) -> SandboxLifecycle:
    on_timeout = SandboxOnTimeout.PAUSE if record.auto_pause else SandboxOnTimeout.KILL
    return SandboxLifecycle(on_timeout=on_timeout, auto_resume=record.auto_resume)


class ControlPlane:
    def __init__(self, manager: SandboxManager, config: HostConfig):
        self.manager = manager
        self.config = config
        self.domain = config.preview_domain

    # ------------------------------------------------------------------ bodies
    def _created(self, record: SandboxRecord) -> dict[str, Any]:
        return SandboxModel(
            template_id=record.template_id,
            sandbox_id=record.sandbox_id,
            client_id=CLIENT_ID,
            envd_version=ENVD_VERSION,
            alias=TEMPLATE_ALIAS,
            envd_access_token=record.access_token,
            traffic_access_token=None,
            domain=self.domain,
        ).to_dict()

    def _detail(self, record: SandboxRecord) -> dict[str, Any]:
        return SandboxDetail(
            template_id=record.template_id,
            sandbox_id=record.sandbox_id,
            client_id=CLIENT_ID,
            started_at=_utc(record.started_at),
            end_at=_utc(record.end_at),
            envd_version=ENVD_VERSION,
            cpu_count=os.cpu_count() or 1,
            memory_mb=self.config.limits.memory_mb,
            disk_size_mb=0,
            state=_state(record),
            alias=TEMPLATE_ALIAS,
            lifecycle=_lifecycle(record),
            # No envd_access_token: as on E2B, only create and connect hand it out.
            allow_internet_access=record.internet_access,
            domain=self.domain,
            metadata=record.metadata,
        ).to_dict()

    def _listed(self, record: SandboxRecord) -> dict[str, Any]:
        return ListedSandbox(
            template_id=record.template_id,
            sandbox_id=record.sandbox_id,
            client_id=CLIENT_ID,
            started_at=_utc(record.started_at),
            end_at=_utc(record.end_at),
            cpu_count=os.cpu_count() or 1,
            memory_mb=self.config.limits.memory_mb,
            disk_size_mb=0,
            state=_state(record),
            envd_version=ENVD_VERSION,
            alias=TEMPLATE_ALIAS,
            metadata=record.metadata,
        ).to_dict()

    # ------------------------------------------------------------------ helpers
    async def _json(self, request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise HTTPException(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise HTTPException(400, "the request body must be a JSON object")
        return body

    def _timeout(self, value: Any) -> int:
        if isinstance(value, Unset) or value is None:
            return self.config.default_timeout_s
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise HTTPException(400, "timeout must be a non-negative integer (seconds)")
        if value > self.config.max_timeout_s:
            raise HTTPException(400, f"timeout cannot be greater than {self.config.max_timeout_s} seconds")
        return value

    @staticmethod
    def _string_map(value: Any, name: str) -> dict[str, str]:
        if isinstance(value, Unset) or value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise HTTPException(400, f"{name} must be an object of strings")
        return dict(value)

    def _sandbox_or_404(self, sandbox_id: str) -> SandboxRecord:
        sandbox = self.manager.lookup(sandbox_id)
        if sandbox is None:
            raise HTTPException(404, f"sandbox {sandbox_id} not found")
        return sandbox.record

    # ------------------------------------------------------------------ routes
    async def create(self, request: Request) -> Response:
        body = await self._json(request)
        model = NewSandboxV2 if request.url.path.startswith("/v2/") else NewSandbox
        try:
            parsed = model.from_dict(body)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise HTTPException(400, f"invalid sandbox request: {exc}") from None
        if not isinstance(parsed.template_id, str) or not parsed.template_id:
            raise HTTPException(400, "templateID must be a non-empty string")
        key = request.headers.get("idempotency-key") or None
        auto_pause = getattr(parsed, "auto_pause", False) is True
        auto_resume_config = getattr(parsed, "auto_resume", None)
        auto_resume = getattr(auto_resume_config, "enabled", False) is True
        if auto_resume and not auto_pause:
            raise HTTPException(400, "autoResume can only be enabled together with autoPause")
        try:
            record = await self.manager.create(
                template_id=parsed.template_id,
                timeout_s=self._timeout(parsed.timeout),
                metadata=self._string_map(parsed.metadata, "metadata"),
                env_vars=self._string_map(parsed.env_vars, "envVars"),
                internet_access=parsed.allow_internet_access is not False,
                idempotency_key=key,
                auto_pause=auto_pause,
                auto_resume=auto_resume,
            )
        except SandboxLimitReached as exc:
            return error_response(429, str(exc))
        except SandboxStartError as exc:
            log.error("sandbox failed to start: %s", exc)
            return error_response(500, "the sandbox failed to start; see the sandbox host's log")
        return JSONResponse(self._created(record), 201)

    async def list_v2(self, request: Request) -> Response:
        records = self._filtered(request)
        try:
            limit = int(request.query_params.get("limit") or DEFAULT_PAGE_SIZE)
            offset = int(request.query_params.get("nextToken") or 0)
        except ValueError:
            raise HTTPException(400, "limit and nextToken must be integers") from None
        if not 1 <= limit <= MAX_PAGE_SIZE or offset < 0:
            raise HTTPException(400, f"limit must be within 1..{MAX_PAGE_SIZE}")
        page = records[offset : offset + limit]
        headers = {"x-next-token": str(offset + limit)} if offset + limit < len(records) else {}
        return JSONResponse([self._listed(r) for r in page], headers=headers)

    async def list_v1(self, request: Request) -> Response:
        return JSONResponse([self._listed(r) for r in self._filtered(request, default_states="running")])

    def _filtered(self, request: Request, default_states: str = "running,paused") -> list[SandboxRecord]:
        """Newest first unless `order=asc`; `startedAfter` is inclusive, to the microsecond reported."""
        params = request.query_params
        states = {s for s in (params.get("state") or default_states).split(",") if s}
        if not states <= {"running", "paused"}:
            raise HTTPException(400, "state must be running and/or paused")
        # The SDK quotes each key and value, then urlencodes the pairs into one parameter.
        wanted = {
            urllib.parse.unquote(k): urllib.parse.unquote(v)
            for k, v in urllib.parse.parse_qsl(params.get("metadata") or "", keep_blank_values=True)
        }
        records = [sb.record for sb in self.manager.list() if sb.record.state in states]
        records = [r for r in records if all(r.metadata.get(k) == v for k, v in wanted.items())]
        if template := params.get("template"):
            records = [r for r in records if template in (r.template_id, TEMPLATE_ALIAS)]
        if started_after := params.get("startedAfter"):
            try:
                after = datetime.datetime.fromisoformat(started_after.replace(" ", "+"))
            except ValueError:
                raise HTTPException(400, "startedAfter must be an ISO 8601 timestamp") from None
            if after.tzinfo is None:
                after = after.replace(tzinfo=datetime.UTC)
            records = [r for r in records if _utc(r.started_at) >= after]
        order = params.get("order") or "desc"
        if order not in ("asc", "desc"):
            raise HTTPException(400, "order must be asc or desc")
        if order == "asc":
            records.reverse()
        return records

    async def get(self, request: Request) -> Response:
        return JSONResponse(self._detail(self._sandbox_or_404(request.path_params["sandbox_id"])))

    async def kill(self, request: Request) -> Response:
        if not await self.manager.kill(request.path_params["sandbox_id"]):
            raise HTTPException(404, f"sandbox {request.path_params['sandbox_id']} not found")
        return Response(status_code=204)

    async def set_timeout(self, request: Request) -> Response:
        body = await self._json(request)
        if "timeout" not in body:
            raise HTTPException(400, "timeout is required")
        timeout = self._timeout(body["timeout"])
        if await self.manager.set_timeout(request.path_params["sandbox_id"], timeout) is None:
            raise HTTPException(404, f"sandbox {request.path_params['sandbox_id']} not found")
        return Response(status_code=204)

    async def connect(self, request: Request) -> Response:
        """200 with the sandbox when it runs (its life only ever extended, as on E2B); 201 when this
        resumed it from paused."""
        body = await self._json(request)
        sandbox_id = request.path_params["sandbox_id"]
        self._sandbox_or_404(sandbox_id)
        record, resumed = await self._resume(sandbox_id, self._timeout(body.get("timeout")))
        return JSONResponse(self._created(record), 201 if resumed else 200)

    async def _resume(self, sandbox_id: str, timeout_s: int) -> tuple[SandboxRecord, bool]:
        try:
            outcome = await self.manager.resume(sandbox_id, timeout_s)
        except SandboxLimitReached as exc:
            raise HTTPException(429, str(exc)) from None
        except SandboxStartError as exc:
            log.error("sandbox %s failed to resume: %s", sandbox_id, exc)
            message = "the sandbox failed to resume (it stays paused); see the sandbox host's log"
            raise HTTPException(500, message) from None
        if outcome is None:
            raise HTTPException(404, f"sandbox {sandbox_id} not found")
        return outcome

    async def resume(self, request: Request) -> Response:
        """The deprecated POST /sandboxes/{id}/resume: 201 when it resumed it, 409 when it runs."""
        body = await self._json(request)
        sandbox_id = request.path_params["sandbox_id"]
        if self._sandbox_or_404(sandbox_id).state != PAUSED:
            raise HTTPException(409, f"sandbox {sandbox_id} is already running")
        record, _ = await self._resume(sandbox_id, self._timeout(body.get("timeout")))
        return JSONResponse(self._created(record), 201)

    async def pause(self, request: Request) -> Response:
        """204 paused; 409 already paused; 404. The local host keeps the files, not the memory: any
        `memory` asked for, a resume starts the sandbox's processes afresh (sandbox_host/README.md)."""
        sandbox_id = request.path_params["sandbox_id"]
        try:
            paused = await self.manager.pause(sandbox_id)
        except SandboxPauseError as exc:
            log.error("sandbox %s failed to pause: %s", sandbox_id, exc)
            raise HTTPException(500, "the sandbox failed to pause; see the sandbox host's log") from None
        if paused is None:
            raise HTTPException(404, f"sandbox {sandbox_id} not found")
        if not paused:
            raise HTTPException(409, f"sandbox {sandbox_id} is already paused")
        return Response(status_code=204)

    async def unsupported(self, request: Request) -> Response:
        if request.url.path.endswith(("/snapshots", "/fork")):
            feature = "snapshots" if request.url.path.endswith("/snapshots") else "fork"
            message = (
                f"{feature} of a sandbox are not supported by the local sandbox host: it pauses a sandbox "
                "with its files (pause, then connect to resume)"
            )
            return error_response(501, message)
        return error_response(501, f"{request.method} {request.url.path} is not supported by the local sandbox host")

    def app(self) -> Starlette:
        async def http_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, HTTPException)
            return error_response(exc.status_code, exc.detail)

        sid = "/sandboxes/{sandbox_id}"
        routes = [
            Route("/v2/sandboxes", self.create, methods=["POST"]),
            Route("/sandboxes", self.create, methods=["POST"]),
            Route("/v2/sandboxes", self.list_v2, methods=["GET"]),
            Route("/sandboxes", self.list_v1, methods=["GET"]),
            Route(sid, self.get, methods=["GET"]),
            Route(sid, self.kill, methods=["DELETE"]),
            Route(sid + "/timeout", self.set_timeout, methods=["POST"]),
            Route("/v2" + sid + "/connect", self.connect, methods=["POST"]),
            Route(sid + "/connect", self.connect, methods=["POST"]),
            Route(sid + "/pause", self.pause, methods=["POST"]),
            Route(sid + "/resume", self.resume, methods=["POST"]),
        ]
        routes += [
            Route(sid + suffix, self.unsupported, methods=["POST", "GET", "PUT"])
            for suffix in ("/snapshots", "/fork", "/refreshes", "/network", "/metrics", "/logs")
        ]
        return Starlette(routes=routes, exception_handlers={HTTPException: http_error})
