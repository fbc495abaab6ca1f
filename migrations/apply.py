"""Run the Alembic migrations programmatically (`genloop migrate`, test fixtures, startup checks).

Safe to call from inside a running event loop: Alembic's synchronous command API runs on an async
connection through `run_sync`, in one transaction committed at the end (a failing PostgreSQL
migration leaves nothing behind). Concurrent migrators queue instead of racing: locks within the
process, and across processes (API and worker starting together) BEGIN IMMEDIATE on SQLite or an
advisory lock on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection

from persistence.db import WRITE_TRANSACTION, database_errors, describe_url, make_engine

ALEMBIC_INI = Path(__file__).resolve().parent / "alembic.ini"
# Arbitrary, fixed key for pg_advisory_xact_lock: "genloop migrate".
_PG_MIGRATION_LOCK = 0x67656E6C6F6F70
# Alembic keeps the running migration in module globals (`alembic.context`, `alembic.op`): two runs
# in one process must never overlap. Coroutines on one loop queue on that loop's asyncio lock (so
# the thread lock below never blocks a loop against itself); runs on other threads' loops queue on
# the thread lock.
_LOOP_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()
_ALEMBIC_LOCK = threading.Lock()


def alembic_config() -> Config:
    return Config(str(ALEMBIC_INI))


async def upgrade(url: str, revision: str = "head") -> None:
    await _run(url, lambda cfg: command.upgrade(cfg, revision))


async def downgrade(url: str, revision: str) -> None:
    await _run(url, lambda cfg: command.downgrade(cfg, revision))


async def current_revision(url: str) -> str | None:
    """The revision the database is at; None for an empty (never migrated) database."""
    engine = make_engine(url)
    try:
        with database_errors(describe_url(url)):
            async with engine.connect() as connection:
                return await connection.run_sync(lambda sync: MigrationContext.configure(sync).get_current_revision())
    finally:
        await engine.dispose()


async def _run(url: str, alembic_command: Callable[[Config], None]) -> None:
    # Foreign keys off on SQLite: batch mode's table rebuild would otherwise cascade its DROP.
    engine = make_engine(url, sqlite_foreign_keys=False)
    try:
        async with _LOOP_LOCKS.setdefault(asyncio.get_running_loop(), asyncio.Lock()):
            with database_errors(describe_url(url)):
                async with engine.connect() as connection:
                    await connection.execution_options(**WRITE_TRANSACTION)
                    async with connection.begin():
                        if connection.dialect.name == "postgresql":
                            await connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
                        await connection.run_sync(_invoke, alembic_command)
    finally:
        await engine.dispose()


def _invoke(connection: Connection, alembic_command: Callable[[Config], None]) -> None:
    cfg = alembic_config()
    cfg.attributes["connection"] = connection  # env.py runs on it instead of opening its own
    with _ALEMBIC_LOCK:
        alembic_command(cfg)
