"""Sandbox host crash-restart mid-build (SIGKILL while `pip install` runs in the build's sandbox, then
started again on the same state directory). The host re-adopts the sandbox; the install activity
fails over to a retry, which ends the orphaned install and installs again. The build reaches READY
or fails with the friendly message and a debug_id (and a rerun succeeds). Afterwards no process in
the host's uid block (per-uid mode) belongs to a sandbox the host does not list, and killing the
listed ones leaves none of their pid namespaces alive (either mode)."""

from __future__ import annotations

import json

import psutil
import pytest
from temporalio.client import WorkflowFailureError

from sandbox_host import isolation
from tests.helpers.sandboxes import pid_namespace_of, processes_in
from tests.reliability.harness import assert_recovered_ready, wait_until

pytestmark = pytest.mark.reliability


def _sandbox_uids_running(state_dir) -> set[int]:
    base = isolation.uid_block(state_dir)
    return {
        p.info["uids"].real
        for p in psutil.process_iter(["uids", "status"])
        if p.info["uids"] is not None and p.info["status"] != psutil.STATUS_ZOMBIE
        and base <= p.info["uids"].real < base + isolation.UID_BLOCK_SIZE
    }


async def _listed_uids(stack) -> set[int]:
    return {
        json.loads((stack.host.state_dir / s.sandbox_id / "record.json").read_text())["uid"]
        for s in await stack.sandboxes.list()
    }


async def test_sandbox_host_restart_mid_build(private_stack):
    stack = private_stack
    host = stack.host
    await stack.start_worker()
    handle = await stack.start_build("slow-install")
    await stack.wait_in_stage(handle.id, "deps")
    [sandbox_id] = await stack.sandboxes.find_for_build(handle.id)
    namespaces = {pid_namespace_of(host, sandbox_id)}

    await host.restart(crash=True)
    assert sandbox_id in {s.sandbox_id for s in await stack.sandboxes.list()}  # adopted

    try:
        result = await handle.result()
    except WorkflowFailureError as err:  # the allowed alternative: a friendly failure, then a rerun
        job = await stack.repo.get(handle.id)
        assert job.status == "failed" and job.debug_id and job.error_message and "Traceback" not in job.error_message
        assert await stack.sandboxes.find_for_build(handle.id) == []
        rerun = await stack.start_build("template")
        await assert_recovered_ready(stack, rerun, await rerun.result())
        print(f"build failed after the host restart ({err.cause}); rerun READY")
    else:
        await assert_recovered_ready(stack, handle, result)
        assert result.sandbox_id == sandbox_id
        print("build READY after the host restart, in its adopted sandbox")

    # No orphan: every sandbox process belongs to a sandbox the host lists...
    assert _sandbox_uids_running(host.state_dir) <= await _listed_uids(stack)
    # ...and killing those leaves nothing behind.
    for s in await stack.sandboxes.list():
        namespaces.add(pid_namespace_of(host, s.sandbox_id))
        await stack.sandboxes.kill(s.sandbox_id)
    await wait_until(lambda: not _sandbox_uids_running(host.state_dir), "every sandbox process to be gone", timeout=30)
    assert [ns for ns in namespaces if processes_in(ns)] == []
