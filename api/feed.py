"""Build events for Server-Sent Events streams.

Activities persist every transition (and log line), so the database is the event log. One feed task
per process polls it for all builds that have subscribers (one batched query per tick) and fans new
transitions out to per-subscriber queues; Temporal is never polled, and the task stops when the
last subscriber leaves.

With `logs`, a subscriber also gets the build's `build.log` events. Its event ids are then
`T.L`: the last transition seq and the last log seq it was sent, so `Last-Event-ID` resumes both
without a gap or a repeat whatever order they were interleaved in. An event is encoded once and
shared by every subscriber; only the short id line is per subscriber. A subscriber's queue is
bounded: one that does not read is not fed, its cursor stays, and later ticks re-read from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from dataclasses import dataclass

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from api.schemas import FailedEvent, LogEvent, ReadyEvent, StageEvent
from genloop.errors import GenloopError
from persistence.models import BuildLog, Job, JobTransition
from persistence.repository import JobRepository
from workflows.stages import Stage

log = logging.getLogger("genloop.api.feed")

POLL_INTERVAL_S = 0.2
ERROR_BACKOFF_S = 1.0
HEARTBEAT_S = 15.0
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
LOG_PAGE = 2000  # log lines read per build per tick
MAX_QUEUED = 500  # events waiting for one subscriber before the feed stops feeding it

_EVENT_NAMES = {Stage.READY: "build.ready", Stage.FAILED: "build.failed", Stage.CANCELLED: "build.cancelled"}


@dataclass(frozen=True)
class BuildEvent:
    seq: int
    terminal: bool
    body: bytes  # `event:` and `data:` lines, encoded once, shared by every subscriber of the build
    log: bool = False  # a build.log event (seq: the log line's), else a stage event (seq: the transition's)
    at: float = 0.0  # when it happened (POSIX seconds): interleaves logs and stages in a tick

    @property
    def frame(self) -> bytes:
        """The whole SSE event for a stream without logs (id: the transition's seq)."""
        return f"id: {self.seq}\n".encode() + self.body


@dataclass(frozen=True)
class Delivery:
    """An event for a subscriber with logs: the shared event and that subscriber's `T.L` id."""

    event: BuildEvent
    event_id: str

    @property
    def frame(self) -> bytes:
        return f"id: {self.event_id}\n".encode() + self.event.body


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
    body = f"event: {name}\ndata: {data.model_dump_json()}\n\n"
    return BuildEvent(seq=transition.seq, terminal=stage.terminal, body=body.encode(), at=transition.at.timestamp())


def encode_log(line: BuildLog) -> BuildEvent:
    data = LogEvent(seq=line.seq, stage=Stage(line.stage), attempt=line.attempt, stream=line.stream, text=line.text,
                    at=line.at)
    body = f"event: build.log\ndata: {data.model_dump_json()}\n\n"
    return BuildEvent(seq=line.seq, terminal=False, body=body.encode(), log=True, at=line.at.timestamp())


def event_id(transition_seq: int, log_seq: int) -> str:
    return f"{transition_seq}.{log_seq}"


def parse_event_id(value: str) -> tuple[int, int]:
    """`T` (a stream without logs) or `T.L`; the caller has checked the shape."""
    t, _, log = value.partition(".")
    return int(t), int(log or 0)


class Subscription:
    def __init__(self, build_id: str, cursor: int, *, logs: bool = False, log_cursor: int = 0) -> None:
        self.build_id = build_id
        self.cursor = cursor  # the last transition seq queued for this subscriber
        self.logs = logs
        self.log_cursor = log_cursor  # the last log seq queued (with logs)
        # Bounded by MAX_QUEUED (checked by the feed); the events themselves are shared.
        self.queue: asyncio.Queue[BuildEvent | Delivery] = asyncio.Queue()

    def offer(self, event: BuildEvent) -> bool:
        """Queue `event` if this subscriber has not had it; False once its queue is full."""
        if self.logs and self.queue.qsize() >= MAX_QUEUED:
            return False
        if event.log:
            if not self.logs or event.seq <= self.log_cursor:
                return True
            self.log_cursor = event.seq
        else:
            if event.seq <= self.cursor:
                return True
            self.cursor = event.seq
        self.queue.put_nowait(Delivery(event, event_id(self.cursor, self.log_cursor)) if self.logs else event)
        return True


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

    def subscribe(self, build_id: str, after_seq: int, *, logs: bool = False, after_log: int = 0) -> Subscription:
        sub = Subscription(build_id, after_seq, logs=logs, log_cursor=after_log)
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
                if await self._tick():
                    delay = 0  # a full page of logs: more are waiting

            except GenloopError as err:
                # Subscribers keep their cursors and get heartbeats meanwhile; nothing is lost.
                log.warning("event feed: %s", err)
                delay = ERROR_BACKOFF_S
            except Exception:
                # A bug in one tick must not silently end every open stream.
                log.exception("event feed tick failed")
                delay = ERROR_BACKOFF_S
            await asyncio.sleep(delay)

    async def _tick(self) -> bool:
        """One round for every followed build; True when a build had more log lines than a page."""
        cursors = {build_id: min(s.cursor for s in subs) for build_id, subs in self._subscribers.items()}
        log_cursors = {
            build_id: min(s.log_cursor for s in subs if s.logs)
            for build_id, subs in self._subscribers.items() if any(s.logs for s in subs)
        }
        fresh = await self._repo.transitions_after(cursors)
        # After the transitions: every line an activity flushed before its stage ended is visible.
        lines = await self._repo.logs_after(log_cursors, limit=LOG_PAGE) if log_cursors else {}
        more = False
        for build_id, rows in fresh.items():
            logs = lines.get(build_id, [])
            if not rows and not logs:
                continue
            full = len(logs) >= LOG_PAGE
            more = more or full
            if full:  # the build's end waits until its remaining lines are sent
                rows = [r for r in rows if not Stage(r.stage).terminal]
            job = await self._repo.get(build_id) if any(Stage(r.stage).terminal for r in rows) else None
            events = [encode_event(row, job) for row in rows]
            if logs:
                # Lines and stages by time, each kind kept in seq order (a worker's clock and the
                # database's need not agree); a terminal event always last (it ends the stream).
                stages = [e for e in events if not e.terminal]
                merged = heapq.merge(stages, (encode_log(line) for line in logs), key=lambda e: e.at)
                events = [*merged, *(e for e in events if e.terminal)]
            for sub in self._subscribers.get(build_id, ()):
                # A subscriber that joined during the query with an older cursor is not covered by
                # these rows; the next tick queries from its cursor.
                if sub.cursor < cursors[build_id] or (sub.logs and sub.log_cursor < log_cursors[build_id]):
                    continue
                for event in events:
                    if not sub.offer(event):
                        break
        return more


class EventStreamResponse(Response):
    """Streams a build's events until its terminal event or the client's disconnect, whichever
    comes first; the subscription is released either way."""

    media_type = "text/event-stream"

    def __init__(self, feed: TransitionFeed, build_id: str, after_seq: int, *, heartbeat_s: float = HEARTBEAT_S,
                 logs: bool = False, after_log: int = 0) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers(SSE_HEADERS)
        self._feed = feed
        self._build_id = build_id
        self._after_seq = after_seq
        self._heartbeat_s = heartbeat_s
        self._logs = logs
        self._after_log = after_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sub = self._feed.subscribe(self._build_id, self._after_seq, logs=self._logs, after_log=self._after_log)
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
            # Whatever else is queued goes in the same write: one send per event would cap a chatty
            # build's stream at what the event loop can do in sends, not in bytes.
            frames, terminal = [event.frame], _terminal(event)
            while not terminal and not sub.queue.empty() and len(frames) < 500:
                event = sub.queue.get_nowait()
                frames.append(event.frame)
                terminal = _terminal(event)
            await send({"type": "http.response.body", "body": b"".join(frames), "more_body": True})
            if terminal:
                break
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _terminal(event: BuildEvent | Delivery) -> bool:
    return (event.event if isinstance(event, Delivery) else event).terminal


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
