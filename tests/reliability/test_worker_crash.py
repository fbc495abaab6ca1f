"""Worker crash: `kill -9` the worker process during each stage, start a new one; the build reaches
READY with exactly one sandbox, one build_version and every transition recorded once, in order.

What "during" means per stage:
- STARTING / SCAFFOLD: the worker is inside the stage's transition write (a local activity in the
  build's first workflow task), held there by a PostgreSQL trigger (harness.StageGate). The kill
  aborts that open transaction; the workflow task times out and the new worker replays it. Both
  stages are one write (workflows/build.py, ONE_START_WRITE_PATCH), so either gate finds the row
  still queued.
- CODE: the Runner is running (GatedRunnerDouble, first attempt waits for a gate the test never opens).
- DEPS: the sandbox exists and `pip install` runs in it, building a dependency that takes minutes
  (SlowInstallRunnerDouble).
- CHECKS: the app runs in the sandbox and start_and_check is waiting for /health
  (LateBindingAppRunnerDouble: the first launch binds late).
"""

from __future__ import annotations

import pytest

from tests.reliability.harness import StageGate, assert_recovered_ready, sandbox_processes

pytestmark = pytest.mark.reliability

CASES = {
    # stage: (runner, how the kill is positioned, status in the database at the kill)
    "starting": ("template", "gate", "queued"),
    "scaffold": ("template", "gate", "queued"),
    "code": ("gated", "generate_code", "code"),
    "deps": ("slow-install", "install_dependencies", "deps"),
    "checks": ("late-binding", "start_and_check", "checks"),
}



@pytest.mark.parametrize("stage", list(CASES))
async def test_worker_killed_during_stage_resumes_to_ready(stack, stage):
    runner, position, db_status_at_kill = CASES[stage]
    gate = StageGate(stack.database_url, stage) if position == "gate" else None
    if gate is not None:
        await gate.close_and_hold()
    try:
        first = await stack.start_worker()
        handle = await stack.start_build(runner)
        if gate is not None:
            await gate.wait_blocked()
        else:
            await stack.wait_activity_started(handle, position)
        if stage in ("deps", "checks"):
            await stack.wait_in_stage(handle.id, stage)
        assert await stack.db_status(handle.id) == db_status_at_kill

        await first.kill9()
    finally:
        if gate is not None:
            await gate.open_and_remove()

    await stack.start_worker()
    result = await handle.result()

    await assert_recovered_ready(stack, handle, result)
    # The dead attempt's work does not linger in the sandbox: one app, no install still running.
    processes = await sandbox_processes(stack, result.sandbox_id)
    assert not [p for p in processes if "pip install" in p], processes
    assert len([p for p in processes if "app.py" in p]) == 1, processes


async def test_worker_killed_after_a_stage_commit_before_temporal_heard_of_it(stack):
    """The window local activities leave: the STARTING and SCAFFOLD write committed, then the worker
    dies before its workflow task completion (which carries the local activity's result) reached
    Temporal. The new worker replays the task and executes that write again, against a row that is
    already past STARTING. The worker reaches Temporal through a TCP proxy; cutting it between the
    commit and the kill makes the window deterministic."""
    from tests.reliability.tcp_proxy import TcpProxy

    host, port = stack.temporal_target.rsplit(":", 1)
    proxy = TcpProxy(host, int(port))
    await proxy.start()
    gate = StageGate(stack.database_url, "scaffold")
    await gate.close_and_hold()
    try:
        first = await stack.start_worker(TEMPORAL_ADDRESS=f"127.0.0.1:{proxy.port}")
        handle = await stack.start_build("template")
        await gate.wait_blocked()  # the STARTING and SCAFFOLD transaction waits at the gate
        proxy.cut()  # the worker can no longer tell Temporal anything
        await gate.open_and_remove()  # SCAFFOLD commits
        await stack.wait_db_status(handle.id, "scaffold")
        await first.kill9()
    finally:
        await gate.open_and_remove()
        await proxy.close()

    await stack.start_worker()
    result = await handle.result()
    await assert_recovered_ready(stack, handle, result)
