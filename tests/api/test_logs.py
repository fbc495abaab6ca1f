"""Build logs through the API process, end to end: a worker of the test's own (real activities, real
sandbox host, runner doubles that write printing apps) builds; the API serves what it stored.

Builds start on the test's own task queue (its worker's log policy and fix attempts) and are read
through the session's API, which shares the database."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import sys
import uuid

import httpx
import psutil
import pytest

from activities.logs import LogPolicy
from genloop.cli.client import EXIT_FAILED, follow_build
from genloop.http import preview_client
from persistence.repository import TRUNCATED_SOURCE
from tests.api.conftest import REPO_ROOT, SQLITE_ONLY, api_env
from tests.api.sse import Event, read_events
from tests.helpers.doubles import LOG_SECRET, CrashingAppRunnerDouble, LoggingAppRunnerDouble
from tests.workflows.conftest import make_stack

TERMINAL = {"build.ready", "build.failed", "build.cancelled"}


@contextlib.asynccontextmanager
async def log_stack(temporal_client, sandbox_host, repo, **options):
    runners = {
        "logging": LoggingAppRunnerDouble(lines=20),
        "chatty": LoggingAppRunnerDouble(lines=3000, dependency=False),
        "ticking": LoggingAppRunnerDouble(ticks=True, dependency=False),
        "crashing-app": CrashingAppRunnerDouble(),
    }
    async with make_stack(temporal_client, sandbox_host, repo, extra_runners=runners, **options) as stack:
        yield stack


async def all_lines(http, build_id: str, **params) -> list[dict]:
    lines, after = [], 0
    while True:
        page = (await http.get(f"/v1/builds/{build_id}/logs", params={"after": after, "limit": 5000, **params})).json()
        lines += page["lines"]
        if not page["lines"]:
            return lines
        after = page["next_after"]


async def follow_with_logs(http, build_id: str, *, last_event_id: str | None = None,
                           stop_after_logs: int | None = None) -> list[Event]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events: list[Event] = []
    async with http.stream("GET", f"/v1/builds/{build_id}/events", params={"logs": "1"}, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        async for event in read_events(response):
            events.append(event)
            if stop_after_logs is not None and sum(e.name == "build.log" for e in events) >= stop_after_logs:
                break
    return events


def _ids(events: list[Event]) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in e.raw_id.split(".")) for e in events]


async def test_install_output_and_startup_line_arrive_while_the_build_runs(
    http, temporal_client, sandbox_host, repo
):
    async with log_stack(temporal_client, sandbox_host, repo) as stack:
        handle = await stack.start("an app that logs", runner="logging")
        build_id = handle.id
        await asyncio.wait_for(_until_exists(http, build_id), 60)
        streamed = asyncio.create_task(follow_with_logs(http, build_id))

        # While DEPS runs, the logs endpoint already has the install's first lines.
        async def install_lines_during_deps() -> str:
            while True:
                response = await http.get(f"/v1/builds/{build_id}/logs", params={"stage": "deps"})
                if response.status_code == 200 and response.json()["lines"]:
                    return (await http.get(f"/v1/builds/{build_id}")).json()["stage"]
                await asyncio.sleep(0.05)

        assert await asyncio.wait_for(install_lines_during_deps(), 120) == "deps"
        result = await handle.result()
        events = await asyncio.wait_for(streamed, 60)

    assert result.preview_url
    names = [e.name for e in events]
    assert names[-1] == "build.ready" and "build.log" in names and "build.stage.started" in names
    logs = [e for e in events if e.name == "build.log"]
    stages = [e for e in events if e.name != "build.log"]
    assert [e.data["stage"] for e in stages] == ["queued", "starting", "scaffold", "code", "deps", "checks", "ready"]
    texts = [(e.data["stage"], e.data["text"]) for e in logs]
    assert any(stage == "deps" and "Successfully installed genloop-demo-dep" in t for stage, t in texts)
    assert ("checks", LoggingAppRunnerDouble.STARTUP) in texts
    assert any(stage == "code" and t.startswith("summary: ") for stage, t in texts)
    # Stage events come in order with the lines: the install's output before CHECKS started.
    checks_at = next(i for i, e in enumerate(events) if e.name != "build.log" and e.data["stage"] == "checks")
    assert any("Successfully installed" in e.data["text"] for e in events[:checks_at] if e.name == "build.log")
    # Ids: T.L, never going back, each line once.
    ids = _ids(events)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert [e.data["seq"] for e in logs] == sorted({e.data["seq"] for e in logs})

    # The same lines from the logs endpoint; the secret redacted everywhere, the DB included.
    stored = await all_lines(http, build_id)
    assert [line["seq"] for line in stored] == [e.data["seq"] for e in logs]
    assert any("DB_PASSWORD=***" in line["text"] and line["stream"] == "stderr" for line in stored)
    assert not [line for line in stored if LOG_SECRET in line["text"]]
    assert not [row for row in await repo.list_logs(build_id, limit=5000) if LOG_SECRET in row.text]
    assert LOG_SECRET not in str([e.data for e in events])
    deps = (await http.get(f"/v1/builds/{build_id}/logs", params={"stage": "deps"})).json()["lines"]
    assert deps and {line["stage"] for line in deps} == {"deps"}
    ndjson = await http.get(f"/v1/builds/{build_id}/logs", headers={"Accept": "application/x-ndjson"})
    assert ndjson.headers["content-type"] == "application/x-ndjson"
    assert [json.loads(line)["seq"] for line in ndjson.text.splitlines()] == [line["seq"] for line in stored]
    found = (await http.get(f"/v1/builds/{build_id}/logs", params={"q": "successfully INSTALLED"})).json()["lines"]
    assert [line["stage"] for line in found] == ["deps"] and "genloop-demo-dep" in found[0]["text"]
    literal = (await http.get(f"/v1/builds/{build_id}/logs", params={"q": "line 00001_"})).json()["lines"]
    assert literal == []  # `_` and `%` are text, not wildcards
    tail = (await http.get(f"/v1/builds/{build_id}/logs", params={"tail": "3"})).json()["lines"]
    assert [line["seq"] for line in tail] == [line["seq"] for line in stored[-3:]]

    # A finished build: with logs, the lines after the client's id and then the outcome; all of them: 204.
    assert (await http.get(f"/v1/builds/{build_id}/events", params={"logs": "1"},
                           headers={"Last-Event-ID": events[-1].raw_id})).status_code == 204
    replay = await follow_with_logs(http, build_id, last_event_id=f"0.{logs[-5].data['seq']}")
    assert [e.name for e in replay] == ["build.log"] * 4 + ["build.ready"]
    await stack.sandboxes.kill(result.sandbox_id)


async def _exists(http, build_id: str) -> bool:
    return (await http.get(f"/v1/builds/{build_id}")).status_code == 200


@SQLITE_ONLY
async def test_reconnecting_with_last_event_id_misses_nothing_and_repeats_nothing(
    http, temporal_client, sandbox_host, repo
):
    async with log_stack(temporal_client, sandbox_host, repo) as stack:
        handle = await stack.start("a chatty app", runner="chatty")
        await asyncio.wait_for(_until_exists(http, handle.id), 60)
        received: list[Event] = []
        last_id: str | None = None
        while not received or received[-1].name not in TERMINAL:
            part = await follow_with_logs(http, handle.id, last_event_id=last_id, stop_after_logs=700)
            received += part
            last_id = part[-1].raw_id
        result = await handle.result()

    seqs = [e.data["seq"] for e in received if e.name == "build.log"]
    stored = [line["seq"] for line in await all_lines(http, handle.id)]
    assert len(stored) > 3000
    assert seqs == stored  # no gap, no repeat, in order
    stage_names = [e.data["stage"] for e in received if e.name != "build.log"]
    assert stage_names == ["queued", "starting", "scaffold", "code", "deps", "checks", "ready"]
    await stack.sandboxes.kill(result.sandbox_id)


async def _until_exists(http, build_id: str) -> None:
    while not await _exists(http, build_id):
        await asyncio.sleep(0.05)


@SQLITE_ONLY
async def test_a_crashing_apps_traceback_is_in_its_attempts_and_the_failed_builds_logs(
    http, temporal_client, sandbox_host, repo
):
    async with log_stack(temporal_client, sandbox_host, repo, fix_attempts=1) as stack:
        handle = await stack.start("an app that crashes", runner="crashing-app")
        with pytest.raises(Exception):  # noqa: B017 - the build fails: that is the point
            await handle.result()
    build = (await http.get(f"/v1/builds/{handle.id}")).json()
    assert build["stage"] == "failed" and build["debug_id"] and build["links"]["logs"] == f"/v1/builds/{handle.id}/logs"
    checks = await all_lines(http, handle.id, stage="checks")
    for attempt in (1, 2):
        texts = [line["text"] for line in checks if line["attempt"] == attempt]
        assert "Traceback (most recent call last):" in texts, (attempt, texts)
        assert CrashingAppRunnerDouble.ERROR in texts
        assert any("exited with code 1" in t for t in texts)
    code = [line["text"] for line in await all_lines(http, handle.id, stage="code") if line["attempt"] == 2]
    assert any(t.startswith("fixing: `python3 app.py` failed in checks") for t in code)
    # The failed build's stream replays its lines, the traceback among them, before build.failed.
    events = await follow_with_logs(http, handle.id)
    assert events[-1].name == "build.failed"
    assert CrashingAppRunnerDouble.ERROR in [e.data.get("text") for e in events]


@SQLITE_ONLY
async def test_the_cap_truncates_with_a_marker_and_the_build_still_succeeds(http, temporal_client, sandbox_host, repo):
    async with log_stack(temporal_client, sandbox_host, repo, logs=LogPolicy(cap_bytes=16384)) as stack:
        handle = await stack.start("a chatty app", runner="chatty")
        result = await handle.result()
    lines = await all_lines(http, handle.id)
    assert lines[-1]["text"].startswith("[genloop] log truncated") and lines[-1]["stream"] == "system"
    assert sum(len(line["text"].encode()) for line in lines[:-1]) <= 16384
    assert (await http.get(f"/v1/builds/{handle.id}/logs")).json()["truncated"] is True
    rows = await repo.list_logs(handle.id, limit=5000)
    assert [r.source for r in rows].count(TRUNCATED_SOURCE) == 1
    assert (await http.get(f"/v1/builds/{handle.id}")).json()["stage"] == "ready"
    await stack.sandboxes.kill(result.sandbox_id)


@SQLITE_ONLY
async def test_follow_app_tails_the_running_apps_output(http, temporal_client, sandbox_host, repo):
    async with log_stack(temporal_client, sandbox_host, repo) as stack:
        handle = await stack.start("an app that ticks", runner="ticking")
        result = await handle.result()
        ticks: list[str] = []
        async with http.stream("GET", f"/v1/builds/{handle.id}/logs", params={"follow": "app"}) as response:
            assert response.status_code == 200
            async for event in read_events(response):
                assert event.name == "app.log"
                ticks.append(event.data["text"])
                if len(ticks) >= 3:
                    break
        # Leaving the stream detaches from the app; it keeps serving.
        async with preview_client(timeout=10) as preview:
            assert (await preview.get(result.preview_url)).status_code == 200
        await stack.sandboxes.kill(result.sandbox_id)
    assert all(t.startswith("tick ") for t in ticks), ticks
    numbers = [int(t.split()[1]) for t in ticks]
    assert numbers == list(range(numbers[0], numbers[0] + 3))  # live and in order
    gone = await http.get(f"/v1/builds/{handle.id}/logs", params={"follow": "app"})
    assert gone.status_code == 409 and gone.json()["error"]["code"] == "conflict"


@SQLITE_ONLY
async def test_bad_log_parameters_are_4xx(http, worker):
    build_id = f"b-logs-{uuid.uuid4().hex[:8]}"
    await worker.repo.create_job(build_id, "p-logs", "an app")
    for params in ({"after": "-1"}, {"after": "x"}, {"limit": "0"}, {"limit": "5001"}, {"stage": "nope"},
                   {"after": "1", "tail": "2"}, {"follow": "worker"}, {"follow": "app", "after": "1"},
                   {"q": ""}, {"q": "x" * 201},
                   {"since": "1"}):
        response = await http.get(f"/v1/builds/{build_id}/logs", params=params)
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_parameter", params
    follow = await http.get(f"/v1/builds/{build_id}/logs", params={"follow": "app"})
    assert follow.status_code == 409  # queued: no app yet
    assert (await http.get(f"/v1/builds/{build_id}/events", params={"logs": "maybe"})).status_code == 400
    for bad in ("1.x", "1.2.3", "-1", ".5"):
        response = await http.get(f"/v1/builds/{build_id}/events", params={"logs": "1"}, headers={"Last-Event-ID": bad})
        assert response.status_code == 400, bad
    # Without logs, an id with a log part is refused as before.
    assert (await http.get(f"/v1/builds/{build_id}/events", headers={"Last-Event-ID": "1.2"})).status_code == 400
    assert (await http.get(f"/v1/builds/{build_id}/logs")).json() == {"lines": [], "next_after": 0, "truncated": False}


@SQLITE_ONLY
async def test_200_sse_clients_on_one_build_each_get_every_line(api, http, temporal_client, sandbox_host, repo):
    clients = 200
    async with log_stack(temporal_client, sandbox_host, repo) as stack:
        handle = await stack.start("a chatty app", runner="chatty")
        await asyncio.wait_for(_until_exists(http, handle.id), 60)
        limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=0)
        process = psutil.Process(api.process.pid)
        rss_before = process.memory_info().rss
        peak = [rss_before]

        async def sample() -> None:
            while True:
                peak[0] = max(peak[0], process.memory_info().rss)
                await asyncio.sleep(0.1)

        sampler = asyncio.create_task(sample())
        async with api.client(limits=limits, timeout=180) as many:
            results = await asyncio.gather(*(follow_with_logs(many, handle.id) for _ in range(clients)))
        sampler.cancel()
        result = await handle.result()
        await stack.sandboxes.kill(result.sandbox_id)

    stored = [line["seq"] for line in await all_lines(http, handle.id)]
    assert len(stored) > 3000
    for events in results:
        assert events[-1].name == "build.ready"
        assert [e.data["seq"] for e in events if e.name == "build.log"] == stored
    print(f"\nAPI memory with {clients} SSE clients on one build ({len(stored)} lines): "
          f"rss before {rss_before / 2**20:.0f} MiB, peak {peak[0] / 2**20:.0f} MiB")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@SQLITE_ONLY
async def test_cli_follows_with_progress_and_shows_the_last_lines_of_a_failure(
    api, http, temporal_client, sandbox_host, repo
):
    async with log_stack(temporal_client, sandbox_host, repo) as stack:
        handle = await stack.start("an app that crashes", runner="crashing-app")
        await asyncio.wait_for(_until_exists(http, handle.id), 60)
        piped, terminal = io.StringIO(), _Terminal()
        codes = await asyncio.gather(follow_build(http, handle.id, piped), follow_build(http, handle.id, terminal))
    assert codes == [EXIT_FAILED, EXIT_FAILED]
    for out in (piped, terminal):
        text = out.getvalue()
        assert "Build failed: " in text and "debug_id: " in text
        tail = text.split("log lines (genloop logs", 1)[1].splitlines()[1:]
        assert any(CrashingAppRunnerDouble.ERROR in line for line in tail)
        assert len([line for line in tail if line.startswith("  [")]) <= 30
    assert "\r" not in piped.getvalue() and "  Checking the app...\n" in piped.getvalue()
    assert "\r\x1b[K  Checking the app..." in terminal.getvalue()

    env = {**api_env(), "GENLOOP_API_HOST": "127.0.0.1", "GENLOOP_API_PORT": api.url.rsplit(":", 1)[1],
           "GENLOOP_API_TOKEN": api.token}
    for argv, code in ((["logs", handle.id], 0), (["logs", handle.id, "-f", "--stage", "checks"], EXIT_FAILED)):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "genloop.cli", *argv, cwd=REPO_ROOT, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == code, err.decode()
        assert f"checks! {CrashingAppRunnerDouble.ERROR}" in out.decode()
