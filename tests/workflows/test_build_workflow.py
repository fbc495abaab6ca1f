"""BuildWorkflow end to end: real dev server, real sandbox host, real database (both backends)."""

from __future__ import annotations

import asyncio
import html
import uuid

import pytest
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError

from genloop.http import preview_client
from tests.helpers import doubles
from tests.workflows.conftest import make_stack
from workflows.types import STATUS_QUERY, BuildResult, BuildStatus, CancelRequest

PIPELINE = ["starting", "scaffold", "code", "deps", "checks", "ready"]


async def _transitions(repo, build_id: str) -> list[str]:
    return [t.stage for t in await repo.list_transitions(build_id)]


async def _wait_for_stage(handle, stage: str, timeout: float = 30) -> None:
    async def poll():
        while (await handle.query(STATUS_QUERY, result_type=BuildStatus)).stage != stage:
            await asyncio.sleep(0.1)

    await asyncio.wait_for(poll(), timeout)


async def _failure(handle) -> ApplicationError:
    with pytest.raises(WorkflowFailureError) as info:
        await handle.result()
    cause = info.value.cause
    assert isinstance(cause, ApplicationError), cause
    return cause


async def test_happy_path(build_stack):
    goal = "a <b>todo</b> list for cats"
    handle = await build_stack.start(goal)
    result: BuildResult = await handle.result()

    assert result.status == "ready"
    assert result.build_version == "build_v0_1"
    assert result.workspace_path == "/home/user/project"
    assert result.sandbox_id and result.preview_url

    assert await _transitions(build_stack.repo, handle.id) == ["queued", *PIPELINE]
    status = await handle.query(STATUS_QUERY, result_type=BuildStatus)
    assert [t.stage for t in status.transitions] == PIPELINE
    assert (status.stage, status.preview_url, status.build_version) == ("ready", result.preview_url, "build_v0_1")

    job = await build_stack.repo.get(handle.id)
    assert (job.status, job.sandbox_id, job.preview_url, job.build_version, job.workspace_path) == (
        "ready", result.sandbox_id, result.preview_url, "build_v0_1", "/home/user/project",
    )
    assert job.workflow_id == handle.id and job.run_id

    async with preview_client(timeout=10) as http:
        page = await http.get(result.preview_url)
    assert page.status_code == 200
    assert html.escape(goal) in page.text

    sandbox = await build_stack.sandboxes.connect(result.sandbox_id)
    listing = {e.name for e in await sandbox.files.list(result.workspace_path)}
    assert {"README.md", ".env.example", "Procfile", "app.py"} <= listing
    await build_stack.sandboxes.kill(result.sandbox_id)


async def test_second_build_of_project_gets_next_version(build_stack):
    project = f"p-{uuid.uuid4().hex[:8]}"
    first = await (await build_stack.start("first app", project_id=project)).result()
    second = await (await build_stack.start("second app", project_id=project)).result()
    assert (first.build_version, second.build_version) == ("build_v0_1", "build_v0_2")

    async with preview_client(timeout=10) as http:
        assert "first app" in (await http.get(first.preview_url)).text
        assert "second app" in (await http.get(second.preview_url)).text
    rows = await build_stack.repo.list_jobs(project)
    assert {r.build_version for r in rows} == {"build_v0_1", "build_v0_2"}
    for r in (first, second):
        await build_stack.sandboxes.kill(r.sandbox_id)


async def test_rate_limited_runner_is_retried(build_stack):
    handle = await build_stack.start(runner="rate-limited")
    result = await handle.result()
    assert result.status == "ready"
    assert build_stack.runners["rate-limited"].calls == 3
    await build_stack.sandboxes.kill(result.sandbox_id)


async def test_permanent_runner_failure(build_stack):
    handle = await build_stack.start(runner="crashing")
    err = await _failure(handle)
    assert err.type == "RunnerFailed" and err.non_retryable
    assert build_stack.runners["crashing"].calls == 1  # permanent: not retried
    result = err.details[0]
    debug_id = result["debug_id"]
    assert debug_id and debug_id in err.message

    job = await build_stack.repo.get(handle.id)
    assert job.status == "failed" and job.debug_id == debug_id
    assert job.error_message == "We could not generate code for this request. Please try again."
    assert "Traceback" not in job.error_message and "malformed output" in job.error_detail
    assert (await build_stack.repo.get_by_debug_id(debug_id)).id == handle.id
    assert await _transitions(build_stack.repo, handle.id) == ["queued", "starting", "scaffold", "code", "failed"]

    history = await handle.fetch_history()
    assert debug_id in history.to_json()


async def test_request_scaffold_refuses_fails_in_scaffold(build_stack):
    """SCAFFOLD's work runs in the start write's local activity: a request it refuses (a runner this
    worker does not have) fails the build in SCAFFOLD, after both stages were recorded."""
    handle = await build_stack.start(runner="no-such-runner")
    err = await _failure(handle)
    assert err.type == "InvalidInput" and err.non_retryable

    job = await build_stack.repo.get(handle.id)
    assert job.status == "failed" and "InvalidInput in scaffold" in job.error_detail
    assert "no-such-runner" in job.error_detail
    assert await _transitions(build_stack.repo, handle.id) == ["queued", "starting", "scaffold", "failed"]
    status = await handle.query(STATUS_QUERY, result_type=BuildStatus)
    assert [t.stage for t in status.transitions] == ["starting", "scaffold", "failed"]
    assert job.sandbox_id is None  # no sandbox before DEPS


async def test_app_failing_checks_reports_stderr(build_stack):
    handle = await build_stack.start(runner="broken-app")
    err = await _failure(handle)
    assert err.type == "AppCheckFailed"
    job = await build_stack.repo.get(handle.id)
    assert job.status == "failed"
    assert job.error_message == "The generated app did not start correctly. Please try again."
    assert "boom: missing DATABASE_URL" in job.error_detail
    assert await build_stack.sandboxes.find_for_build(handle.id) == []  # killed on failure


async def test_declared_dependency_is_installed(build_stack):
    handle = await build_stack.start(runner="with-dependency")
    result = await handle.result()
    assert result.status == "ready"  # the app imports the package at start-up
    sandbox = await build_stack.sandboxes.connect(result.sandbox_id)
    out = await sandbox.commands.run(
        f".venv/bin/python -c 'import {doubles.DependencyRunnerDouble.PACKAGE} as m; print(m.GREETING)'",
        cwd=result.workspace_path,
    )
    assert out.stdout.strip() == "dependency installed"
    await build_stack.sandboxes.kill(result.sandbox_id)


async def test_traversal_path_fails_without_writing(build_stack):
    handle = await build_stack.start(runner="traversal")
    err = await _failure(handle)
    assert err.type == "BadGeneratedFiles" and err.non_retryable
    job = await build_stack.repo.get(handle.id)
    assert job.status == "failed" and job.sandbox_id is None  # failed in CODE, before any sandbox
    assert await build_stack.sandboxes.find_for_build(handle.id) == []


@pytest.mark.parametrize("runner,stage", [("slow", "code"), ("slow-start", "checks")])
async def test_cancel(build_stack, runner, stage):
    handle = await build_stack.start(runner=runner)
    await _wait_for_stage(handle, stage)
    await asyncio.sleep(0.5)  # let the activity get going
    await handle.signal("cancel", CancelRequest(reason="user changed their mind"))
    result = await handle.result()
    assert result.status == "cancelled"
    job = await build_stack.repo.get(handle.id)
    assert job.status == "cancelled"
    stages = await _transitions(build_stack.repo, handle.id)
    assert stages[-1] == "cancelled" and stage in stages and "ready" not in stages
    assert await build_stack.sandboxes.find_for_build(handle.id) == []
    if runner == "slow":
        assert build_stack.runners["slow"].cancelled  # the heartbeat carried the cancel to the runner


async def test_create_retried_after_lost_response_makes_one_sandbox(temporal_client, sandbox_host, repo):
    async with make_stack(temporal_client, sandbox_host, repo,
                          sandbox_client_cls=doubles.CreateLostResponseSandboxClient) as stack:
        handle = await stack.start()
        result = await handle.result()
        assert stack.sandboxes.create_calls == 2
        assert await stack.sandboxes.find_for_build(handle.id) == [result.sandbox_id]
        await stack.sandboxes.kill(result.sandbox_id)


async def test_concurrent_builds_get_distinct_versions(build_stack):
    project = f"p-{uuid.uuid4().hex[:8]}"
    handles = [await build_stack.start(f"app {i}", project_id=project) for i in range(20)]
    results = await asyncio.gather(*(h.result() for h in handles))
    versions = sorted(r.build_version for r in results)
    assert sorted(versions) == sorted(f"build_v0_{n}" for n in range(1, 21))
    await asyncio.gather(*(build_stack.sandboxes.kill(r.sandbox_id) for r in results))
