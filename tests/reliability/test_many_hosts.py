"""Beyond one machine, on one: two sandbox hosts, three workers (two paired with the first host, one
with the second), two API processes, one PostgreSQL database and one Temporal namespace, each
process with its own port and data dir, as separate machines would run them (docs/deploy.md).

1. 40 builds sent to both APIs: all READY, versions unique per project, and every activity that
   touched a sandbox ran on the queue of the host the build recorded, which lists that sandbox.
2. The second "machine" dies (its host and worker SIGKILLed, its sandboxes gone) while 20 builds
   run: every build ends READY on the first host, none twice, none lost; a version that was served
   on the lost host is served again elsewhere on its next request.
3. A third host joins, every worker is restarted in turn while builds run: nothing is lost; with the
   first host's workers stopped, new builds land on the third host.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from collections import Counter

import httpx
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import WorkflowHandle

from activities.sandbox import SandboxClient, SandboxConfig
from genloop.http import preview_client
from sandbox_host.testing import running_host
from tests.api.conftest import running_api
from tests.reliability.harness import ServiceProcess, Stack, run_command, wait_until
from workflows.build import HOST_ROUTED
from workflows.types import STATUS_QUERY, BuildResult, BuildStatus

pytestmark = pytest.mark.reliability

TERMINAL = ("ready", "failed", "cancelled")
LATE_BINDING_S = 8  # the app of a phase-2 build binds its port this long after its first launch


def sandbox_client(host) -> SandboxClient:
    return SandboxClient(SandboxConfig(api_key=host.api_key, api_url=host.url, template="base", timeout_s=3600))


async def host_sandboxes(host) -> set[str]:
    return {info.sandbox_id for info in await sandbox_client(host).list()}


async def host_queues(stack: Stack, handle: WorkflowHandle) -> dict[str, set[str]]:
    """Activity name -> the task queues its attempts were scheduled on."""
    queues: dict[str, set[str]] = {}
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            attrs = event.activity_task_scheduled_event_attributes
            queues.setdefault(attrs.activity_type.name, set()).add(attrs.task_queue.name)
    return queues


async def wait_terminal(stack: Stack, build_ids: list[str], timeout: float = 300) -> dict[str, str]:
    async def all_done() -> dict[str, str] | None:
        statuses = {b: await stack.db_status(b) for b in build_ids}
        return statuses if all(s in TERMINAL for s in statuses.values()) else None

    return await wait_until(all_done, f"{len(build_ids)} builds to end", timeout=timeout, interval=0.5)


class Machines:
    """The test's processes: hosts by name, their host ids, workers paired with a host."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.hosts: dict[str, object] = {}
        self.host_ids: dict[str, str] = {}
        self.paired: dict[str, str] = {}  # worker name -> host name

    async def add_host(self, name: str, host) -> None:
        self.hosts[name] = host
        self.host_ids[name] = (await host.health())["host_id"]
        assert self.host_ids[name] and self.host_ids[name] not in list(self.host_ids.values())[:-1]

    def queue(self, name: str) -> str:
        return f"{self.stack.task_queue}@{self.host_ids[name]}"

    def host_named(self, host_id: str) -> str:
        return next(name for name, hid in self.host_ids.items() if hid == host_id)

    async def start_worker(self, host_name: str) -> ServiceProcess:
        host = self.hosts[host_name]
        worker = await self.stack.start_worker(
            GENLOOP_SANDBOX_API_URL=host.url, GENLOOP_SANDBOX_API_KEY=host.api_key,
            GENLOOP_TEST_LATE_BINDING_S=str(LATE_BINDING_S),
        )
        self.paired[worker.name] = host_name
        log = worker.log_tail(100_000)
        assert self.queue(host_name) in log, log  # it polls its host's queue as well as the shared one
        return worker

    async def restart(self, worker: ServiceProcess) -> ServiceProcess:
        """A graceful stop (SIGTERM: in-flight tasks finish) and a new worker in its place."""
        host_name = self.paired.pop(worker.name)
        await worker.stop(grace_s=60)
        assert worker.proc.returncode == 0, worker.log_tail()
        return await self.start_worker(host_name)

    async def assert_on_recorded_host(self, build_id: str) -> str:
        """The build is READY with its sandbox on the host it recorded, and every activity that
        touched that sandbox went to that host's queue. Returns the host's name."""
        stack = self.stack
        job = await stack.repo.get(build_id)
        assert job.status == "ready", (build_id, job.status, job.error_detail)
        name = self.host_named(job.sandbox_host)
        assert job.sandbox_id in await host_sandboxes(self.hosts[name]), (build_id, name)
        queues = await host_queues(stack, stack.client.get_workflow_handle(build_id))
        final = queues["start_and_check"]
        assert self.queue(name) in final, (build_id, name, queues)
        for activity in HOST_ROUTED & queues.keys():
            assert queues[activity] <= {self.queue(n) for n in self.hosts}, (activity, queues[activity])
        assert queues["provision_sandbox"] == {stack.task_queue}, queues
        return name


@pytest.fixture
async def machines(private_stack, tmp_path):
    """private_stack's host is host "a"; host "b" is a second one with its own port and state."""
    m = Machines(private_stack)
    await m.add_host("a", private_stack.host)
    async with contextlib.AsyncExitStack() as exits:
        m.exits = exits
        await m.add_host("b", await exits.enter_async_context(running_host(tmp_path / "host-b")))
        yield m


async def test_two_hosts_three_workers_two_apis_survive_losing_a_machine(machines, temporal_env, tmp_path):
    m, stack = machines, machines.stack
    code, out = await run_command([sys.executable, "-m", "genloop.cli", "migrate"], env=stack.service_env())
    assert code == 0, out  # as a release would run it (the database is at head already: a no-op)
    w1, w2 = await m.start_worker("a"), await m.start_worker("a")
    w3 = await m.start_worker("b")
    apis = []
    for n in (1, 2):
        api_dir = tmp_path / f"api-{n}"
        api_dir.mkdir()
        apis.append(await m.exits.enter_async_context(running_api(
            api_dir, token=None, TEMPORAL_ADDRESS=stack.temporal_target,
            GENLOOP_TEMPORAL_TASK_QUEUE=stack.task_queue, GENLOOP_DATABASE_URL=stack.database_url,
        )))

    # 1. 40 builds, 4 per project, sent to both APIs.
    projects = [f"p-many-{n}-{uuid.uuid4().hex[:6]}" for n in range(10)]
    build_ids: list[str] = []
    async with apis[0].client() as first, apis[1].client() as second:
        for n in range(40):
            api = (first, second)[n % 2]
            response = await api.post(f"/v1/projects/{projects[n % 10]}/builds", json={"goal": f"app number {n}"})
            assert response.status_code == 202, response.text
            build_ids.append(response.json()["build_id"])
    statuses = await wait_terminal(stack, build_ids)
    assert Counter(statuses.values()) == {"ready": 40}, statuses
    by_host = Counter([await m.assert_on_recorded_host(b) for b in build_ids])
    print("phase 1, builds per host:", dict(by_host))
    assert set(by_host) == {"a", "b"}, by_host
    versions = [(j.project_id, j.build_version) for b in build_ids if (j := await stack.repo.get(b))]
    assert len(set(versions)) == 40 and {v for _, v in versions} == {f"build_v0_{i}" for i in range(1, 5)}
    served_on_b = [b for b in build_ids if (await stack.repo.get(b)).sandbox_host == m.host_ids["b"]]

    # 2. 20 builds; the second machine dies while they run.
    handles = [await stack.start_build("late-binding") for _ in range(20)]

    async def running_on_b() -> list[str]:
        on_b = []
        for h in handles:
            job = await stack.repo.get(h.id)
            if job and job.sandbox_host == m.host_ids["b"] and job.status in ("deps", "checks"):
                on_b.append(h.id)
        return on_b if len(on_b) >= 2 else []

    caught = await wait_until(running_on_b, "builds running on host b", timeout=180)
    lost_sandboxes = {b: (await stack.repo.get(b)).sandbox_id for b in caught}
    await w3.kill9()
    await m.hosts["b"].kill()
    await m.hosts["b"].reap()  # the machine is gone: so are its sandboxes
    killed_at = time.monotonic()
    results: list[BuildResult] = await asyncio.gather(*(h.result() for h in handles))
    print(f"phase 2: all 20 ended {time.monotonic() - killed_at:.1f} s after the kill; moved: {len(caught)}")
    assert [r.status for r in results] == ["ready"] * 20, results
    for h in handles:
        assert await m.assert_on_recorded_host(h.id) == "a"
        assert len(await stack.repo.list_jobs((await stack.repo.get(h.id)).project_id)) == 1
    for build_id, lost in lost_sandboxes.items():  # the lost sandbox is not what the build recorded
        job = await stack.repo.get(build_id)
        assert job.sandbox_id != lost
        handle = stack.client.get_workflow_handle(build_id)
        status = await handle.query(STATUS_QUERY, result_type=BuildStatus)
        assert (status.sandbox_id, status.sandbox_host) == (job.sandbox_id, m.host_ids["a"])
        details = (await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)).current_details
        assert f"sandbox `{job.sandbox_id}` on host `{m.host_ids['a']}`" in details, details  # the Web UI's view

    # A version served on the lost host answers on its next request, served again on host a.
    async with preview_client(timeout=120) as http:
        for build_id in served_on_b[:3]:
            job = await stack.repo.get(build_id)
            port = httpx.URL(apis[0].url).port
            page = await http.get(f"http://{job.preview_label}.localhost:{port}/")
            assert page.status_code == 200, (build_id, page.status_code, page.text[:300])
            moved = await stack.repo.get(build_id)
            assert moved.sandbox_host == m.host_ids["a"] and moved.sandbox_id != job.sandbox_id
            assert moved.sandbox_id in await host_sandboxes(m.hosts["a"])

    # 3. A third host joins; every worker is restarted in turn while builds run.
    await m.add_host("c", await m.exits.enter_async_context(running_host(tmp_path / "host-c")))
    w4 = await m.start_worker("c")
    handles = [await stack.start_build("template") for _ in range(10)]
    for worker in (w1, w2, w4):
        replacement = await m.restart(worker)
        if worker is w4:
            w4 = replacement
        else:
            w1, w2 = (replacement, w2) if worker is w1 else (w1, replacement)
    results = await asyncio.gather(*(h.result() for h in handles))
    assert [r.status for r in results] == ["ready"] * 10, results
    for h in handles:
        await m.assert_on_recorded_host(h.id)

    # With the first host's workers gone, new work lands on the third host.
    await w1.stop()
    await w2.stop()
    handles = [await stack.start_build("template") for _ in range(3)]
    results = await asyncio.gather(*(h.result() for h in handles))
    assert [r.status for r in results] == ["ready"] * 3, results
    assert [await m.assert_on_recorded_host(h.id) for h in handles] == ["c"] * 3
