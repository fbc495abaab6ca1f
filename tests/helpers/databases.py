"""Throwaway databases for tests: one backend each (SQLite files, PostgreSQL databases)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from persistence.db import describe_url, make_engine

ADMIN_URL_ENV = "GENLOOP_TEST_POSTGRES_ADMIN_URL"
DEFAULT_POSTGRES_ADMIN_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
SKIP_POSTGRES_ENV = "GENLOOP_TEST_SKIP_POSTGRES"

T = TypeVar("T")


class DatabaseFactory(Protocol):
    backend: str

    async def create(self) -> str:
        """A new, empty database of this backend; returns its URL."""
        ...

    async def drop_all(self) -> None: ...


class SqliteDatabases:
    backend = "sqlite"

    def __init__(self, root: Path) -> None:
        self._root = root

    async def create(self) -> str:
        return f"sqlite+aiosqlite:///{self._root / uuid.uuid4().hex / 'genloop.db'}"

    async def drop_all(self) -> None:
        """Nothing to do: the files live in pytest's tmp dir."""


class PostgresDatabases:
    backend = "postgres"

    def __init__(self, admin_url: str) -> None:
        self._admin_url = make_url(admin_url)
        self._created: list[str] = []

    @classmethod
    def from_env(cls) -> PostgresDatabases:
        return cls(os.environ.get(ADMIN_URL_ENV) or DEFAULT_POSTGRES_ADMIN_URL)

    async def check(self) -> None:
        """Raise RuntimeError with a message that says how to fix or skip, if the server is unusable."""
        try:
            await self._admin("SELECT 1")
        except Exception as exc:
            raise RuntimeError(
                f"PostgreSQL is not reachable at {describe_url(self._admin_url)} ({type(exc).__name__}: {exc}). "
                f"Start it, point {ADMIN_URL_ENV} at a server where the user may CREATE DATABASE, "
                f"or set {SKIP_POSTGRES_ENV}=1 to skip the PostgreSQL half of the suite."
            ) from exc

    async def create(self) -> str:
        name = f"genloop_test_{uuid.uuid4().hex}"
        await self._admin(f'CREATE DATABASE "{name}"')
        self._created.append(name)
        return self._admin_url.set(database=name).render_as_string(hide_password=False)

    async def drop_all(self) -> None:
        for name in self._created:
            await self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self._created.clear()

    async def _admin(self, statement: str) -> None:
        # CREATE/DROP DATABASE cannot run inside a transaction block.
        engine = create_async_engine(self._admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        try:
            async with engine.connect() as connection:
                await connection.exec_driver_sql(statement)
        finally:
            await engine.dispose()


async def run_sync_on(url: str, fn: Callable[[Connection], T]) -> T:
    """Run `fn` with a synchronous connection to `url` (for sa.inspect, Alembic's MigrationContext)."""
    engine = make_engine(url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(fn)
    finally:
        await engine.dispose()


async def inspect_schema(url: str) -> dict[str, Any]:
    """{table: {"columns": [...], "unique": [(name, columns)], "indexes": [...]}} for every table."""

    def read(connection: Connection) -> dict[str, Any]:
        inspector = sa.inspect(connection)
        return {
            table: {
                "columns": [c["name"] for c in inspector.get_columns(table)],
                "unique": sorted(
                    (u["name"], tuple(u["column_names"])) for u in inspector.get_unique_constraints(table)
                ),
                "indexes": sorted(i["name"] for i in inspector.get_indexes(table)),
            }
            for table in inspector.get_table_names()
        }

    return await run_sync_on(url, read)


@contextlib.asynccontextmanager
async def postgres_databases() -> AsyncIterator[PostgresDatabases]:
    """PostgreSQL test databases, dropped on exit. An unreachable server fails the test with a clear
    message (never a silent skip) unless GENLOOP_TEST_SKIP_POSTGRES=1."""
    if os.environ.get(SKIP_POSTGRES_ENV) == "1":
        pytest.skip(f"{SKIP_POSTGRES_ENV}=1")
    factory = PostgresDatabases.from_env()
    try:
        await factory.check()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield factory
    finally:
        await factory.drop_all()
