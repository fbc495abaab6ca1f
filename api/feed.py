"""Build events for Server-Sent Events streams.

Activities persist every transition, so the database is the event log. One feed task per process
polls it for all builds that have subscribers (one batched query per tick) and fans new
transitions out to per-subscriber queues; Temporal is never polled, and the task stops when the
last subscriber leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from api.schemas import FailedEvent, ReadyEvent, StageEvent
from genloop.errors import GenloopError
from persistence.models import Job, JobTransition
from persistence.repository import JobRepository
from workflows.stages import Stage

log = logging.getLogger("genloop.api.feed")

POLL_INTERVAL_S = 0.2
ERROR_BACKOFF_S = 1.0
HEARTBEAT_S = 15.0
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

_EVENT_NAMES = {Stage.READY: "build.ready", Stage.FAILED: "build.failed", Stage.CANCELLED: "build.cancelled"}


@dataclass(frozen=True)
class BuildEvent:
    seq: int
    terminal: bool
    frame: bytes  # encoded once, shared by every subscriber of the build


def encode_event(transition: JobTransition, job: Job | None) -> BuildEvent:
    """The SSE frame for a transition. Terminal events carry the job's outcome, so need the job."""
    stage = Stage(transition.stage)
    base = dict(stage=stage, label=stage.label, message=transition.message, at=transition.at)
    if stage.terminal and job is None:
        raise ValueError(f"the {stage.value} event of build {transition.build_id} needs its job")
    if stage is Stage.READY:
        data: StageEvent = ReadyEvent(**base, preview_url=job.preview_url, build_version=job.build_version)
    elif stage is Stage.FAILED:
        data = FailedEvent(**base, error_message=job.error_message, debug_id=job.debug_id)
    else:
        data = StageEvent(**base)
    name = _EVENT_NAMES.get(stage, "build.stage.started")
    # JSON never contains a raw newline, so `data` is always a single SSE line.
    frame = f"id: {transition.seq}\nevent: {name}\ndata: {data.model_dump_json()}\n\n"
    return BuildEvent(seq=transition.seq, terminal=stage.terminal, frame=frame.encode())


class Subscription:
    def __init__(self, build_id: str, cursor: int) -> None:
        self.build_id = build_id
        self.cursor = cursor  # the last seq queued for this subscriber
        # Unbounded on purpose: a build has a handful of transitions, so this cannot grow.
        self.queue: asyncio.Queue[BuildEvent] = asyncio.Queue()


class TransitionFeed:
    def __init__(self, repo: JobRepository, *, interval_s: float = POLL_INTERVAL_S) -> None:
        self._repo = repo
        self._interval_s = interval_s
        self._subscribers: dict[str, set[Subscription]] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def polling(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def subscriber_count(self) -> int:
        return sum(len(subs) for subs in self._subscribers.values())

    def subscribe(self, build_id: str, after_seq: int) -> Subscription:
        sub = Subscription(build_id, after_seq)
        self._subscribers.setdefault(build_id, set()).add(sub)
        if not self.polling:
            self._task = asyncio.create_task(self._run(), name="genloop-event-feed")
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subscribers.get(sub.build_id)
        if subs is None:
            return
        subs.discard(sub)
        if not subs:
            del self._subscribers[sub.build_id]

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        # Ends by itself once nobody listens; the next subscribe starts a new task.
        while self._subscribers:
            delay = self._interval_s
            try:
                await self._tick()
            except GenloopError as err:
                # Subscribers keep their cursors and get heartbeats meanwhile; nothing is lost.
                log.warning("event feed: %s", err)
                delay = ERROR_BACKOFF_S
            except Exception:
                # A bug in one tick must not silently end every open stream.
                log.exception("event feed tick failed")
                delay = ERROR_BACKOFF_S
            await asyncio.sleep(delay)

    async def _tick(self) -> None:
        cursors = {build_id: min(s.cursor for s in subs) for build_id, subs in self._subscribers.items()}
        fresh = await self._repo.transitions_after(cursors)
        for build_id, rows in fresh.items():
            if not rows:
                continue
            job = await self._repo.get(build_id) if any(Stage(r.stage).terminal for r in rows) else None
            events = [encode_event(row, job) for row in rows]
            for sub in self._subscribers.get(build_id, ()):
                # A subscriber that joined during the query with an older cursor is not covered by
                # these rows; the next tick queries from its cursor.
                if sub.cursor < cursors[build_id]:
                    continue
                for event in events:
                    if event.seq > sub.cursor:
                        sub.queue.put_nowait(event)
                        sub.cursor = event.seq


class EventStreamResponse(Response):
    """Streams a build's events until its terminal event or the client's disconnect, whichever
    comes first; the subscription is released either way."""

    media_type = "text/event-stream"

    def __init__(self, feed: TransitionFeed, build_id: str, after_seq: int, *, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers(SSE_HEADERS)
        self._feed = feed
        self._build_id = build_id
        self._after_seq = after_seq
        self._heartbeat_s = heartbeat_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sub = self._feed.subscribe(self._build_id, self._after_seq)
        try:
            async with anyio.create_task_group() as tasks:

                async def stream() -> None:
                    await self._stream(sub, send)
                    tasks.cancel_scope.cancel()

                tasks.start_soon(stream)
                await _disconnected(receive)
                tasks.cancel_scope.cancel()
        finally:
            self._feed.unsubscribe(sub)

    async def _stream(self, sub: Subscription, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        while True:
            try:
                event = await asyncio.wait_for(sub.queue.get(), self._heartbeat_s)
            except TimeoutError:
                # Keeps proxies from timing the connection out and reveals dead clients.
                await send({"type": "http.response.body", "body": b": heartbeat\n\n", "more_body": True})
                continue
            await send({"type": "http.response.body", "body": event.frame, "more_body": True})
            if event.terminal:
                break
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
