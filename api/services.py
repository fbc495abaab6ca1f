"""What the routes share: settings, the repository, the event feed and the Temporal connection."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from temporalio.client import Client

from api.errors import unavailable
from api.feed import TransitionFeed
from api.schemas import TriggerShapes
from genloop.settings import Settings
from genloop.temporal import connect
from persistence.repository import JobRepository

log = logging.getLogger("genloop.api")

CONNECT_TIMEOUT_S = 5.0


class TemporalGateway:
    """Connects on first use and again after a failure, so the API starts (and /healthz reports)
    while Temporal is down, answering 503 to calls that need it until it is back."""

    def __init__(self, settings: Settings, client: Client | None = None) -> None:
        self._settings = settings
        self._client = client
        self._lock = asyncio.Lock()

    async def client(self) -> Client:
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is None:
                try:
                    self._client = await asyncio.wait_for(connect(self._settings), CONNECT_TIMEOUT_S)
                except Exception as exc:  # the SDK reports a failed connect as a bare RuntimeError
                    log.warning("cannot connect to Temporal at %s: %s", self._settings.temporal.target, exc)
                    raise unavailable() from exc
        return self._client


@dataclass
class Services:
    settings: Settings
    repo: JobRepository
    feed: TransitionFeed
    temporal: TemporalGateway
    shapes: TriggerShapes  # the trigger body's shapes for this server's runners
    openapi: dict[str, Any]
