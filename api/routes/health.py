"""The service itself: health and the API description."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from api.routes.common import json_response, services
from api.schemas import ComponentHealth, Components, ComponentStatus, Health

log = logging.getLogger("genloop.api")

HEALTH_TIMEOUT_S = 3.0


async def healthz(request: Request) -> Response:
    svc = services(request)

    async def temporal() -> None:
        client = await svc.temporal.client()
        if not await client.service_client.check_health(timeout=timedelta(seconds=HEALTH_TIMEOUT_S)):
            raise RuntimeError("Temporal reports NOT_SERVING")

    checks = {"database": svc.repo.ping(), "temporal": temporal()}
    results = await asyncio.gather(
        *(asyncio.wait_for(check, HEALTH_TIMEOUT_S) for check in checks.values()), return_exceptions=True
    )
    status: dict[str, ComponentHealth] = {}
    for name, result in zip(checks, results, strict=True):
        if isinstance(result, BaseException):
            log.warning("health check: %s unavailable: %s", name, result)
            status[name] = ComponentHealth(status=ComponentStatus.UNAVAILABLE)
        else:
            status[name] = ComponentHealth(status=ComponentStatus.OK)
    healthy = all(c.status is ComponentStatus.OK for c in status.values())
    health = Health(
        status=ComponentStatus.OK if healthy else ComponentStatus.UNAVAILABLE, components=Components(**status)
    )
    return json_response(health, 200 if healthy else 503)


async def openapi(request: Request) -> Response:
    return JSONResponse(services(request).openapi)
