from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from genloop.errors import ErrorKind, GenloopError
from persistence.repository import JobRepository
from workflows.stages import PIPELINE, Stage


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def new_job(repo: JobRepository, project_id: str | None = None) -> str:
    build_id = new_id("build")
    await repo.create_job(build_id, project_id or new_id("proj"), "a todo app")
    return build_id


async def advance(repo: JobRepository, build_id: str, until: Stage) -> None:
    for stage in PIPELINE[: PIPELINE.index(until) + 1]:
        await repo.transition(build_id, stage)


# --- create_job ---------------------------------------------------------------------------------


async def test_create_job_starts_queued_with_a_transition(repo: JobRepository) -> None:
    build_id, project_id = new_id("build"), new_id("proj")
    job = await repo.create_job(build_id, project_id, "a todo app", workflow_id=build_id, run_id="run-1")

    assert (job.id, job.project_id, job.goal, job.stage) == (build_id, project_id, "a todo app", Stage.QUEUED)
    assert (job.workflow_id, job.run_id, job.status_message) == (build_id, "run-1", Stage.QUEUED.label)
    assert job.created_at.tzinfo is UTC and job.updated_at.tzinfo is UTC
    [first] = await repo.list_transitions(build_id)
    assert (first.seq, first.stage) == (1, Stage.QUEUED.value)

    stored = await repo.get(build_id)
    assert stored is not None and stored.created_at == job.created_at and stored.created_at.tzinfo is UTC


async def test_create_job_is_idempotent(repo: JobRepository) -> None:
    build_id, project_id = new_id("build"), new_id("proj")
    first = await repo.create_job(build_id, project_id, "original goal")
    await repo.transition(build_id, Stage.STARTING)

    again = await repo.create_job(build_id, project_id, "a different goal")

    assert (again.goal, again.stage, again.created_at) == ("original goal", Stage.STARTING, first.created_at)
    assert [t.stage for t in await repo.list_transitions(build_id)] == ["queued", "starting"]


async def test_concurrent_create_job_never_raises(repo: JobRepository) -> None:
    build_id, project_id = new_id("build"), new_id("proj")

    jobs = await asyncio.gather(*(repo.create_job(build_id, project_id, f"goal {i}") for i in range(10)))

    assert len({job.goal for job in jobs}) == 1
    assert len(await repo.list_transitions(build_id)) == 1


# --- transition ---------------------------------------------------------------------------------


async def test_happy_path_records_every_transition_in_order(repo: JobRepository) -> None:
    build_id = await new_job(repo)
    start = datetime(2025, 1, 1, 12, tzinfo=UTC)

    for i, stage in enumerate(PIPELINE):
        job = await repo.transition(build_id, stage, at=start + timedelta(seconds=i))
        assert job.stage is stage and job.status_message == stage.label

    transitions = await repo.list_transitions(build_id)
    assert [t.stage for t in transitions] == ["queued", "starting", "scaffold", "code", "deps", "checks", "ready"]
    assert [t.seq for t in transitions] == list(range(1, 8))
    assert [t.at for t in transitions[1:]] == [start + timedelta(seconds=i) for i in range(len(PIPELINE))]
    assert all(t.at.tzinfo is UTC for t in transitions)
    stored = await repo.get(build_id)
    assert stored is not None and stored.stage is Stage.READY


async def test_timestamps_are_stored_in_utc(repo: JobRepository) -> None:
    build_id = await new_job(repo)
    local = datetime(2025, 6, 1, 14, 30, tzinfo=UTC).astimezone(tz=None)  # same instant, other zone

    await repo.transition(build_id, Stage.STARTING, at=local)

    [_, starting] = await repo.list_transitions(build_id)
    assert starting.at == local and starting.at.tzinfo is UTC


async def test_reapplying_the_current_stage_is_a_noop(repo: JobRepository) -> None:
    build_id = await new_job(repo)
    await advance(repo, build_id, Stage.CODE)
    before = await repo.list_transitions(build_id)

    job = await repo.transition(build_id, Stage.CODE, message="retried activity")

    assert job.stage is Stage.CODE and job.status_message == Stage.CODE.label
    assert len(await repo.list_transitions(build_id)) == len(before)


async def test_concurrent_identical_transitions_record_one_row(repo: JobRepository) -> None:
    build_id = await new_job(repo)

    jobs = await asyncio.gather(*(repo.transition(build_id, Stage.STARTING) for _ in range(10)))

    assert {job.stage for job in jobs} == {Stage.STARTING}
    assert [t.seq for t in await repo.list_transitions(build_id)] == [1, 2]


async def test_a_transition_then_the_next_in_one_write(repo: JobRepository) -> None:
    build_id = await new_job(repo)

    job = await repo.transition(build_id, Stage.STARTING, then=Stage.SCAFFOLD)

    assert job.stage is Stage.SCAFFOLD and job.status_message == Stage.SCAFFOLD.label
    assert [(t.seq, t.stage) for t in await repo.list_transitions(build_id)] == [
        (1, "queued"), (2, "starting"), (3, "scaffold")
    ]
    # All or nothing: a second move that is illegal leaves the first unwritten too.
    other = await new_job(repo)
    with pytest.raises(GenloopError) as raised:
        await repo.transition(other, Stage.STARTING, then=Stage.DEPS)
    assert raised.value.kind is ErrorKind.ILLEGAL_TRANSITION
    assert [t.stage for t in await repo.list_transitions(other)] == ["queued"]
    assert (await repo.get(other)).stage is Stage.QUEUED


@pytest.mark.parametrize(
    ("reach", "target"),
    [
        (Stage.QUEUED, Stage.CODE),  # skipping stages
        (Stage.DEPS, Stage.SCAFFOLD),  # backward, except to CODE for a fix
        (Stage.CHECKS, Stage.SCAFFOLD),
        (Stage.CODE, Stage.SCAFFOLD),
        (Stage.READY, Stage.FAILED),  # out of a terminal stage
        (Stage.QUEUED, Stage.READY),
    ],
)
async def test_illegal_transition_raises_and_writes_nothing(repo: JobRepository, reach: Stage, target: Stage) -> None:
    build_id = await new_job(repo)
    if reach is not Stage.QUEUED:
        await advance(repo, build_id, reach)
    before = await repo.list_transitions(build_id)

    with pytest.raises(GenloopError) as raised:
        await repo.transition(build_id, target)

    assert raised.value.kind is ErrorKind.ILLEGAL_TRANSITION
    assert len(await repo.list_transitions(build_id)) == len(before)
    stored = await repo.get(build_id)
    assert stored is not None and stored.stage is reach


async def test_fix_attempts_loop_back_to_code(repo: JobRepository) -> None:
    build_id = await new_job(repo)
    await advance(repo, build_id, Stage.CHECKS)

    # checks -> code (the app did not start), deps -> code (its dependencies did not install).
    for stage in (Stage.CODE, Stage.DEPS, Stage.CODE, Stage.DEPS, Stage.CHECKS, Stage.READY):
        await repo.transition(build_id, stage)

    transitions = await repo.list_transitions(build_id)
    assert [t.stage for t in transitions][-7:] == ["checks", "code", "deps", "code", "deps", "checks", "ready"]
    assert [t.seq for t in transitions] == list(range(1, len(transitions) + 1))


async def test_failure_records_errors_and_is_found_by_debug_id(repo: JobRepository) -> None:
    build_id = await new_job(repo)
    debug_id = uuid.uuid4().hex
    await repo.transition(build_id, Stage.STARTING)

    job = await repo.transition(
        build_id,
        Stage.FAILED,
        message="Build failed",
        error_message="The preview environment could not be started. Please try again.",
        error_detail="SandboxGone: sandbox sbx-1 vanished",
        debug_id=debug_id,
        run_id="run-2",
    )

    assert job.stage is Stage.FAILED and job.run_id == "run-2"
    found = await repo.get_by_debug_id(debug_id)
    assert found is not None and found.id == build_id
    assert found.error_detail == "SandboxGone: sandbox sbx-1 vanished"
    assert found.error_message == "The preview environment could not be started. Please try again."
    assert await repo.get_by_debug_id(uuid.uuid4().hex) is None


async def test_unknown_build_is_not_found(repo: JobRepository) -> None:
    missing = new_id("missing")
    assert await repo.get(missing) is None
    assert await repo.list_transitions(missing) == []
    for call in (
        repo.transition(missing, Stage.STARTING),
        repo.set_sandbox(missing, "sbx", "/home/user/project"),
        repo.allocate_build_version(missing, "proj"),
        repo.finish_ready(missing, sandbox_id="sbx", preview_url="http://x", workspace_path="/w"),
    ):
        with pytest.raises(GenloopError) as raised:
            await call
        assert raised.value.kind is ErrorKind.NOT_FOUND


async def test_set_sandbox(repo: JobRepository) -> None:
    build_id = await new_job(repo)

    await repo.set_sandbox(build_id, "sbx-123", "/home/user/project", host="host-a")

    stored = await repo.get(build_id)
    assert stored is not None
    assert (stored.sandbox_id, stored.workspace_path, stored.sandbox_host) == (
        "sbx-123",
        "/home/user/project",
        "host-a",
    )


# --- build versions -----------------------------------------------------------------------------


async def test_build_versions_increment_per_project_and_rerun_returns_same(repo: JobRepository) -> None:
    project_id = new_id("proj")
    first, second = await new_job(repo, project_id), await new_job(repo, project_id)

    assert await repo.allocate_build_version(first, project_id) == "build_v0_1"
    assert await repo.allocate_build_version(second, project_id) == "build_v0_2"
    assert await repo.allocate_build_version(first, project_id) == "build_v0_1"

    other_project = new_id("proj")
    assert await repo.allocate_build_version(await new_job(repo, other_project), other_project) == "build_v0_1"
    stored = await repo.get(second)
    assert stored is not None and stored.build_version == "build_v0_2"


async def test_concurrent_allocations_never_share_a_number(repo: JobRepository) -> None:
    project_id = new_id("proj")
    builds = [await new_job(repo, project_id) for _ in range(20)]

    versions = await asyncio.gather(*(repo.allocate_build_version(b, project_id) for b in builds))

    assert sorted(versions, key=lambda v: int(v.rsplit("_", 1)[1])) == [f"build_v0_{n}" for n in range(1, 21)]
    # Re-running all of them concurrently hands every build back its own version.
    assert await asyncio.gather(*(repo.allocate_build_version(b, project_id) for b in builds)) == versions


async def test_allocation_rejects_a_mismatched_project(repo: JobRepository) -> None:
    build_id = await new_job(repo)
    with pytest.raises(GenloopError) as raised:
        await repo.allocate_build_version(build_id, new_id("other"))
    assert raised.value.kind is ErrorKind.INVALID_INPUT


# --- finish_ready -------------------------------------------------------------------------------


async def test_finish_ready_writes_everything_and_is_idempotent(repo: JobRepository) -> None:
    project_id = new_id("proj")
    build_id = await new_job(repo, project_id)
    await advance(repo, build_id, Stage.CHECKS)

    job = await repo.finish_ready(
        build_id,
        sandbox_id="sbx-1",
        preview_url="http://8080-sbx-1.localhost:49983",
        workspace_path="/home/user/project",
    )

    assert job.stage is Stage.READY and job.build_version == "build_v0_1"
    assert (job.sandbox_id, job.preview_url, job.workspace_path) == (
        "sbx-1",
        "http://8080-sbx-1.localhost:49983",
        "/home/user/project",
    )
    transitions = await repo.list_transitions(build_id)
    assert transitions[-1].stage == "ready"

    again = await repo.finish_ready(build_id, sandbox_id="sbx-2", preview_url="http://other", workspace_path="/other")
    assert (again.build_version, again.sandbox_id, again.preview_url) == ("build_v0_1", "sbx-1", job.preview_url)
    assert len(await repo.list_transitions(build_id)) == len(transitions)
    # A retry of the separate allocation step agrees with what finish_ready allocated.
    assert await repo.allocate_build_version(build_id, project_id) == "build_v0_1"


async def test_finish_ready_keeps_an_already_allocated_version(repo: JobRepository) -> None:
    project_id = new_id("proj")
    build_id = await new_job(repo, project_id)
    await advance(repo, build_id, Stage.CHECKS)
    allocated = await repo.allocate_build_version(build_id, project_id)

    job = await repo.finish_ready(build_id, sandbox_id="sbx", preview_url="http://p", workspace_path="/w")

    assert job.build_version == allocated == "build_v0_1"


async def test_illegal_finish_ready_writes_nothing_and_consumes_no_version(repo: JobRepository) -> None:
    project_id = new_id("proj")
    failed = await new_job(repo, project_id)
    await repo.transition(failed, Stage.FAILED)

    with pytest.raises(GenloopError) as raised:
        await repo.finish_ready(failed, sandbox_id="sbx", preview_url="http://p", workspace_path="/w")

    assert raised.value.kind is ErrorKind.ILLEGAL_TRANSITION
    stored = await repo.get(failed)
    assert stored is not None and stored.stage is Stage.FAILED
    assert (stored.build_version, stored.sandbox_id, stored.preview_url, stored.workspace_path) == (None,) * 4
    assert [t.stage for t in await repo.list_transitions(failed)] == ["queued", "failed"]
    # The number was not used up: the project's next build still gets the first version.
    assert await repo.allocate_build_version(await new_job(repo, project_id), project_id) == "build_v0_1"


# --- listing ------------------------------------------------------------------------------------


async def test_list_jobs_pages_newest_first(repo: JobRepository) -> None:
    project_id = new_id("proj")
    created = [await repo.create_job(new_id("build"), project_id, f"goal {i}") for i in range(5)]
    await repo.create_job(new_id("build"), new_id("proj"), "another project's job")
    expected = [j.id for j in sorted(created, key=lambda j: (j.created_at, j.id), reverse=True)]

    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        page = await repo.list_jobs(project_id, limit=2, before=cursor)
        if not page:
            break
        pages.append([job.id for job in page])
        cursor = page[-1].id

    assert pages == [expected[0:2], expected[2:4], expected[4:5]]
    assert [job.id for job in await repo.list_jobs(project_id)] == expected


async def test_list_jobs_rejects_bad_cursor_and_limit(repo: JobRepository) -> None:
    project_id = new_id("proj")
    foreign = await new_job(repo)  # exists, but in another project
    for kwargs in ({"before": new_id("missing")}, {"before": foreign}, {"limit": 0}, {"limit": 10_000}):
        with pytest.raises(GenloopError) as raised:
            await repo.list_jobs(project_id, **kwargs)
        assert raised.value.kind is ErrorKind.INVALID_INPUT
    assert await repo.list_jobs(new_id("empty")) == []
