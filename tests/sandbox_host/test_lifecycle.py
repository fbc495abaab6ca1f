"""The local host's lifecycle, driven through the unmodified e2b SDK (sync and async): pause,
connect/resume, state in get_info and list, lifecycle on create, auto-resume on a preview request,
a host restart with paused sandboxes, list ordering and `started_after`; and the host's stable id."""

from __future__ import annotations

import pytest

from sandbox_host.testing import running_host

pytestmark = pytest.mark.asyncio(loop_scope="session")


# ------------------------------------------------------------------------------------ host id
async def test_host_id_is_generated_once_and_survives_a_restart(tmp_path):
    async with running_host(tmp_path) as host:
        first = (await host.health())["host_id"]
        assert first.startswith("h-") and len(first) == 14
        assert (host.state_dir / "host-id").read_text().strip() == first
        await host.restart()
        assert (await host.health())["host_id"] == first


async def test_host_id_setting_overrides_the_generated_one(tmp_path):
    async with running_host(tmp_path, host_id="machine-a") as host:
        assert (await host.health())["host_id"] == "machine-a"


async def test_a_worker_paired_with_the_host_polls_the_hosts_queue(tmp_path):
    from genloop.cli.worker import host_identity, host_queue
    from genloop.settings import get_settings

    async with running_host(tmp_path, host_id="machine-b") as host:
        settings = get_settings()
        settings = settings.model_copy(
            update={"sandbox": settings.sandbox.model_copy(update={"api_url": host.url})}
        )
        host_id = await host_identity(settings, wait_s=5)
        assert host_id == "machine-b"
        assert host_queue(settings, host_id) == f"{settings.temporal.task_queue}@machine-b"
