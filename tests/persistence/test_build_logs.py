"""Build logs through the log sink into the real database (both backends): numbering, redaction,
escaping, splitting, the cap, retention, and a retried writer that replays its output."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from datetime import UTC, datetime, timedelta

from temporalio.testing import ActivityEnvironment

from activities.build import BuildActivities
from activities.logs import LINE_MAX_CHARS, LogPolicy, LogSink
from activities.sweep import sweep_logs
from migrations.apply import upgrade
from persistence.repository import TRUNCATED_SOURCE, JobRepository
from workflows.stages import Stage


async def _new_build(repo) -> str:
    build_id = f"b-{uuid.uuid4().hex[:12]}"
    await repo.create_job(build_id, "p-logs", "logs")
    return build_id


async def test_lines_are_numbered_redacted_escaped_and_split(repo):
    build_id = await _new_build(repo)
    async with LogSink(repo, build_id, "deps", 0, LogPolicy()) as sink:
        out = sink.writer("install", "stdout")
        out("Collecting fla")  # a line arrives in pieces
        out("sk\r\nconnecting to postgresql://app:hunter2@db/x with DB_PASSWORD=hunter2\n")
        out(b"\x00\x01binary\xff\n")
        out("x" * (LINE_MAX_CHARS + 10) + "\n")
        out("no newline at the end")
    rows = await repo.list_logs(build_id)
    texts = [r.text for r in rows]
    assert texts[0] == "Collecting flask"
    assert "hunter2" not in texts[1] and "app:***@db" in texts[1] and "DB_PASSWORD=***" in texts[1]
    assert texts[2] == "\\x00\\x01binary\\xff"
    assert texts[3] == "x" * LINE_MAX_CHARS and texts[4] == "x" * 10
    assert texts[5] == "no newline at the end"
    assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
    assert {(r.stage, r.attempt, r.stream) for r in rows} == {("deps", 0, "stdout")}


async def test_a_retry_replaying_its_output_writes_only_what_is_missing(repo):
    build_id = await _new_build(repo)
    output = [f"line {n}\n" for n in range(10)]
    async with LogSink(repo, build_id, "deps", 0, LogPolicy()) as first:
        for chunk in output[:6]:  # then the worker dies
            first.writer("install", "stdout")(chunk)
    async with LogSink(repo, build_id, "deps", 0, LogPolicy()) as retry:
        for chunk in output:
            retry.writer("install", "stdout")(chunk)
    texts = [r.text for r in await repo.list_logs(build_id)]
    assert texts == [f"line {n}" for n in range(10)]
    # The next fix attempt is a new run: its lines are stored again.
    async with LogSink(repo, build_id, "deps", 1, LogPolicy()) as fix:
        fix.writer("install", "stdout")("line 0\n")
    rows = await repo.list_logs(build_id, stage="deps")
    assert [(r.attempt, r.text) for r in rows][-1] == (1, "line 0")


async def test_the_cap_ends_in_one_truncation_line(repo):
    build_id = await _new_build(repo)
    policy = LogPolicy(cap_bytes=4096, batch_interval_s=0.05)
    async with LogSink(repo, build_id, "checks", 0, policy) as sink:
        for n in range(1000):
            sink.writer("app", "stdout")(f"request {n:04d} served\n")
    rows = await repo.list_logs(build_id, limit=5000)
    assert rows[-1].source == TRUNCATED_SOURCE and "truncated" in rows[-1].text
    assert sum(len(r.text.encode()) for r in rows[:-1]) <= 4096
    assert [r.text for r in rows[:-1]] == [f"request {n:04d} served" for n in range(len(rows) - 1)]
    assert sink.truncated


async def test_paging_and_tail(repo):
    build_id = await _new_build(repo)
    async with LogSink(repo, build_id, "code", 0, LogPolicy()) as sink:
        for n in range(50):
            sink.line(f"progress {n}", command="runner")
    page = await repo.list_logs(build_id, after=10, limit=5)
    assert [r.seq for r in page] == [11, 12, 13, 14, 15]
    assert [r.text for r in await repo.list_logs(build_id, tail=3)] == ["progress 47", "progress 48", "progress 49"]
    assert await repo.list_logs(build_id, stage="deps") == []


async def test_retention_deletes_the_logs_of_old_builds_only(db_factory):
    url = await db_factory.create()  # a database of its own: the sweep deletes across builds
    await upgrade(url)
    repo = JobRepository.from_url(url)
    try:
        old = await _new_build(repo)
        await asyncio.sleep(0.01)
        between = datetime.now(UTC)
        await asyncio.sleep(0.01)
        new = await _new_build(repo)
        for build_id in (old, new):
            async with LogSink(repo, build_id, "code", 1, LogPolicy()) as sink:
                sink.line("hello", command="runner")
        assert await sweep_logs(repo, 0, now=between + timedelta(days=999)) == 0  # 0: keep forever
        # 14 days after `between`: `old` was created before the cutoff, `new` after it.
        assert await sweep_logs(repo, 14, now=between + timedelta(days=14)) == 1
        assert await repo.list_logs(old) == [] and await repo.get(old) is not None  # the build itself stays
        assert [r.text for r in await repo.list_logs(new)] == ["hello"]
    finally:
        await repo.aclose()


async def test_a_retried_activity_says_so_once_and_numbers_lines_by_the_builds_attempt(repo):
    """BuildActivities._sink inside an activity (ActivityEnvironment): try 2 of a step writes one
    'running again' line (a third run of the same try does not repeat it); lines carry the build's
    attempt as the API counts it (1 until a failure is recorded, then 2)."""
    build_id = await _new_build(repo)
    acts = BuildActivities(repo, sandboxes=None, runners={})  # type: ignore[arg-type]
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, attempt=2)

    async def step() -> None:
        async with await acts._sink(build_id, Stage.DEPS) as sink:
            sink.line("$ pip install", command="install")

    await env.run(step)
    await env.run(step)
    rows = await repo.list_logs(build_id)
    assert [r.text for r in rows][0].startswith("[genloop] this step is running again (try 2)")
    assert [r.text for r in rows][1:] == ["$ pip install"] and {r.attempt for r in rows} == {1}

    await repo.record_attempt(build_id, attempt=1, stage="deps", command="pip", exit_code=1, output="x",
                              max_attempts=3)
    env.info = dataclasses.replace(env.info, attempt=1)
    await env.run(step)
    assert [(r.attempt, r.text) for r in await repo.list_logs(build_id)][-1] == (2, "$ pip install")


async def test_a_version_served_again_logs_apart_from_its_build(repo):
    build_id = await _new_build(repo)
    for scope in ("", "serve-1"):  # the build's own start, then the version served in a new sandbox
        async with LogSink(repo, build_id, "checks", 1, LogPolicy(), scope=scope) as sink:
            sink.writer("app", "stdout")("listening on 8080\n")
    rows = await repo.list_logs(build_id)
    assert [r.text for r in rows] == ["listening on 8080", "listening on 8080"]
    assert [r.source for r in rows] == ["checks/1/app/stdout", "checks/1/serve-1/app/stdout"]
