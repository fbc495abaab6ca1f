"""Record the golden histories replayed by tests/workflows/test_replay.py.

    .venv/bin/python -m tests.histories.record

Runs a ready, a failed and a cancelled build on a fresh dev server, local sandbox host and SQLite
database, and exports each history with `temporal workflow show --output json`. Re-record only for a
deliberate, patched change: old histories must keep replaying.
"""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
from pathlib import Path

from temporalio.client import WorkflowFailureError
from temporalio.testing import WorkflowEnvironment

from activities.sandbox import close_sdk_transports
from genloop.devserver import temporal_binary
from migrations.apply import upgrade
from persistence.repository import JobRepository
from sandbox_host.testing import running_host
from tests.workflows.conftest import make_stack
from workflows.build import SEARCH_ATTRIBUTES
from workflows.types import STATUS_QUERY, BuildStatus, CancelRequest

HERE = Path(__file__).parent


async def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="genloop-record-"))
    url = f"sqlite+aiosqlite:///{work}/genloop.db"
    await upgrade(url)
    repo = JobRepository.from_url(url)
    env = await WorkflowEnvironment.start_local(dev_server_existing_path=temporal_binary(), search_attributes=SEARCH_ATTRIBUTES)
    target = env.client.service_client.config.target_host
    try:
        async with running_host(work / "host") as host, make_stack(env.client, host, repo) as stack:
            ready = await stack.start("a todo list for cats", build_id="build_ready")
            await ready.result()
            failed = await stack.start(runner="crashing", build_id="build_failed")
            try:
                await failed.result()
            except WorkflowFailureError:
                pass
            cancelled = await stack.start(runner="slow", build_id="build_cancelled")
            while (await cancelled.query(STATUS_QUERY, result_type=BuildStatus)).stage != "code":
                await asyncio.sleep(0.1)
            await cancelled.signal("cancel", CancelRequest(reason="recorded cancel"))
            await cancelled.result()
            for wf_id in ("build_ready", "build_failed", "build_cancelled"):
                out = subprocess.run(
                    [temporal_binary(), "workflow", "show", "-w", wf_id, "--address", target, "--output", "json"],
                    check=True, capture_output=True, text=True,
                ).stdout
                (HERE / f"{wf_id}.json").write_text(out)
                print(f"recorded {wf_id}.json ({len(out)} bytes)")
            res = await ready.result()
            await stack.sandboxes.kill(res.sandbox_id)
    finally:
        await close_sdk_transports()
        await repo.aclose()
        await env.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
