"""Orphan sweep: sandboxes of builds that died without cleaning up (their workflow terminated with
the `temporal` CLI after DEPS) are found by metadata and killed, by `genloop sweep` and by the
worker's periodic sweep, while the sandboxes of live builds (a running workflow, a READY preview)
are left alone."""

from __future__ import annotations

import sys

import pytest

from genloop.http import preview_client
from tests.reliability.harness import run_command, terminate_with_cli, wait_until

pytestmark = pytest.mark.reliability


async def _orphan(stack) -> tuple[str, str]:
    """A build terminated in CHECKS (its app running): (build id, its sandbox id)."""
    handle = await stack.start_build("late-binding")
    await stack.wait_in_stage(handle.id, "checks")
    await terminate_with_cli(stack, handle.id)
    [sandbox_id] = await stack.sandboxes.find_for_build(handle.id)
    return handle.id, sandbox_id


async def test_sweep_kills_orphans_and_spares_live_builds(private_stack):
    stack = private_stack
    await stack.start_worker()  # periodic sweep off (GENLOOP_WORKER_SWEEP_INTERVAL_S=0)

    ready_handle = await stack.start_build("template")
    ready = await ready_handle.result()
    running = await stack.start_build("slow-install")
    await stack.wait_in_stage(running.id, "deps")
    [running_sandbox] = await stack.sandboxes.find_for_build(running.id)
    orphan_build, orphan_sandbox = await _orphan(stack)

    async def live_builds_untouched() -> None:
        assert await stack.sandboxes.find_for_build(ready_handle.id) == [ready.sandbox_id]
        assert await stack.sandboxes.find_for_build(running.id) == [running_sandbox]
        async with preview_client(timeout=10) as http:
            assert (await http.get(f"{ready.preview_url}/health")).status_code == 200

    # 1. `genloop sweep`, run as an operator would.
    code, out = await run_command([sys.executable, "-m", "genloop.cli", "sweep"], env=stack.service_env())
    assert code == 0, out
    assert f"killed: 1 {orphan_sandbox}" in out, out
    assert await stack.sandboxes.find_for_build(orphan_build) == []
    await live_builds_untouched()

    # 2. The worker's periodic sweep (a second worker with a 1 s interval joins the task queue).
    second_orphan_build, _ = await _orphan(stack)
    await stack.start_worker(GENLOOP_WORKER_SWEEP_INTERVAL_S="1")

    async def swept() -> bool:
        return await stack.sandboxes.find_for_build(second_orphan_build) == []

    await wait_until(swept, "the periodic sweep to kill the orphan", timeout=60)
    await live_builds_untouched()
    assert "orphan sweep killed 1 sandboxes" in stack.workers[-1].log_tail(100_000)
