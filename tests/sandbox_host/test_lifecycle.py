"""The local host's lifecycle, driven through the unmodified e2b SDK (sync and async): pause,
connect/resume, state in get_info and list, lifecycle on create, auto-resume on a preview request,
a host restart with paused sandboxes, list ordering and `started_after`; and the host's stable id."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import httpx
import psutil
import pytest
from e2b import AsyncSandbox, Sandbox, SandboxQuery, SandboxState
from e2b.exceptions import SandboxNotFoundException

from genloop.http import preview_client
from sandbox_host.isolation import ROOTLESS
from sandbox_host.testing import RunningHost, running_host, unused_uid
from tests.helpers.sandboxes import pid_namespace_of, processes_in, record_of, sandbox, serve

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


async def test_a_worker_paired_with_the_host_polls_the_hosts_queue(tmp_path, temporal_env):
    """`genloop worker` with this host as its sandbox API polls `<task_queue>@<host_id>` (and the
    shared queue), a real worker process against a real dev server."""
    from temporalio.api.enums.v1 import TaskQueueType
    from temporalio.api.taskqueue.v1 import TaskQueue
    from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

    from migrations.apply import upgrade

    db_url = f"sqlite+aiosqlite:///{tmp_path / 'genloop.db'}"
    await upgrade(db_url)
    queue = f"paired-{os.urandom(4).hex()}"
    async with running_host(tmp_path / "host", host_id="machine-b") as host:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TEMPORAL_", "GENLOOP_", "E2B_"))}
        env.update(
            TEMPORAL_ADDRESS=temporal_env.client.service_client.config.target_host,
            GENLOOP_TEMPORAL_TASK_QUEUE=queue,
            GENLOOP_DATABASE_URL=db_url,
            GENLOOP_DATA_DIR=str(tmp_path / "data"),
            GENLOOP_SANDBOX_API_URL=host.url,
            GENLOOP_SANDBOX_API_KEY=host.api_key,
            GENLOOP_WORKER_SWEEP_INTERVAL_S="0",
        )
        with open(tmp_path / "worker.log", "wb") as log:
            worker = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "genloop.cli", "worker", env=env, stdout=log, stderr=log
            )
        try:
            service = temporal_env.client.workflow_service

            async def pollers(name: str) -> int:
                request = DescribeTaskQueueRequest(
                    namespace="default",
                    task_queue=TaskQueue(name=name),
                    task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
                )
                return len((await service.describe_task_queue(request)).pollers)

            for _ in range(300):
                if await pollers(f"{queue}@machine-b") and await pollers(queue):
                    break
                assert worker.returncode is None, (tmp_path / "worker.log").read_text()[-3000:]
                await asyncio.sleep(0.1)
            assert await pollers(f"{queue}@machine-b") >= 1, (tmp_path / "worker.log").read_text()[-3000:]
            assert f"{queue}@machine-b" in (tmp_path / "worker.log").read_text()
        finally:
            worker.terminate()
            await worker.wait()


# ------------------------------------------------------------------------------------ pause / resume
async def info_state(sdk: dict[str, Any], sandbox_id: str) -> SandboxState:
    return (await AsyncSandbox.get_info(sandbox_id, **sdk)).state


async def listed(sdk: dict[str, Any], tag: str, **query: Any) -> list[str]:
    found = await AsyncSandbox.list(query=SandboxQuery(metadata={"t": tag}, **query), **sdk).next_items()
    return [s.sandbox_id for s in found]


def assert_paused_on_disk(host: RunningHost, sandbox_id: str, pid_ns: int) -> None:
    """0 processes, its files in a tar on the host's disk (not a tmpfs), the record says paused."""
    assert processes_in(pid_ns) == []
    record = record_of(host, sandbox_id)
    assert record["state"] == "paused" and record["init_pid"] is None
    assert (host.state_dir / sandbox_id / "files.tar").is_file()


async def test_pause_then_connect_resumes_with_the_same_files(host, sdk):
    tag = os.urandom(4).hex()
    async with sandbox(sdk, metadata={"t": tag}) as sb:
        url = await serve(sb, "the same content")
        await sb.files.write("/tmp/scratch.txt", "in /tmp too")
        pid_ns = pid_namespace_of(host, sb.sandbox_id)

        assert await sb.pause() is True
        assert_paused_on_disk(host, sb.sandbox_id, pid_ns)
        assert await info_state(sdk, sb.sandbox_id) == SandboxState.PAUSED
        assert await listed(sdk, tag) == [sb.sandbox_id]  # the default lists running and paused
        assert await listed(sdk, tag, state=[SandboxState.PAUSED]) == [sb.sandbox_id]
        assert await listed(sdk, tag, state=[SandboxState.RUNNING]) == []
        assert await AsyncSandbox.pause(sb.sandbox_id, **sdk) is False  # 409: already paused
        async with preview_client(timeout=5) as client:  # no auto-resume: the preview is not there
            assert (await client.get(url)).status_code == 502
        assert await info_state(sdk, sb.sandbox_id) == SandboxState.PAUSED

        resumed = await AsyncSandbox.connect(sb.sandbox_id, **sdk)
        assert await info_state(sdk, sb.sandbox_id) == SandboxState.RUNNING
        assert await resumed.files.read("/home/user/project/content.txt") == "the same content"
        assert await resumed.files.read("/tmp/scratch.txt") == "in /tmp too"
        assert (await resumed.commands.run("id -u")).stdout.strip() == "1000"
        # Files, not memory: the server is started again, and serves what it served before.
        assert await serve(resumed, "the same content") == url
        assert await resumed.files.read("/home/user/project/server.py")


async def test_connect_answers_200_when_running_and_201_when_it_resumed(host, sdk):
    async with sandbox(sdk) as sb:
        headers = {"X-API-Key": host.api_key}
        async with httpx.AsyncClient(base_url=host.url, headers=headers, timeout=30) as http:
            running = await http.post(f"/v2/sandboxes/{sb.sandbox_id}/connect", json={"timeout": 60})
            assert running.status_code == 200 and running.json()["sandboxID"] == sb.sandbox_id
            assert (await http.post(f"/sandboxes/{sb.sandbox_id}/pause", json={})).status_code == 204
            again = await http.post(f"/sandboxes/{sb.sandbox_id}/pause", json={})
            assert again.status_code == 409
            resumed = await http.post(f"/v2/sandboxes/{sb.sandbox_id}/connect", json={"timeout": 60})
            assert resumed.status_code == 201 and resumed.json()["envdAccessToken"]
            missing = await http.post("/v2/sandboxes/nosuchsandbox000000/connect", json={})
            assert missing.status_code == 404
            assert (await http.post("/sandboxes/nosuchsandbox000000/pause", json={})).status_code == 404


async def test_snapshots_and_fork_answer_501_naming_the_feature(host, sdk):
    async with sandbox(sdk) as sb:
        headers = {"X-API-Key": host.api_key}
        async with httpx.AsyncClient(base_url=host.url, headers=headers, timeout=30) as http:
            for feature in ("snapshots", "fork"):
                answer = await http.post(f"/sandboxes/{sb.sandbox_id}/{feature}", json={})
                assert answer.status_code == 501 and f"{feature} of a sandbox are not supported" in answer.text
        assert await info_state(sdk, sb.sandbox_id) == SandboxState.RUNNING


async def test_the_sync_sdk_pauses_and_resumes(host, sdk):
    tag = os.urandom(4).hex()

    def roundtrip() -> tuple[bool, bool, str, list[str], str, str]:
        sb = Sandbox.create(metadata={"t": tag}, **sdk)
        try:
            sb.files.write("/home/user/note.txt", "sync")
            first = sb.pause()
            second = Sandbox.pause(sb.sandbox_id, **sdk)
            state = Sandbox.get_info(sb.sandbox_id, **sdk).state.value
            query = SandboxQuery(metadata={"t": tag}, state=[SandboxState.PAUSED])
            listed = [s.sandbox_id for s in Sandbox.list(query=query, **sdk).next_items()]
            back = Sandbox.connect(sb.sandbox_id, **sdk)
            return first, second, state, listed, back.files.read("/home/user/note.txt"), back.get_info().state.value
        finally:
            Sandbox.kill(sb.sandbox_id, **sdk)

    first, second, state, listed, note, after = await asyncio.to_thread(roundtrip)
    assert (first, second, state, note, after) == (True, False, "paused", "sync", "running")
    assert len(listed) == 1


async def test_a_sandbox_being_paused_or_resumed_is_always_found(host, sdk):
    async with sandbox(sdk) as sb:
        await sb.commands.run("head -c 30000000 /dev/urandom > /home/user/big.bin")  # a pause that takes a while
        seen: list[SandboxState] = []

        async def poll(until: asyncio.Task) -> None:
            while not until.done():
                seen.append(await info_state(sdk, sb.sandbox_id))  # SandboxNotFoundException fails the test
                await asyncio.sleep(0.005)

        pausing = asyncio.ensure_future(sb.pause())
        await poll(pausing)
        assert pausing.result() is True and seen[-1] in (SandboxState.RUNNING, SandboxState.PAUSED)
        resuming = asyncio.ensure_future(AsyncSandbox.connect(sb.sandbox_id, **sdk))
        await poll(resuming)
        assert await info_state(sdk, sb.sandbox_id) == SandboxState.RUNNING
        assert (await resuming.result().commands.run("stat -c %s /home/user/big.bin")).stdout.strip() == "30000000"


async def test_killing_a_paused_sandbox_removes_it_and_its_files(host, sdk):
    sb = await AsyncSandbox.create(**sdk)
    await sb.pause()
    assert await AsyncSandbox.kill(sb.sandbox_id, **sdk) is True
    assert not (host.state_dir / sb.sandbox_id).exists()
    with pytest.raises(SandboxNotFoundException):
        await AsyncSandbox.connect(sb.sandbox_id, **sdk)
    assert await AsyncSandbox.kill(sb.sandbox_id, **sdk) is False


async def test_concurrent_connects_to_a_paused_sandbox_resume_it_once(host, sdk):
    async with sandbox(sdk) as sb:
        await sb.files.write("/home/user/x.txt", "once")
        await sb.pause()
        headers = {"X-API-Key": host.api_key}
        async with httpx.AsyncClient(base_url=host.url, headers=headers, timeout=60) as http:
            answers = await asyncio.gather(
                *(http.post(f"/v2/sandboxes/{sb.sandbox_id}/connect", json={"timeout": 60}) for _ in range(10))
            )
        assert sorted(a.status_code for a in answers) == [200] * 9 + [201]
        resumed = await AsyncSandbox.connect(sb.sandbox_id, **sdk)
        assert await resumed.files.read("/home/user/x.txt") == "once"


async def test_paused_sandboxes_survive_a_host_restart(tmp_path):
    async with running_host(tmp_path) as host:
        sdk = host.sdk_options()
        graceful = await AsyncSandbox.create(**sdk, metadata={"t": "restart"})
        crashed = await AsyncSandbox.create(**sdk, metadata={"t": "restart"})
        for sb, text in ((graceful, "kept over a stop"), (crashed, "kept over a crash")):
            await sb.files.write("/home/user/project/kept.txt", text)
            await sb.pause()
        await host.restart()
        await host.restart(crash=True)
        assert sorted(await listed(sdk, "restart", state=[SandboxState.PAUSED])) == sorted(
            [graceful.sandbox_id, crashed.sandbox_id]
        )
        for sb, text in ((graceful, "kept over a stop"), (crashed, "kept over a crash")):
            assert await info_state(sdk, sb.sandbox_id) == SandboxState.PAUSED
            resumed = await AsyncSandbox.connect(sb.sandbox_id, **sdk)
            assert await resumed.files.read("/home/user/project/kept.txt") == text
            assert (await resumed.commands.run("echo alive")).stdout.strip() == "alive"


# ------------------------------------------------------------------------------------ lifecycle on create
async def test_lifecycle_on_timeout_pause_and_auto_resume_on_a_preview_request(host, sdk):
    lifecycle = {"on_timeout": "pause", "auto_resume": True}
    async with sandbox(sdk, timeout=3, lifecycle=lifecycle) as sb:
        info = await sb.get_info()
        assert info.lifecycle == {"on_timeout": "pause", "auto_resume": True}
        await sb.files.write("/home/user/project/content.txt", "after the timeout")
        pid_ns = pid_namespace_of(host, sb.sandbox_id)
        # Its timeout pauses it instead of killing it. The control plane says paused as soon as the
        # pause is decided; its processes end and its record is written after that, so wait for both.
        for _ in range(150):
            if (
                await info_state(sdk, sb.sandbox_id) == SandboxState.PAUSED
                and record_of(host, sb.sandbox_id)["state"] == "paused"
            ):
                break
            await asyncio.sleep(0.1)
        assert_paused_on_disk(host, sb.sandbox_id, pid_ns)
        # A request for its preview resumes it (files, not memory: nothing listens until started).
        async with preview_client(timeout=30) as client:
            await client.get(f"http://{sb.get_host(8080)}/")
        assert await info_state(sdk, sb.sandbox_id) == SandboxState.RUNNING
        assert await sb.files.read("/home/user/project/content.txt") == "after the timeout"


async def test_lifecycle_default_kills_at_the_timeout_and_reports_kill(host, sdk):
    sb = await AsyncSandbox.create(timeout=2, **sdk)
    assert (await sb.get_info()).lifecycle == {"on_timeout": "kill", "auto_resume": False}
    for _ in range(100):
        if not await sb.is_running():
            break
        await asyncio.sleep(0.1)
    with pytest.raises(SandboxNotFoundException):
        await AsyncSandbox.get_info(sb.sandbox_id, **sdk)


# ------------------------------------------------------------------------------------ list ordering
async def test_list_is_newest_first_and_started_after_is_inclusive(host, sdk):
    tag = os.urandom(4).hex()
    made = []
    try:
        for _ in range(3):
            made.append(await AsyncSandbox.create(metadata={"t": tag}, **sdk))
        ids = [sb.sandbox_id for sb in made]
        assert await listed(sdk, tag) == ids[::-1]
        oldest_first = AsyncSandbox.list(query=SandboxQuery(metadata={"t": tag}), order="asc", **sdk)
        assert [s.sandbox_id for s in await oldest_first.next_items()] == ids
        second = await made[1].get_info()
        assert await listed(sdk, tag, started_after=second.started_at) == ids[:0:-1]
        paginator = AsyncSandbox.list(query=SandboxQuery(metadata={"t": tag}), limit=2, **sdk)
        pages = [await paginator.next_items()]
        pages.append(await paginator.next_items())
        assert [[s.sandbox_id for s in page] for page in pages] == [ids[:0:-1], ids[:1]]
    finally:
        for sb in made:
            await sb.kill()


async def test_an_unsafe_hosts_sandbox_pauses_with_its_files_on_disk_and_resumes(tmp_path):
    async with running_host(tmp_path, unsafe_no_isolation=True) as host:
        sdk = host.sdk_options()
        sb = await AsyncSandbox.create(**sdk)
        await sb.files.write("/home/user/kept.txt", "on the host's disk")
        await sb.commands.run("sleep 600", background=True, timeout=0)
        init_pid = record_of(host, sb.sandbox_id)["init_pid"]
        assert await sb.pause() is True
        assert not psutil.pid_exists(init_pid) or psutil.Process(init_pid).status() == psutil.STATUS_ZOMBIE
        assert record_of(host, sb.sandbox_id)["state"] == "paused"
        await host.restart()
        assert await info_state(sdk, sb.sandbox_id) == SandboxState.PAUSED
        resumed = await AsyncSandbox.connect(sb.sandbox_id, **sdk)
        assert await resumed.files.read("/home/user/kept.txt") == "on the host's disk"
        assert await resumed.commands.list() == []  # nothing of before the pause runs again
        await resumed.kill()


async def test_a_rootless_hosts_sandbox_pauses_and_resumes_across_a_restart(tmp_path):
    run_as = unused_uid() if os.geteuid() == 0 else None  # as test_rootless.py: an unprivileged host
    async with running_host(tmp_path, run_as=run_as) as host:
        assert (await host.health())["mode"] == ROOTLESS
        sdk = host.sdk_options()
        sb = await AsyncSandbox.create(**sdk)
        await sb.files.write("/home/user/project/kept.txt", "rootless")
        await sb.commands.run("sleep 600", background=True, timeout=0)
        pid_ns = pid_namespace_of(host, sb.sandbox_id)
        assert await sb.pause() is True
        assert_paused_on_disk(host, sb.sandbox_id, pid_ns)
        await host.restart(crash=True)
        resumed = await AsyncSandbox.connect(sb.sandbox_id, **sdk)
        assert await resumed.files.read("/home/user/project/kept.txt") == "rootless"
        assert await resumed.commands.list() == []
        assert (await resumed.commands.run("id -u")).stdout.strip() == "1000"
        await resumed.kill()
