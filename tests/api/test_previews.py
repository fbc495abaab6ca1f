"""Previews that never die, through the API process's gateway: each READY version at a stable URL;
idle versions pause and wake on their next request (single-flight); a sandbox killed behind
genloop's back is served again from the stored files; retention answers 410; a version whose app no
longer starts answers 503 with its debug_id, without a crash loop. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from e2b import AsyncSandbox, SandboxState
from temporalio.client import Client

from activities.build import BuildActivities
from activities.preview import PreviewActivities
from activities.runners import TemplateRunner
from activities.sandbox import SandboxClient
from activities.sweep import sweep_orphans
from genloop.cli.worker import build_worker
from genloop.http import preview_client
from genloop.settings import load_settings
from persistence.repository import JobRepository
from sandbox_host.testing import RunningHost, free_port
from tests.api.conftest import ApiServer, new_project, running_api, temporal_address
from tests.helpers.sandboxes import pid_namespace_of, processes_in
from tests.reliability.harness import wait_until
from tests.workflows.conftest import sandbox_config
from workflows.types import PreviewPolicy, PreviewStatus, preview_workflow_id

IDLE_S = 3.0


@dataclass
class PreviewStack:
    api: ApiServer
    http: httpx.AsyncClient
    repo: JobRepository
    client: Client
    sandboxes: SandboxClient
    activities: BuildActivities
    host: RunningHost


@pytest.fixture(scope="session")
async def preview_stack(tmp_path_factory, temporal_env, temporal_client, sandbox_host, repo, migrated_db_url
                        ) -> AsyncIterator[PreviewStack]:
    """An API (with its gateway) and a worker whose versions pause after IDLE_S seconds idle."""
    api_port = free_port()
    sandboxes = SandboxClient(sandbox_config(sandbox_host))
    acts = BuildActivities(
        repo, sandboxes, {"template": TemplateRunner()}, health_deadline_s=20,
        version_url=lambda label: f"http://{label}.localhost:{api_port}",
        preview=PreviewPolicy(idle_pause_s=IDLE_S, retry_failed_s=3600),
    )
    task_queue = f"preview-{uuid.uuid4().hex}"
    activities = acts.all() + PreviewActivities(repo, sandboxes).all()
    async with build_worker(temporal_client, load_settings(), activities, task_queue=task_queue):
        async with running_api(
            tmp_path_factory.mktemp("preview-api"),
            token=secrets.token_urlsafe(16),
            TEMPORAL_ADDRESS=temporal_address(temporal_env),
            GENLOOP_TEMPORAL_TASK_QUEUE=task_queue,
            GENLOOP_DATABASE_URL=migrated_db_url,
            GENLOOP_API_PORT=str(api_port),
            GENLOOP_PREVIEW_IDLE_PAUSE_S=str(IDLE_S),
            GENLOOP_PREVIEW_WAKE_HOLD_S="60",
        ) as api, api.client() as http:
            yield PreviewStack(api=api, http=http, repo=repo, client=temporal_client, sandboxes=sandboxes,
                               activities=acts, host=sandbox_host)


async def build(stack: PreviewStack, goal: str, project: str | None = None) -> dict:
    project = project or new_project()
    accepted = await stack.http.post(f"/v1/projects/{project}/builds", json={"goal": goal})
    assert accepted.status_code == 202, accepted.text
    build_id = accepted.json()["build_id"]

    async def ready() -> dict | None:
        body = (await stack.http.get(f"/v1/builds/{build_id}")).json()
        assert body["stage"] not in ("failed", "cancelled"), body
        return body if body["stage"] == "ready" else None

    return await wait_until(ready, f"build {build_id} to be ready", timeout=120)


async def preview_status(stack: PreviewStack, build_id: str) -> PreviewStatus:
    return await stack.client.get_workflow_handle(preview_workflow_id(build_id)).query(
        "status", result_type=PreviewStatus
    )


async def wait_state(stack: PreviewStack, build_id: str, state: str) -> dict:
    async def reached() -> dict | None:
        body = (await stack.http.get(f"/v1/builds/{build_id}")).json()
        return body if body["preview_state"] == state else None

    return await wait_until(reached, f"version {build_id} to be {state}", timeout=60)


async def test_each_version_has_a_stable_url_that_serves_its_app(preview_stack):
    stack = preview_stack
    project = new_project()
    v1 = await build(stack, "the first version", project)
    v2 = await build(stack, "the second version", project)
    assert v1["preview_url"].startswith(f"http://v1--{project.lower()}")
    assert v1["preview_url"] != v1["sandbox_preview_url"]
    assert v1["preview_state"] == "live" and v2["preview_url"].startswith("http://v2--")
    async with preview_client(timeout=10) as client:
        first, second = await asyncio.gather(client.get(v1["preview_url"]), client.get(v2["preview_url"]))
        assert "the first version" in first.text and "the second version" in second.text
        assert (await client.get(v1["preview_url"] + "/health")).text == "ok"
        unknown = await client.get(f"http://v9--{project.lower()}.localhost:{stack.api.url.rsplit(':', 1)[1]}/")
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
        # A version host never reaches an API route, and the API never forwards to a sandbox.
        api_route = await client.get(v1["preview_url"] + f"/v1/builds/{v1['build_id']}")
        assert api_route.status_code == 404 and v1["build_id"] not in api_route.text


def resumes(stack: PreviewStack, sandbox_id: str) -> int:
    """How many times the local host resumed this sandbox (its log says so each time)."""
    return stack.host.log_path.read_text(errors="replace").count(f"sandbox {sandbox_id} resumed")


async def assert_paused_on_the_host(stack: PreviewStack, sandbox_id: str, pid_ns: int) -> None:
    """The version's sandbox is really paused: state paused, 0 processes, its files on the host's disk."""
    info = await AsyncSandbox.get_info(sandbox_id, **stack.host.sdk_options())
    assert info.state == SandboxState.PAUSED
    assert processes_in(pid_ns) == []
    assert (stack.host.state_dir / sandbox_id / "files.tar").is_file()


async def test_idle_version_pauses_and_its_next_request_wakes_it(preview_stack):
    stack = preview_stack
    v = await build(stack, "asleep and awake again")
    async with preview_client(timeout=10) as client:
        awake = (await client.get(v["preview_url"])).text
    pid_ns = pid_namespace_of(stack.host, v["sandbox_id"])
    paused = await wait_state(stack, v["build_id"], "paused")
    assert paused["preview_url"] == v["preview_url"] and paused["sandbox_id"] == v["sandbox_id"]
    await assert_paused_on_the_host(stack, v["sandbox_id"], pid_ns)
    # The sweep lists paused sandboxes too, and keeps the one of a READY version.
    assert v["sandbox_id"] not in (await sweep_orphans(stack.sandboxes, stack.repo, stack.client)).killed
    before = await preview_status(stack, v["build_id"])
    async with preview_client(timeout=60) as client:
        page = await client.get(v["preview_url"])
    assert page.status_code == 200 and page.text == awake and "asleep and awake again" in page.text
    woken = (await stack.http.get(f"/v1/builds/{v['build_id']}")).json()
    assert woken["preview_state"] == "live" and woken["preview_woken_at"] > paused["preview_woken_at"]
    # Resumed, not served again: the same sandbox, with the files it had.
    assert woken["sandbox_id"] == v["sandbox_id"] and (await preview_status(stack, v["build_id"])).serve == before.serve
    assert resumes(stack, v["sandbox_id"]) == 1


async def test_concurrent_requests_to_a_paused_version_wake_it_once(preview_stack):
    stack = preview_stack
    v = await build(stack, "fifty at once")
    pid_ns = pid_namespace_of(stack.host, v["sandbox_id"])
    await wait_state(stack, v["build_id"], "paused")
    await assert_paused_on_the_host(stack, v["sandbox_id"], pid_ns)
    before = await preview_status(stack, v["build_id"])
    async with preview_client(timeout=60) as client:
        pages = await asyncio.gather(*(client.get(v["preview_url"]) for _ in range(50)))
    assert [p.status_code for p in pages] == [200] * 50, [p.text for p in pages if p.status_code != 200][:3]
    assert all("fifty at once" in p.text for p in pages)
    after = await preview_status(stack, v["build_id"])
    # Exactly one resume: the same sandbox, resumed once, never served again.
    assert after.state == "live" and after.serve == before.serve and after.sandbox_id == v["sandbox_id"]
    assert resumes(stack, v["sandbox_id"]) == 1
    assert await stack.sandboxes.find_for_build(v["build_id"]) == [v["sandbox_id"]]


async def test_a_sandbox_killed_behind_genloops_back_is_served_again(preview_stack):
    stack = preview_stack
    v = await build(stack, "killed and back")
    await stack.sandboxes.kill(v["sandbox_id"])
    async with preview_client(timeout=60) as client:
        page = await client.get(v["preview_url"])
    assert page.status_code == 200 and "killed and back" in page.text, stack.api.log()[-3000:]
    again = (await stack.http.get(f"/v1/builds/{v['build_id']}")).json()
    assert again["sandbox_id"] != v["sandbox_id"] and again["preview_state"] == "live"
    assert await stack.sandboxes.find_for_build(v["build_id"]) == [again["sandbox_id"]]


async def test_manual_pause_and_wake(preview_stack):
    stack = preview_stack
    v = await build(stack, "paused by hand")
    paused = await stack.http.post(f"/v1/builds/{v['build_id']}/preview/pause", json={})
    assert paused.status_code == 200 and paused.json()["state"] == "paused", paused.text
    woken = await stack.http.post(f"/v1/builds/{v['build_id']}/preview/wake", json={})
    assert woken.status_code == 200 and woken.json()["state"] == "live", woken.text
    async with preview_client(timeout=10) as client:
        assert "paused by hand" in (await client.get(v["preview_url"])).text


async def test_a_version_that_no_longer_starts_answers_503_with_its_debug_id(preview_stack):
    stack = preview_stack
    v = await build(stack, "breaks later")
    # Its stored Procfile now names a command that fails (as if a host change broke it).
    [procfile] = [f for f in await stack.repo.get_files(v["build_id"]) if f.path == "Procfile"]
    stored = await stack.repo.get_files(v["build_id"])
    contents = await stack.repo.get_blobs([f.digest for f in stored])
    broken_procfile = b"web: python3 -c 'raise SystemExit(3)'\n"
    files = [(f.path, broken_procfile if f.path == "Procfile" else contents[f.digest]) for f in stored]
    [broken] = [digest for path, digest, _ in await stack.repo.store_files(v["build_id"], files) if path == "Procfile"]
    assert procfile.digest != broken
    await stack.sandboxes.kill(v["sandbox_id"])
    async with preview_client(timeout=60) as client:
        first = await client.get(v["preview_url"], headers={"Accept": "text/html"})
        second = await client.get(v["preview_url"])
    assert first.status_code == 503 and "debug_id" not in first.text and "Quote" in first.text
    assert second.status_code == 503 and second.json()["error"]["debug_id"]
    assert second.headers["retry-after"]
    # No crash loop: the second request got the recorded failure, not another attempt.
    assert (await preview_status(stack, v["build_id"])).serve == 1
    assert (await stack.http.get(f"/v1/builds/{v['build_id']}")).json()["preview_state"] == "failed"


async def test_retention_removes_a_version_but_keeps_its_files(tmp_path, temporal_env, temporal_client, sandbox_host,
                                                             repo, migrated_db_url):
    api_port = free_port()
    sandboxes = SandboxClient(sandbox_config(sandbox_host))
    acts = BuildActivities(
        repo, sandboxes, {"template": TemplateRunner()}, health_deadline_s=20,
        version_url=lambda label: f"http://{label}.localhost:{api_port}",
        preview=PreviewPolicy(idle_pause_s=600, retention_s=4),
    )
    task_queue = f"retention-{uuid.uuid4().hex}"
    async with build_worker(temporal_client, load_settings(), acts.all() + PreviewActivities(repo, sandboxes).all(),
                            task_queue=task_queue), \
            running_api(tmp_path, token=None, TEMPORAL_ADDRESS=temporal_address(temporal_env),
                        GENLOOP_TEMPORAL_TASK_QUEUE=task_queue, GENLOOP_DATABASE_URL=migrated_db_url,
                        GENLOOP_API_PORT=str(api_port)) as api, api.client() as http:
        stack = PreviewStack(api=api, http=http, repo=repo, client=temporal_client, sandboxes=sandboxes,
                             activities=acts, host=sandbox_host)
        v = await build(stack, "kept for four seconds")
        await wait_state(stack, v["build_id"], "removed")
        async with preview_client(timeout=10) as client:
            gone = await client.get(v["preview_url"], headers={"Accept": "text/html"})
            as_json = await client.get(v["preview_url"])
        assert gone.status_code == 410 and "no longer served" in gone.text
        assert as_json.status_code == 410 and as_json.json()["error"]["code"] == "gone"
        assert await sandboxes.find_for_build(v["build_id"]) == []
        files = (await http.get(f"/v1/builds/{v['build_id']}/files")).json()["files"]
        assert {f["path"] for f in files} >= {"app.py", "Procfile"}
        wake = await http.post(f"/v1/builds/{v['build_id']}/preview/wake", json={})
        assert wake.status_code == 409
