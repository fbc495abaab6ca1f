"""Engine and session factory: SQLite (aiosqlite) by default, PostgreSQL (asyncpg) by URL.

Nothing outside `persistence/` opens sessions; everything else goes through `JobRepository`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from genloop.errors import ErrorKind, GenloopError, redact_secrets

# Execution option marking a connection whose transaction will write. On SQLite it turns the BEGIN
# into BEGIN IMMEDIATE (see below); other backends ignore unknown execution options.
WRITE_TRANSACTION: dict[str, Any] = {"genloop_write": True}

SQLITE_BUSY_TIMEOUT_MS = 30_000
POSTGRES_CONNECT_TIMEOUT_S = 10


def make_engine(url: str, *, sqlite_foreign_keys: bool = True) -> AsyncEngine:
    """`sqlite_foreign_keys=False` is for migrations only: Alembic's batch mode rebuilds a table by
    dropping it, and with enforcement on SQLite would cascade that drop into referencing rows."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed, foreign_keys=sqlite_foreign_keys)
    return create_async_engine(
        parsed,
        pool_size=10,
        max_overflow=20,
        # A DB restart leaves dead pooled connections; ping on checkout instead of failing a build.
        pool_pre_ping=True,
        pool_recycle=1800,
        # Fail fast when the server is down so activities retry instead of hanging a worker slot.
        connect_args={"timeout": POSTGRES_CONNECT_TIMEOUT_S},
    )


def make_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    # Rows are handed back to callers after commit; expiring them would force lazy reloads.
    return async_sessionmaker(engine, expire_on_commit=False)


def _sqlite_engine(url: URL, *, foreign_keys: bool) -> AsyncEngine:
    database = url.database or ""
    engine = create_async_engine(url)

    if database and database != ":memory:" and not database.startswith("file:"):

        @event.listens_for(engine.sync_engine, "do_connect")
        def _create_parent_dir(*_args: Any) -> None:
            # At connect time, not engine creation: a failure then surfaces (and is mapped to
            # DATABASE_UNAVAILABLE) where the database is used.
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN away from the sqlite3 driver (it skips it before SELECT and DDL, which breaks
        # read-then-write atomicity and transactional migrations); `_on_begin` emits it instead.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            # WAL: readers never block the writer. NORMAL is durable across crashes of the app
            # (only a power loss can drop the last commits), at a fraction of FULL's fsyncs.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # A deferred BEGIN that reads and then writes fails with SQLITE_BUSY (no busy wait) when
        # another writer committed in between; IMMEDIATE takes the write lock up front, so writers
        # queue on busy_timeout and a read-then-write can never interleave with another writer.
        write = conn.get_execution_options().get("genloop_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def describe_url(url: str | URL) -> str:
    return make_url(url).render_as_string(hide_password=True)


@contextmanager
def database_errors(where: str) -> Iterator[None]:
    """Re-raise a lost or unreachable database as DATABASE_UNAVAILABLE (transient: activities retry
    it). Other errors pass through unchanged. `where` is a password-free URL for the detail."""
    try:
        yield
    except GenloopError:
        raise
    except Exception as exc:
        if not is_unavailable(exc):
            raise
        raise GenloopError(ErrorKind.DATABASE_UNAVAILABLE, redact_secrets(f"{where}: {_describe(exc)}")) from exc


# asyncpg errors that mean "the server is not there / not accepting us now", not "your SQL is wrong".
# SQLAlchemy maps them to its generic DBAPIError, so they are recognised on the exception chain.
_ASYNCPG_UNAVAILABLE = (
    asyncpg.exceptions.PostgresConnectionError,  # 08xxx
    asyncpg.exceptions.OperatorInterventionError,  # 57Pxx: admin/crash shutdown, cannot connect now
    asyncpg.exceptions.InsufficientResourcesError,  # 53xxx: too many connections, disk full
)


def is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, (sa_exc.DisconnectionError, sa_exc.TimeoutError)):  # TimeoutError: pool exhausted
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated or isinstance(exc, sa_exc.InterfaceError):
            return True
        if isinstance(exc, sa_exc.OperationalError):
            # sqlite3 reports plain SQL errors ("no such table") as OperationalError too; those are
            # bugs or a missing migration, and retrying them would only hide the problem.
            return getattr(exc.orig, "sqlite_errorname", None) != "SQLITE_ERROR"
    return any(isinstance(e, (OSError, *_ASYNCPG_UNAVAILABLE)) for e in _chain(exc))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [getattr(current, "orig", None), current.__cause__]


def _describe(exc: BaseException) -> str:
    # For DBAPI errors report the driver's message only: SQLAlchemy's text embeds the statement and
    # its parameters (user goals, file contents).
    if isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None:
        exc = exc.orig
    return f"{type(exc).__name__}: {exc}"
