"""A database that cannot be reached surfaces as DATABASE_UNAVAILABLE (transient, so activities
retry), with no password in the detail."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from genloop.errors import ErrorKind, GenloopError
from migrations.apply import upgrade
from persistence.repository import JobRepository
from workflows.stages import Stage

PASSWORD = "s3cret-pw"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def unreachable_url(backend: str, tmp_path: Path) -> str:
    if backend == "postgres":
        return f"postgresql+asyncpg://genloop:{PASSWORD}@127.0.0.1:{closed_port()}/genloop"
    # A directory where the database file should be: SQLite cannot open it.
    return f"sqlite+aiosqlite:///{tmp_path}"


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_unreachable_database_is_unavailable(backend: str, tmp_path: Path) -> None:
    repo = JobRepository.from_url(unreachable_url(backend, tmp_path))
    try:
        for call in (
            repo.create_job("b", "p", "goal"),
            repo.transition("b", Stage.STARTING),
            repo.get("b"),
            repo.put_blob(b"x"),
        ):
            with pytest.raises(GenloopError) as raised:
                await call
            assert raised.value.kind is ErrorKind.DATABASE_UNAVAILABLE
            assert raised.value.kind.transient
            assert PASSWORD not in str(raised.value)
    finally:
        await repo.aclose()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_migrating_an_unreachable_database_is_unavailable(backend: str, tmp_path: Path) -> None:
    with pytest.raises(GenloopError) as raised:
        await upgrade(unreachable_url(backend, tmp_path))
    assert raised.value.kind is ErrorKind.DATABASE_UNAVAILABLE
    assert PASSWORD not in str(raised.value)


async def test_sqlite_parent_directory_is_created_on_first_use(tmp_path: Path) -> None:
    path = tmp_path / "not" / "yet" / "there" / "genloop.db"
    repo = JobRepository.from_url(f"sqlite+aiosqlite:///{path}")
    try:
        assert not path.parent.exists()  # creating the repository touches nothing
        await repo.ping()
        assert path.parent.is_dir()
    finally:
        await repo.aclose()


async def test_sqlite_parent_directory_that_cannot_be_created_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    repo = JobRepository.from_url(f"sqlite+aiosqlite:///{blocker / 'sub' / 'genloop.db'}")
    try:
        with pytest.raises(GenloopError) as raised:
            await repo.get("b")
        assert raised.value.kind is ErrorKind.DATABASE_UNAVAILABLE
    finally:
        await repo.aclose()
