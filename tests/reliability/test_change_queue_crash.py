"""Changes queued on a project while the worker is killed (`kill -9`) in the middle of the first
one: after a new worker starts, every change is applied exactly once, in the order it was sent,
each on the result of the one before (ProjectWorkflow's queue and its child builds are durable)."""

from __future__ import annotations

import pytest
from temporalio.client import WithStartWorkflowOperation
from temporalio.common import WorkflowIDConflictPolicy

from tests.reliability.harness import PIPELINE, wait_until
from workflows.project import ProjectWorkflow
from workflows.types import BuildResult, ChangeRequest, ProjectInput, SubmitResult, project_workflow_id

pytestmark = pytest.mark.reliability

CHANGES = ("first", "second", "third")


async def test_worker_killed_while_changes_are_queued(stack):
    project = f"p-queue-{stack.task_queue[-8:]}"
    worker = await stack.start_worker()
    base_handle = await stack.start_build("template", project_id=project)
    assert (await base_handle.result()).status == "ready"

    def start() -> WithStartWorkflowOperation:  # one per call: the SDK does not reuse an operation
        return WithStartWorkflowOperation(
            ProjectWorkflow.run, ProjectInput(project_id=project, task_queue=stack.task_queue),
            id=project_workflow_id(project), task_queue=stack.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )

    build_ids = [f"b-change-{name}-{stack.task_queue[-8:]}" for name in CHANGES]
    for build_id, name in zip(build_ids, CHANGES, strict=True):
        # As the API does: the row first, then the submit (the runner holds each change in CODE).
        await stack.repo.create_job(build_id, project, "", kind="change", runner="gated")
        accepted: SubmitResult = await stack.client.execute_update_with_start_workflow(
            ProjectWorkflow.submit, ChangeRequest(build_id=build_id, runner="gated", change=name),
            start_workflow_operation=start(), id=build_id, result_type=SubmitResult,
        )
        assert accepted.build_id == build_id
    first = stack.client.get_workflow_handle(build_ids[0], result_type=BuildResult)
    await stack.wait_activity_started(first, "generate_code")
    assert await stack.db_status(build_ids[1]) == "queued" and await stack.db_status(build_ids[2]) == "queued"

    await worker.kill9()
    for build_id in build_ids:  # later first attempts need their gates; retried ones pass anyway
        (stack.gate_dir / build_id).touch()
    await stack.start_worker()

    versions = []
    for index, build_id in enumerate(build_ids):
        handle = stack.client.get_workflow_handle(build_id, result_type=BuildResult)
        # The project starts each queued build only after the one before it has finished.
        await wait_until(handle.describe, f"build {build_id} to start", timeout=180)
        result = await handle.result()
        assert result.status == "ready", result
        versions.append(result.build_version)
        assert await stack.sandboxes.find_for_build(build_id) == [result.sandbox_id]
        assert [t.stage for t in await stack.repo.list_transitions(build_id)] == PIPELINE
        files = {f.path for f in await stack.repo.get_files(build_id)}
        assert {f"{name}.txt" for name in CHANGES[: index + 1]} <= files, files
        assert not {f"{name}.txt" for name in CHANGES[index + 1 :]} & files, files
        job = await stack.repo.get(build_id)
        assert job.base_build_id == (build_ids[index - 1] if index else base_handle.id)
    assert versions == ["build_v0_2", "build_v0_3", "build_v0_4"]
