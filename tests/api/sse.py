"""A minimal Server-Sent Events reader for the tests (text/event-stream, as browsers parse it)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Event:
    name: str
    data: dict[str, Any]
    id: int | None  # a plain integer id (stage-only streams)
    received: float = field(default_factory=time.time)
    raw_id: str | None = None  # the id as sent (`T.L` on streams with logs)


async def read_events(response: httpx.Response, comments: list[str] | None = None) -> AsyncIterator[Event]:
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if not line:
            if "data" in fields:
                raw = fields.get("id")
                event_id = int(raw) if raw is not None and raw.isdigit() else None
                yield Event(fields.get("event", "message"), json.loads(fields["data"]), event_id, raw_id=raw)
            fields = {}
        elif line.startswith(":"):
            if comments is not None:
                comments.append(line[1:].strip())
        else:
            key, _, value = line.partition(":")
            fields[key] = value.removeprefix(" ")
