from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel

from genloop.errors import GenloopError
from migrations.apply import current_revision, downgrade, upgrade
from persistence.repository import JobRepository
from tests.helpers.databases import DatabaseFactory, inspect_schema, run_sync_on

REPO_ROOT = Path(__file__).resolve().parents[2]
HEAD = "0006"
SANDBOX_COLUMNS = {"sandbox_id", "preview_url", "build_version", "workspace_path"}
ALL_TABLES = {
    "alembic_version", "jobs", "job_transitions", "build_counters", "blobs", "build_files", "build_attempts",
    "build_logs",
}


async def test_upgrade_downgrade_upgrade_keeps_jobs(db_factory: DatabaseFactory) -> None:
    url = await db_factory.create()
    assert await current_revision(url) is None

    await upgrade(url)
    assert await current_revision(url) == HEAD
    assert set(await inspect_schema(url)) == ALL_TABLES
    repo = JobRepository.from_url(url)
    try:
        await repo.create_job("b-survivor", "p", "keep me")
    finally:
        await repo.aclose()

    # Down to revision 1 and back: SQLite's batch rebuild of `jobs` must carry the rows along.
    await downgrade(url, "0001")
    await upgrade(url, "head")
    repo = JobRepository.from_url(url)
    try:
        job = await repo.get("b-survivor")
        assert job is not None and job.goal == "keep me"
    finally:
        await repo.aclose()

    await downgrade(url, "base")
    assert await current_revision(url) is None
    assert set(await inspect_schema(url)) == {"alembic_version"}

    await upgrade(url)
    assert await current_revision(url) == HEAD
    assert set(await inspect_schema(url)) == ALL_TABLES


async def test_revision_2_adds_exactly_the_sandbox_columns(db_factory: DatabaseFactory) -> None:
    url = await db_factory.create()

    await upgrade(url, "0001")
    before = await inspect_schema(url)
    assert set(before) == {"alembic_version", "jobs"}
    assert not SANDBOX_COLUMNS & set(before["jobs"]["columns"])

    await upgrade(url, "0002")
    after = await inspect_schema(url)
    assert set(after["jobs"]["columns"]) - set(before["jobs"]["columns"]) == SANDBOX_COLUMNS
    assert set(before["jobs"]["columns"]) <= set(after["jobs"]["columns"])
    assert ("uq_jobs_project_id_build_version", ("project_id", "build_version")) in after["jobs"]["unique"]

    await downgrade(url, "0001")
    assert await inspect_schema(url) == before


async def test_migrated_schema_matches_models(db_factory: DatabaseFactory) -> None:
    url = await db_factory.create()
    await upgrade(url)

    def diff(connection: Connection) -> list:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, SQLModel.metadata)

    assert await run_sync_on(url, diff) == []


async def test_concurrent_upgrades_in_one_process(db_factory: DatabaseFactory) -> None:
    # Alembic's state is process-global: runs on one loop and on other threads' loops must queue.
    same, other, threaded = [await db_factory.create() for _ in range(3)]

    await asyncio.gather(
        *(upgrade(same) for _ in range(3)),
        upgrade(other),
        asyncio.to_thread(lambda: asyncio.run(upgrade(threaded))),
    )

    for url in (same, other, threaded):
        assert await current_revision(url) == HEAD


async def test_concurrent_upgrades_across_processes(db_factory: DatabaseFactory) -> None:
    # The API and the worker may both migrate at startup: the database lock makes one wait.
    url = await db_factory.create()
    # All processes import first, then start migrating at the same instant.
    script = (
        "import asyncio, sys, time; from migrations.apply import upgrade; "
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); asyncio.run(upgrade(sys.argv[1]))"
    )
    start_at = str(time.time() + 3)
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, url, start_at, cwd=REPO_ROOT, stderr=asyncio.subprocess.PIPE
        )
        for _ in range(3)
    ]
    results = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), timeout=120)

    assert [p.returncode for p in procs] == [0, 0, 0], [err.decode() for _, err in results]
    assert await current_revision(url) == HEAD


async def test_upgrade_is_idempotent_at_head(migrated_db_url: str) -> None:
    await upgrade(migrated_db_url)
    assert await current_revision(migrated_db_url) == HEAD


async def test_unmigrated_database_is_not_reported_as_unavailable(db_factory: DatabaseFactory) -> None:
    # A missing migration is a deployment bug: it must fail loudly, not be retried as an outage.
    url = await db_factory.create()
    repo = JobRepository.from_url(url)
    try:
        with pytest.raises(Exception) as raised:
            await repo.create_job(uuid.uuid4().hex, "p", "goal")
    finally:
        await repo.aclose()
    assert not isinstance(raised.value, GenloopError), raised.value
