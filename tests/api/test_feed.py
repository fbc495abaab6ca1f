"""The shared event feed and the stream's lifecycle, in process where the internals are visible:
one query per tick for all builds, fan-out per subscriber, heartbeats, and cleanup on disconnect."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import httpx
import uvicorn

from api.app import create_app
from api.feed import EventStreamResponse, TransitionFeed
from genloop.settings import load_settings
from persistence.repository import JobRepository
from sandbox_host.testing import free_port
from tests.api.conftest import SLOW_MARKER, SQLITE_ONLY, new_project
from tests.api.sse import read_events
from workflows.stages import Stage


class CountingRepository:
    """The real repository, counting the feed's queries (a spy, not a fake)."""

    def __init__(self, repo: JobRepository) -> None:
        self._repo = repo
        self.queries: list[set[str]] = []

    async def transitions_after(self, cursors):
        self.queries.append(set(cursors))
        return await self._repo.transitions_after(cursors)

    def __getattr__(self, name):
        return getattr(self._repo, name)


async def _job(repo: JobRepository) -> str:
    build_id = f"b-{uuid.uuid4().hex}"
    await repo.create_job(build_id, new_project(), "an app")
    return build_id


async def _until(predicate, timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


@SQLITE_ONLY
async def test_one_query_per_tick_fanned_out_to_every_subscriber(repo):
    spy = CountingRepository(repo)
    feed = TransitionFeed(spy, interval_s=0.05)
    a, b = await _job(repo), await _job(repo)
    first_a, second_a, only_b = feed.subscribe(a, 0), feed.subscribe(a, 1), feed.subscribe(b, 0)
    try:
        await repo.transition(a, Stage.STARTING)
        await repo.transition(b, Stage.STARTING)
        await repo.transition(b, Stage.FAILED, error_message="friendly", error_detail="internal", debug_id="dbg-1")
        await _until(lambda: first_a.queue.qsize() == 2 and second_a.queue.qsize() == 1 and only_b.queue.qsize() == 3)

        assert [e.seq for e in _drain(first_a)] == [1, 2] and [e.seq for e in _drain(second_a)] == [2]
        events = _drain(only_b)
        assert [e.terminal for e in events] == [False, False, True]
        failed = events[-1].frame.decode()
        assert "event: build.failed" in failed and "dbg-1" in failed and "internal" not in failed
        # Every query covered both builds: one per tick, not one per subscriber or per build.
        assert spy.queries and all(q == {a, b} for q in spy.queries)
    finally:
        for sub in (first_a, second_a, only_b):
            feed.unsubscribe(sub)
    await _until(lambda: not feed.polling)
    polled = len(spy.queries)
    await asyncio.sleep(0.2)
    assert len(spy.queries) == polled  # nobody listens: no polling
    await feed.aclose()


def _drain(sub):
    events = []
    while not sub.queue.empty():
        events.append(sub.queue.get_nowait())
    return events


@SQLITE_ONLY
async def test_stream_heartbeats_and_releases_its_subscription_on_disconnect(repo):
    feed = TransitionFeed(repo, interval_s=0.05)
    build_id = await _job(repo)
    sent: list[dict] = []
    disconnect = asyncio.Event()

    async def receive():
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    response = EventStreamResponse(feed, build_id, after_seq=1, heartbeat_s=0.05)
    streaming = asyncio.create_task(response({"type": "http"}, receive, send))
    await _until(lambda: sum(m.get("body") == b": heartbeat\n\n" for m in sent) >= 2)
    assert feed.subscriber_count == 1 and feed.polling
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200

    disconnect.set()
    await asyncio.wait_for(streaming, 2)
    assert feed.subscriber_count == 0
    await _until(lambda: not feed.polling)
    await feed.aclose()


@contextlib.asynccontextmanager
async def serving(app) -> AsyncIterator[str]:
    """A real uvicorn server in this process, so the app's state can be inspected."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_level="warning"))
    task = asyncio.create_task(server.serve())
    await _until(lambda: server.started or task.done(), timeout=10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@SQLITE_ONLY
async def test_client_disconnect_over_http_cleans_up(tmp_path, temporal_client, worker, repo):
    settings = load_settings(
        environ={"GENLOOP_TEMPORAL_TASK_QUEUE": worker.task_queue, "GENLOOP_DATA_DIR": str(tmp_path)}
    )
    app = create_app(settings, client=temporal_client, repo=repo)
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        feed = app.state.services.feed
        accepted = await http.post(f"/v1/projects/{new_project()}/builds", json={"goal": f"{SLOW_MARKER} app"})
        assert accepted.status_code == 202, accepted.text
        build_id = accepted.json()["build_id"]

        async with http.stream("GET", f"/v1/builds/{build_id}/events") as stream:
            async for event in read_events(stream):
                if event.data["stage"] == "code":
                    break
            assert feed.subscriber_count == 1
        await _until(lambda: feed.subscriber_count == 0 and not feed.polling)

        assert (await http.post(f"/v1/builds/{build_id}/cancel", json={})).status_code == 202


class ExplodingRepository:
    """A repository double whose reads fail with an unexpected error carrying internal detail."""

    async def get(self, build_id):
        raise RuntimeError("secret internal detail: /var/lib/genloop password=hunter2")


async def test_unexpected_errors_are_generic_500s(tmp_path, temporal_client):
    settings = load_settings(environ={"GENLOOP_DATA_DIR": str(tmp_path)})
    app = create_app(settings, client=temporal_client, repo=ExplodingRepository())
    async with serving(app) as url, httpx.AsyncClient(base_url=url) as http:
        response = await http.get("/v1/builds/b-anything")
    assert response.status_code == 500
    assert response.json() == {"error": {"code": "internal_error", "message": "Internal server error."}}
