"""A project is a line of versions, through the API process: file edits, change requests (a model
behind a fake server over real HTTP), restores, changes sent back to back, a failing change in the
middle, bad requests answered 4xx with nothing recorded, files and diffs. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from activities.build import BuildActivities
from activities.runners import TemplateRunner
from activities.runners.llm import LLMRunner
from activities.sandbox import SandboxClient
from genloop.cli.worker import build_worker
from genloop.http import preview_client
from genloop.settings import load_settings
from persistence.repository import JobRepository
from tests.api.conftest import ApiServer, new_project, running_api, temporal_address
from tests.helpers.fake_models import FAKE_KEY, FakeModelServer, FakeOpenAIServer, edit_file, error, slow
from tests.reliability.harness import wait_until
from tests.workflows.conftest import sandbox_config

APP_HEADING = "<h1>Your app</h1>"


@dataclass
class LoopStack:
    api: ApiServer
    http: httpx.AsyncClient
    model: FakeModelServer
    repo: JobRepository


@pytest.fixture(scope="session")
async def loop_stack(tmp_path_factory, temporal_env, temporal_client, sandbox_host, repo, migrated_db_url
                     ) -> AsyncIterator[LoopStack]:
    """An API offering the template and llm runners; a worker whose llm runner talks to a fake model."""
    async with FakeOpenAIServer(api_key=FAKE_KEY) as model:
        runners = {
            "template": TemplateRunner(),
            "llm": LLMRunner.for_endpoint(provider="openai", base_url=model.base_url, api_key=FAKE_KEY,
                                          model="fake-model"),
        }
        acts = BuildActivities(repo, SandboxClient(sandbox_config(sandbox_host)), runners, health_deadline_s=20)
        task_queue = f"loop-{uuid.uuid4().hex}"
        async with build_worker(temporal_client, load_settings(), acts.all(), task_queue=task_queue):
            async with running_api(
                tmp_path_factory.mktemp("loop-api"),
                token=secrets.token_urlsafe(16),
                TEMPORAL_ADDRESS=temporal_address(temporal_env),
                GENLOOP_TEMPORAL_TASK_QUEUE=task_queue,
                GENLOOP_DATABASE_URL=migrated_db_url,
                GENLOOP_RUNNER_LLM_BASE_URL=model.base_url,  # offers the llm runner; the worker holds the real one
            ) as api, api.client() as http:
                yield LoopStack(api=api, http=http, model=model, repo=repo)


async def post(stack: LoopStack, project: str, body: dict, *, status: int = 202, **headers: str) -> dict:
    response = await stack.http.post(f"/v1/projects/{project}/builds", json=body, headers=headers)
    assert response.status_code == status, response.text
    return response.json()


async def wait_done(stack: LoopStack, build_id: str) -> dict:
    async def finished() -> dict | None:
        build = (await stack.http.get(f"/v1/builds/{build_id}")).json()
        return build if build["stage"] in ("ready", "failed", "cancelled") else None

    return await wait_until(finished, f"build {build_id} to finish", timeout=120, interval=0.2)


async def new_app(stack: LoopStack, project: str, goal: str = "a guestbook") -> dict:
    accepted = await post(stack, project, {"goal": goal})
    build = await wait_done(stack, accepted["build_id"])
    assert build["stage"] == "ready", build
    return build


async def app_py(stack: LoopStack, build_id: str) -> str:
    response = await stack.http.get(f"/v1/builds/{build_id}/files/app.py")
    assert response.status_code == 200, response.text
    return response.text


async def test_edits_make_the_next_version_and_both_previews_serve(loop_stack):
    stack, project = loop_stack, new_project()
    v1 = await new_app(stack, project)
    source = await app_py(stack, v1["build_id"])
    accepted = await post(stack, project, {"edits": [
        {"path": "app.py", "content": source.replace(APP_HEADING, "<h1>Version two</h1>")},
        {"path": "notes/todo.md", "content": "- ship it\n"},
        {"path": ".env.example", "delete": True},
    ]})
    v2 = await wait_done(stack, accepted["build_id"])
    assert v2["stage"] == "ready" and v2["build_version"] == "build_v0_2", v2
    assert v2["lineage"] == {
        "kind": "change", "base_build_id": v1["build_id"], "base_version": "build_v0_1", "change": None,
        "edited_paths": [{"path": "app.py", "op": "write"}, {"path": "notes/todo.md", "op": "write"},
                         {"path": ".env.example", "op": "delete"}],
        "note": None,
    }
    assert v2["preview_url"] != v1["preview_url"]
    async with preview_client(timeout=10) as client:
        first, second = await asyncio.gather(client.get(v1["preview_url"]), client.get(v2["preview_url"]))
    assert APP_HEADING in first.text and "Version two" not in first.text
    assert "<h1>Version two</h1>" in second.text

    files = {f["path"]: f for f in (await stack.http.get(f"/v1/builds/{v2['build_id']}/files")).json()["files"]}
    assert set(files) == {"app.py", "Procfile", "README.md", "notes/todo.md"}
    assert (await stack.http.get(f"/v1/builds/{v2['build_id']}/files/notes/todo.md")).text == "- ship it\n"
    missing = await stack.http.get(f"/v1/builds/{v2['build_id']}/files/.env.example")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    diff = await stack.http.get(f"/v1/builds/{v2['build_id']}/diff")
    assert diff.status_code == 200 and diff.headers["content-type"].startswith("text/x-diff")
    lines = diff.text.splitlines()
    assert any(line.startswith("-") and APP_HEADING in line for line in lines), diff.text
    assert any(line.startswith("+") and "<h1>Version two</h1>" in line for line in lines), diff.text
    assert "+++ b/notes/todo.md" in diff.text and "--- a/.env.example" in diff.text and "+++ /dev/null" in diff.text
    back = await stack.http.get(f"/v1/builds/{v1['build_id']}/diff", params={"against": "build_v0_2"})
    assert "+++ b/.env.example" in back.text

    view = (await stack.http.get(f"/v1/projects/{project}")).json()
    assert [v["build_version"] for v in view["versions"]] == ["build_v0_1", "build_v0_2"]
    assert view["newest_ready"]["build_id"] == v2["build_id"] and view["pending"] == []
    # The base is untouched: its row, files and preview.
    again = (await stack.http.get(f"/v1/builds/{v1['build_id']}")).json()
    assert again["stage"] == "ready" and again["preview_url"] == v1["preview_url"]
    assert await app_py(stack, v1["build_id"]) == source


async def test_a_change_is_written_by_the_model_on_the_base_files(loop_stack):
    stack, project = loop_stack, new_project()
    v1 = await new_app(stack, project, "a page about red things")
    stack.model.reset()
    stack.model.script(edit_file("app.py", APP_HEADING, "<h1 style='color:red'>Your app</h1>"))
    accepted = await post(stack, project, {"change": "make the heading red", "runner": "llm"})
    v2 = await wait_done(stack, accepted["build_id"])
    assert v2["stage"] == "ready", v2
    assert v2["lineage"]["change"] == "make the heading red" and v2["lineage"]["base_version"] == "build_v0_1"
    assert v2["usage"]["calls"] == 1 and v2["usage"]["model"] == "fake-model"
    async with preview_client(timeout=10) as client:
        assert "color:red" in (await client.get(v2["preview_url"])).text
    [request] = stack.model.requests
    prompt = " ".join(request.texts())
    assert "make the heading red" in prompt and APP_HEADING in prompt and "a page about red things" in prompt
    assert v1["build_id"] != v2["build_id"]


async def test_changes_sent_back_to_back_build_in_order(loop_stack):
    stack, project = loop_stack, new_project()
    await new_app(stack, project)
    sent = [await post(stack, project, {"edits": [{"path": f"step{i}.txt", "content": f"{i}\n"}]}) for i in (1, 2, 3)]
    builds = [await wait_done(stack, s["build_id"]) for s in sent]
    assert [b["build_version"] for b in builds] == ["build_v0_2", "build_v0_3", "build_v0_4"], builds
    for i, build in enumerate(builds, start=1):
        listed = {f["path"] for f in (await stack.http.get(f"/v1/builds/{build['build_id']}/files")).json()["files"]}
        assert {f"step{n}.txt" for n in range(1, i + 1)} <= listed and f"step{i + 1}.txt" not in listed
    assert [b["lineage"]["base_build_id"] for b in builds[1:]] == [b["build_id"] for b in builds[:2]]


async def test_a_failing_change_in_the_middle_is_skipped_with_a_note(loop_stack):
    stack, project = loop_stack, new_project()
    await new_app(stack, project)
    first = await post(stack, project, {"edits": [{"path": "first.txt", "content": "1\n"}]})
    broken = await post(stack, project, {"edits": [{"path": "Procfile", "content": "web: python3 missing.py\n"}]})
    third = await post(stack, project, {"edits": [{"path": "third.txt", "content": "3\n"}]})
    first_b, broken_b, third_b = [await wait_done(stack, b["build_id"]) for b in (first, broken, third)]
    assert (first_b["stage"], broken_b["stage"], third_b["stage"]) == ("ready", "failed", "ready")
    assert broken_b["debug_id"] and broken_b["error_message"]
    assert third_b["lineage"]["base_build_id"] == first_b["build_id"]
    assert broken_b["build_id"] in third_b["lineage"]["note"]
    listed = {f["path"] for f in (await stack.http.get(f"/v1/builds/{third_b['build_id']}/files")).json()["files"]}
    assert "first.txt" in listed and "third.txt" in listed
    procfile = await stack.http.get(f"/v1/builds/{third_b['build_id']}/files/Procfile")
    assert procfile.text == "web: python3 app.py\n"
    # A broken version (FAILED after CODE) still has files, so it can be repaired by hand.
    repaired = await post(stack, project, {"base": broken_b["build_id"],
                                           "edits": [{"path": "Procfile", "content": "web: python3 app.py\n"}]})
    assert (await wait_done(stack, repaired["build_id"]))["stage"] == "ready"


async def test_restore_makes_a_version_with_exactly_the_base_files(loop_stack):
    stack, project = loop_stack, new_project()
    v1 = await new_app(stack, project)
    edit = {"edits": [{"path": "x.txt", "content": "x"}]}
    v2 = await wait_done(stack, (await post(stack, project, edit))["build_id"])
    v3 = await wait_done(stack, (await post(stack, project, {"base": "build_v0_1"}))["build_id"])
    assert v3["stage"] == "ready" and v3["build_version"] == "build_v0_3" and v2["stage"] == "ready"
    listing = lambda b: stack.http.get(f"/v1/builds/{b['build_id']}/files")  # noqa: E731
    assert (await listing(v3)).json()["files"] == (await listing(v1)).json()["files"]
    assert (await stack.http.get(f"/v1/builds/{v3['build_id']}/diff")).text == ""


async def test_bad_requests_are_4xx_and_record_nothing(loop_stack):
    stack, project = loop_stack, new_project()
    # Nothing to change yet.
    nothing = await post(stack, project, {"edits": [{"path": "a.txt", "content": "a"}]}, status=409)
    assert "start it with a goal" in nothing["error"]["message"]
    v1 = await new_app(stack, project)
    other = await new_app(stack, new_project())
    failed_project = new_project()
    stack.model.reset()
    stack.model.script(error(401))
    no_files = await wait_done(
        stack, (await post(stack, failed_project, {"goal": "fails in CODE", "runner": "llm"}))["build_id"]
    )
    assert no_files["stage"] == "failed"
    before = len(await stack.repo.project_builds(project))
    cases = [
        ({"change": "make it blue"}, 422, "cannot apply a free-text change"),  # the template runner
        ({"base": "build_v0_9"}, 404, "not a build or version"),
        ({"base": other["build_id"]}, 404, "not a build or version"),
        ({"goal": "x", "base": "build_v0_1"}, 422, "unknown field"),
        ({"runner": "template"}, 422, "exactly one of"),
        ({}, 422, "exactly one of"),
        ({"edits": []}, 422, "edits"),
        ({"edits": [{"path": "../escape.py", "content": "x"}]}, 422, "escapes the workspace"),
        ({"edits": [{"path": "/etc/passwd", "content": "x"}]}, 422, "absolute"),
        ({"edits": [{"path": "a.py", "content": "x"}, {"path": "./a.py", "content": "y"}]}, 422, "appears twice"),
        ({"edits": [{"path": "a.py", "content": "x", "delete": True}]}, 422, "exactly one of"),
        ({"edits": [{"path": "nope.py", "delete": True}], "base": "build_v0_1"}, 422, "cannot delete"),
        ({"change": "x", "stack": "node"}, 422, "unknown field"),
    ]
    for body, status, needle in cases:
        answer = await post(stack, project, body, status=status)
        assert needle in answer["error"]["message"], (body, answer)
    base_without_files = await stack.http.post(
        f"/v1/projects/{failed_project}/builds", json={"base": no_files["build_id"]}
    )
    assert base_without_files.status_code == 409 and "no files" in base_without_files.json()["error"]["message"]
    assert len(await stack.repo.project_builds(project)) == before
    assert len(await stack.repo.project_builds(failed_project)) == 1
    assert v1["stage"] == "ready"


async def test_idempotency_key_for_changes(loop_stack):
    stack, project = loop_stack, new_project()
    await new_app(stack, project)
    body = {"edits": [{"path": "once.txt", "content": "once"}]}
    first = await post(stack, project, body, **{"Idempotency-Key": "edit-1"})
    second = await post(stack, project, body, **{"Idempotency-Key": "edit-1"})
    assert first["build_id"] == second["build_id"]
    await post(
        stack,
        project,
        {"edits": [{"path": "once.txt", "content": "twice"}]},
        status=409,
        **{"Idempotency-Key": "edit-1"},
    )
    assert (await wait_done(stack, first["build_id"]))["stage"] == "ready"
    assert len([b for b in await stack.repo.project_builds(project) if b.kind == "change"]) == 1


async def test_a_waiting_change_can_be_cancelled(loop_stack):
    stack, project = loop_stack, new_project()
    await new_app(stack, project)
    stack.model.reset()
    stack.model.script(slow(edit_file("app.py", APP_HEADING, "<h1>slow</h1>"), stall_s=3))
    running = await post(stack, project, {"change": "a slow change", "runner": "llm"})
    waiting = await post(stack, project, {"edits": [{"path": "never.txt", "content": "x"}]})
    last = await post(stack, project, {"edits": [{"path": "last.txt", "content": "x"}]})
    view = (await stack.http.get(f"/v1/projects/{project}")).json()
    assert waiting["build_id"] in view["pending"]
    cancelled = await stack.http.post(f"/v1/builds/{waiting['build_id']}/cancel", json={"reason": "not needed"})
    assert cancelled.status_code == 202, cancelled.text
    assert (await wait_done(stack, waiting["build_id"]))["stage"] == "cancelled"
    assert (await wait_done(stack, running["build_id"]))["stage"] == "ready"
    last_b = await wait_done(stack, last["build_id"])
    assert last_b["stage"] == "ready" and last_b["lineage"]["base_build_id"] == running["build_id"]
