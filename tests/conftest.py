"""Shared fixtures. Database fixtures are parametrized over both backends (ids "sqlite",
"postgres") and session-scoped per backend: every test run gets fresh databases of its own.

PostgreSQL: databases are created through the admin URL in GENLOOP_TEST_POSTGRES_ADMIN_URL
(default postgresql+asyncpg://postgres@127.0.0.1:5432/postgres) and dropped at session end.
An unreachable server makes the tests ERROR (never a silent skip) unless
GENLOOP_TEST_SKIP_POSTGRES=1.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from migrations.apply import upgrade
from persistence.repository import JobRepository
from tests.helpers.databases import DatabaseFactory, SqliteDatabases, postgres_databases

# One Temporal dev server and one sandbox host for the whole run, shared by every suite.
pytest_plugins = ["tests.helpers.stack_fixtures"]


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
async def db_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[DatabaseFactory]:
    """Creates empty databases of one backend (for tests that need one to themselves)."""
    if request.param == "postgres":
        async with postgres_databases() as factory:
            yield factory
        return
    factory = SqliteDatabases(tmp_path_factory.mktemp("sqlite"))
    try:
        yield factory
    finally:
        await factory.drop_all()


@pytest.fixture(scope="session")
async def db_url(db_factory: DatabaseFactory) -> str:
    """An empty database, shared by the session's tests of this backend."""
    return await db_factory.create()


@pytest.fixture(scope="session")
async def migrated_db_url(db_url: str) -> str:
    await upgrade(db_url)
    return db_url


@pytest.fixture(scope="session")
async def repo(migrated_db_url: str) -> AsyncIterator[JobRepository]:
    repository = JobRepository.from_url(migrated_db_url)
    try:
        yield repository
    finally:
        await repository.aclose()
