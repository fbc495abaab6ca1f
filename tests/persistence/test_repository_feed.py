"""ping() and transitions_after(): what the API's health check and SSE event feed read."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from genloop.errors import ErrorKind, GenloopError
from persistence.repository import JobRepository
from tests.persistence.test_unavailable import unreachable_url
from workflows.stages import Stage


async def _job(repo: JobRepository, *stages: Stage) -> str:
    build_id = f"build-{uuid.uuid4().hex}"
    await repo.create_job(build_id, f"proj-{uuid.uuid4().hex}", "a todo app")
    for stage in stages:
        await repo.transition(build_id, stage)
    return build_id


async def test_ping(repo: JobRepository) -> None:
    await repo.ping()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_ping_unreachable_database_is_unavailable(backend: str, tmp_path: Path) -> None:
    repo = JobRepository.from_url(unreachable_url(backend, tmp_path))
    try:
        with pytest.raises(GenloopError) as raised:
            await repo.ping()
        assert raised.value.kind is ErrorKind.DATABASE_UNAVAILABLE
    finally:
        await repo.aclose()


async def test_transitions_after_each_cursor(repo: JobRepository) -> None:
    a = await _job(repo, Stage.STARTING, Stage.SCAFFOLD)  # seqs 1..3
    b = await _job(repo, Stage.STARTING)  # seqs 1..2
    c = await _job(repo)  # seq 1
    unknown = f"build-{uuid.uuid4().hex}"

    found = await repo.transitions_after({a: 1, b: 0, c: 1, unknown: 0})

    assert [(t.seq, t.stage) for t in found[a]] == [(2, "starting"), (3, "scaffold")]
    assert [(t.seq, t.stage) for t in found[b]] == [(1, "queued"), (2, "starting")]
    assert found[c] == [] and found[unknown] == []
    assert all(t.build_id == a for t in found[a])


async def test_transitions_after_sees_new_transitions(repo: JobRepository) -> None:
    build_id = await _job(repo)
    assert [t.seq for t in (await repo.transitions_after({build_id: 0}))[build_id]] == [1]
    await repo.transition(build_id, Stage.STARTING, message="go")
    [new] = (await repo.transitions_after({build_id: 1}))[build_id]
    assert (new.seq, new.stage, new.message) == (2, "starting", "go")


async def test_transitions_after_many_builds(repo: JobRepository) -> None:
    # More builds than one batch of bound parameters holds.
    ids = [await _job(repo) for _ in range(JobRepository._FEED_BATCH + 5)]
    found = await repo.transitions_after({build_id: 0 for build_id in ids})
    assert all([t.seq for t in found[build_id]] == [1] for build_id in ids)


async def test_transitions_after_nothing(repo: JobRepository) -> None:
    assert await repo.transitions_after({}) == {}
