"""Cancel at each stage: the build ends `cancelled` (workflow result, status query and job row), its
sandbox is gone, and no transition is recorded after `cancelled`.

The build is held in each stage the same way as in test_worker_crash (see its docstring); the cancel
is the `cancel` signal the API sends. For STARTING/SCAFFOLD the signal reaches the workflow while
the stages' transition write (one transaction for both) is held at the database gate, and the gate
stays closed until the build has ended: the cancelled write must not land afterwards.
"""

from __future__ import annotations

import pytest

from tests.reliability.harness import PIPELINE, StageGate
from workflows.types import CANCEL_SIGNAL, STATUS_QUERY, BuildStatus, CancelRequest

pytestmark = pytest.mark.reliability

CASES = {
    "starting": ("template", "gate"),
    "scaffold": ("template", "gate"),
    "code": ("gated", "generate_code"),
    "deps": ("slow-install", "install_dependencies"),
    "checks": ("late-binding", "start_and_check"),
}


@pytest.mark.parametrize("stage", list(CASES))
async def test_cancel_during_stage(stack, stage):
    runner, position = CASES[stage]
    gate = StageGate(stack.database_url, stage) if position == "gate" else None
    if gate is not None:
        await gate.close_and_hold()
    try:
        await stack.start_worker()
        handle = await stack.start_build(runner)
        if gate is not None:
            await gate.wait_blocked()
        else:
            await stack.wait_activity_started(handle, position)
        if stage in ("deps", "checks"):
            await stack.wait_in_stage(handle.id, stage)
        job = await stack.repo.get(handle.id)
        sandbox_id = job.sandbox_id if job else None

        await handle.signal(CANCEL_SIGNAL, CancelRequest(reason="user changed their mind"))
        result = await handle.result()
    finally:
        if gate is not None:
            # Dropping the trigger waits for every transaction that wrote job_transitions: once it
            # returns, a cancelled write that was still pending has either landed or rolled back.
            await gate.open_and_remove()

    assert result.status == "cancelled" and result.message == "user changed their mind"
    assert (await handle.query(STATUS_QUERY, result_type=BuildStatus)).stage == "cancelled"
    job = await stack.repo.get(handle.id)
    assert (job.status, job.status_message) == ("cancelled", "user changed their mind")

    stages = [t.stage for t in await stack.repo.list_transitions(handle.id)]
    assert stages[-1] == "cancelled" and stages.count("cancelled") == 1, stages
    reached = stages[:-1]
    assert reached == PIPELINE[: len(reached)], stages  # in order, nothing after the cancel
    assert "ready" not in stages
    if gate is None:
        assert reached[-1] == stage, stages  # cancelled while in the stage
    else:  # the held write is STARTING and SCAFFOLD in one transaction: all of it landed, or none
        assert reached in (PIPELINE[:1], PIPELINE[:3]), stages

    assert await stack.sandboxes.find_for_build(handle.id) == []
    if stage in ("deps", "checks"):
        assert sandbox_id and sandbox_id not in {s.sandbox_id for s in await stack.sandboxes.list()}
