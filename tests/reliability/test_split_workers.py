"""A split deployment: `genloop worker --only workflows` runs the workflow tasks and their local
activities (the stage writes), `genloop worker --only activities` the activity tasks (runner,
sandbox). Builds go to READY; every workflow task was completed by the first, every activity by the
second; killing the workflow half mid-build loses nothing."""

from __future__ import annotations

import pytest
from temporalio.api.enums.v1 import EventType

from tests.reliability.harness import assert_recovered_ready

pytestmark = pytest.mark.reliability


async def _identities(handle) -> tuple[set[str], set[str]]:
    """(identities that completed workflow tasks, identities that started activity tasks)."""
    workflow_tasks, activity_tasks = set(), set()
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
            workflow_tasks.add(event.workflow_task_completed_event_attributes.identity)
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            activity_tasks.add(event.activity_task_started_event_attributes.identity)
    return workflow_tasks, activity_tasks


async def test_workflow_and_activity_workers_apart(stack):
    workflows = await stack.start_worker(only="workflows")
    activities = await stack.start_worker(only="activities")
    assert "(workflows only)" in workflows.log_tail() and "(activities only)" in activities.log_tail()

    handle = await stack.start_build("template")
    await assert_recovered_ready(stack, handle, await handle.result())
    workflow_tasks, activity_tasks = await _identities(handle)
    assert {i.split("@")[0] for i in workflow_tasks} == {str(workflows.pid)}
    assert {i.split("@")[0] for i in activity_tasks} == {str(activities.pid)}

    # The workflow half dies while CODE runs on the activity half; a new one takes over.
    handle = await stack.start_build("gated")
    await stack.wait_activity_started(handle, "generate_code")
    await workflows.kill9()
    await stack.start_worker(only="workflows")
    await stack.open_gate(handle)
    await assert_recovered_ready(stack, handle, await handle.result())
