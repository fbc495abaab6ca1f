"""Builds through the API process: trigger, follow the events, read the outcome, cancel, list."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime

from genloop.http import preview_client
from tests.api.conftest import SLOW_MARKER, SQLITE_ONLY, new_project
from tests.api.sse import Event, read_events
from workflows.stages import LABELS, Stage

PIPELINE = ["queued", "starting", "scaffold", "code", "deps", "checks"]


async def trigger(http, project_id: str, goal: str, **headers: str) -> dict:
    response = await http.post(f"/v1/projects/{project_id}/builds", json={"goal": goal}, headers=headers)
    assert response.status_code == 202, response.text
    return response.json()


async def follow(
    http, build_id: str, *, headers: dict[str, str] | None = None, until: str | None = None
) -> list[Event]:
    """Events until the stream closes (or until a `build.stage.started` for stage `until`)."""
    events = []
    async with http.stream("GET", f"/v1/builds/{build_id}/events", headers=headers or {}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for event in read_events(response):
            events.append(event)
            if until is not None and event.data["stage"] == until:
                break
    return events


async def test_trigger_follow_events_until_ready(api, http, worker):
    project_id = new_project()
    accepted = await trigger(http, project_id, "a <b>todo</b> list for cats")
    build_id = accepted["build_id"]
    assert accepted["status"] == "queued" and accepted["project_id"] == project_id
    links = accepted["links"]
    assert (links["self"], links["events"], links["cancel"]) == (
        f"/v1/builds/{build_id}",
        f"/v1/builds/{build_id}/events",
        f"/v1/builds/{build_id}/cancel",
    )
    assert links["web_ui"].startswith("http://") and f"/namespaces/default/workflows/{build_id}/" in links["web_ui"]
    assert links["web_ui"].endswith("/history")

    subscribed = time.time()
    events = await follow(http, build_id)

    assert [e.name for e in events] == ["build.stage.started"] * len(PIPELINE) + ["build.ready"]
    assert [e.data["stage"] for e in events] == [*PIPELINE, "ready"]
    assert [e.id for e in events] == list(range(1, len(PIPELINE) + 2))
    assert all(e.data["label"] == LABELS[Stage(e.data["stage"])] for e in events)
    ready = events[-1].data
    assert ready["build_version"] == "build_v0_1" and ready["preview_url"]
    # Pushed within half a second of being persisted (or of subscribing, for history replayed).
    lags = [e.received - max(datetime.fromisoformat(e.data["at"]).timestamp(), subscribed) for e in events]
    assert max(lags) < 0.5, lags

    response = await http.get(f"/v1/builds/{build_id}")
    assert response.status_code == 200
    build = response.json()
    assert (build["stage"], build["label"], build["preview_url"], build["build_version"]) == (
        "ready",
        LABELS[Stage.READY],
        ready["preview_url"],
        "build_v0_1",
    )
    assert [h["stage"] for h in build["history"]] == [*PIPELINE, "ready"]
    assert [h["seq"] for h in build["history"]] == list(range(1, 8))
    assert build["sandbox_id"] and build["error_message"] is None and "error_detail" not in build
    assert build["links"]["web_ui"] == links["web_ui"]

    async with preview_client(timeout=10) as preview:
        page = await preview.get(ready["preview_url"])
    assert page.status_code == 200 and "a &lt;b&gt;todo&lt;/b&gt; list for cats" in page.text

    # A finished build: its outcome once, then the stream ends; resuming past it is a 204.
    [again] = await follow(http, build_id, headers={"Last-Event-ID": "3"})
    assert (again.name, again.id, again.data["preview_url"]) == ("build.ready", 7, ready["preview_url"])
    assert (await http.get(f"/v1/builds/{build_id}/events", headers={"Last-Event-ID": "7"})).status_code == 204

    await worker.sandboxes.kill(build["sandbox_id"])


@SQLITE_ONLY
async def test_resume_with_last_event_id(http):
    build_id = (await trigger(http, new_project(), f"{SLOW_MARKER} resumable"))["build_id"]
    first = await follow(http, build_id, until="code")
    assert [e.data["stage"] for e in first] == ["queued", "starting", "scaffold", "code"]
    resumed = await follow_with_cancel(http, build_id, last_event_id=first[1].id)
    assert [e.data["stage"] for e in resumed] == ["scaffold", "code", "cancelled"]


async def follow_with_cancel(http, build_id: str, *, last_event_id: int) -> list[Event]:
    events = []
    headers = {"Last-Event-ID": str(last_event_id)}
    async with http.stream("GET", f"/v1/builds/{build_id}/events", headers=headers) as response:
        async for event in read_events(response):
            events.append(event)
            if event.data["stage"] == "code":
                assert (await http.post(f"/v1/builds/{build_id}/cancel", json={})).status_code == 202
    return events


@SQLITE_ONLY
async def test_cancel_a_running_build(http):
    build_id = (await trigger(http, new_project(), f"{SLOW_MARKER} a slow app"))["build_id"]
    await follow(http, build_id, until="code")

    response = await http.post(f"/v1/builds/{build_id}/cancel", json={"reason": "changed my mind"})
    assert response.status_code == 202, response.text
    assert response.json()["build_id"] == build_id and response.json()["status"] == "code"

    [cancelled] = await follow(http, build_id, headers={"Last-Event-ID": "4"})
    assert cancelled.name == "build.cancelled" and cancelled.data["message"] == "changed my mind"
    build = (await http.get(f"/v1/builds/{build_id}")).json()
    assert build["stage"] == "cancelled" and [h["stage"] for h in build["history"]][-1] == "cancelled"

    again = await http.post(f"/v1/builds/{build_id}/cancel", json={})
    assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"
    missing = await http.post("/v1/builds/b-does-not-exist/cancel", json={})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


@SQLITE_ONLY
async def test_idempotency_key(http, temporal_client):
    project_id = new_project()
    key = f"key-{time.time_ns()}"
    url, headers = f"/v1/projects/{project_id}/builds", {"Idempotency-Key": key}
    concurrent = await asyncio.gather(*(http.post(url, json={"goal": "same app"}, headers=headers) for _ in range(5)))
    assert {r.status_code for r in concurrent} == {202}
    [build_id] = {r.json()["build_id"] for r in concurrent}
    runs = [w async for w in temporal_client.list_workflows(f"WorkflowId = '{build_id}'")]
    assert len(runs) == 1

    # Same key, different body: refused; an explicit default runner is the same body.
    conflict = await http.post(url, json={"goal": "another app"}, headers=headers)
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "conflict"

    # After the build has finished the key still means that build (the workflow id cannot be reused).
    await follow(http, build_id)
    replay = await http.post(url, json={"goal": "same app", "runner": "template"}, headers=headers)
    assert replay.status_code == 202 and replay.json()["build_id"] == build_id and replay.json()["status"] == "ready"
    assert (await http.get(f"/v1/projects/{project_id}/builds")).json()["builds"][0]["build_id"] == build_id

    # Keys are per project, and a request without a key is a new build.
    other = await trigger(http, new_project(), "same app", **{"Idempotency-Key": key})
    fresh = await trigger(http, project_id, "same app")
    assert len({build_id, other["build_id"], fresh["build_id"]}) == 3


@SQLITE_ONLY
async def test_list_builds_paginates_newest_first(http, worker):
    project_id = new_project()
    ids = [f"b-list-{project_id}-{n}" for n in range(5)]
    for build_id in ids:  # rows only: listing reads the database, no build needs to run
        await worker.repo.create_job(build_id, project_id, f"app {build_id}")

    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        response = await http.get(f"/v1/projects/{project_id}/builds", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        pages += 1
        seen += [b["build_id"] for b in page["builds"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1] and pages == 3
    assert all(b["stage"] == "queued" for b in page["builds"])

    unknown = await http.get(f"/v1/projects/{project_id}/builds", params={"cursor": "b-nope"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    empty = await http.get(f"/v1/projects/{new_project()}/builds")
    assert empty.json() == {"builds": [], "next_cursor": None}
