"""Record the golden histories replayed by tests/workflows/test_replay.py.

    .venv/bin/python -m tests.histories.record            # the histories not recorded yet
    .venv/bin/python -m tests.histories.record NAME ...   # these (overwrites them)

Runs builds on a fresh dev server, local sandbox host and SQLite database, and exports each history
with `temporal workflow show --output json`: a ready, a failed and a cancelled build (session 1), a
build repaired by the fix loop with a fake model (build_fixed), a project's line of changes
(project_changes, with its child build_change), a version's preview lifecycle, and a build whose
sandbox host is lost and which moves to another (build_host_failover); build_deferred and
build_fixed_deferred have CODE/DEPS/CHECKS recorded by their activities (transitions_in_activities);
build_one_start_write has STARTING and SCAFFOLD in one write (ONE_START_WRITE_PATCH), build_start_scaffolds
also SCAFFOLD's work in that write's local activity (START_SCAFFOLDS_PATCH). Never re-record an existing
history for a workflow change: old histories must keep replaying (patch the change instead).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path

from temporalio import activity
from temporalio.client import WithStartWorkflowOperation, WorkflowFailureError
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from activities.build import BuildActivities
from activities.runners.llm import LLMRunner
from activities.sandbox import close_sdk_transports
from genloop.devserver import temporal_binary
from migrations.apply import upgrade
from persistence.repository import JobRepository
from sandbox_host.testing import running_host
from tests.helpers.fake_models import FAKE_KEY, FakeOpenAIServer, write_files
from tests.workflows.conftest import make_stack
from workflows.build import SEARCH_ATTRIBUTES
from workflows.project import ProjectWorkflow
from workflows.types import (
    STATUS_QUERY,
    BuildStatus,
    CancelRequest,
    ChangeRequest,
    FileEdit,
    PreviewPolicy,
    PreviewStatus,
    ProjectInput,
    SandboxInfo,
    SandboxInput,
    WakeRequest,
    WakeResult,
    preview_workflow_id,
    project_workflow_id,
)

HERE = Path(__file__).parent


SCENARIOS = ("build_ready", "build_failed", "build_cancelled", "build_fixed", "build_change", "project_changes",
             "preview_lifecycle", "build_host_failover", "build_deferred", "build_fixed_deferred",
             "build_one_start_write", "build_start_scaffolds")


class LostHostOnceActivities(BuildActivities):
    """Fault injection: a build's first sandbox reports the queue of a host nobody polls (its machine
    is gone), so the build's next sandbox activity times out waiting to start and the build moves."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._moved: set[str] = set()

    @activity.defn(name="provision_sandbox")
    async def provision_sandbox(self, inp: SandboxInput) -> SandboxInfo:
        info = await super().provision_sandbox(inp)
        if inp.build_id == "build_host_failover" and inp.build_id not in self._moved:
            self._moved.add(inp.build_id)
            info.task_queue, info.host = f"{activity.info().task_queue}@gone", "gone"
        return info


async def main(names: list[str]) -> None:
    wanted = names or [n for n in SCENARIOS if not (HERE / f"{n}.json").exists()]
    if not wanted:
        print("every history is recorded; name one to record it again")
        return
    work = Path(tempfile.mkdtemp(prefix="genloop-record-"))
    url = f"sqlite+aiosqlite:///{work}/genloop.db"
    await upgrade(url)
    repo = JobRepository.from_url(url)
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(), search_attributes=SEARCH_ATTRIBUTES
    )
    target = env.client.service_client.config.target_host
    try:
        async with FakeOpenAIServer(api_key=FAKE_KEY) as model, running_host(work / "host") as host:
            llm = LLMRunner.for_endpoint(provider="openai", base_url=model.base_url, api_key=FAKE_KEY, model="fake")
            async with make_stack(env.client, host, repo, activities_cls=LostHostOnceActivities,
                                  extra_runners={"llm": llm}, fix_attempts=1,
                                  version_url=lambda label: f"http://{label}.localhost:1",
                                  preview=PreviewPolicy(idle_pause_s=1)) as stack:
                await _run_scenarios(stack, model, wanted)
                for wf_id in wanted:
                    out = subprocess.run(
                        [temporal_binary(), "workflow", "show", "-w", _workflow_id(wf_id), "--address", target,
                         "--output", "json"],
                        check=True, capture_output=True, text=True,
                    ).stdout
                    (HERE / f"{wf_id}.json").write_text(out)
                    print(f"recorded {wf_id}.json ({len(out)} bytes)")
                for sandbox in await stack.sandboxes.list():
                    await stack.sandboxes.kill(sandbox.sandbox_id)
    finally:
        await close_sdk_transports()
        await repo.aclose()
        await env.shutdown()


def _workflow_id(name: str) -> str:
    if name == "preview_lifecycle":
        return preview_workflow_id("build_preview")
    return project_workflow_id("recorded") if name == "project_changes" else name


async def _run_scenarios(stack, model, wanted: list[str]) -> None:
    if "build_ready" in wanted:
        await (await stack.start("a todo list for cats", build_id="build_ready")).result()
    if "build_failed" in wanted:
        try:
            await (await stack.start(runner="crashing", build_id="build_failed")).result()
        except WorkflowFailureError:
            pass
    if "build_cancelled" in wanted:
        cancelled = await stack.start(runner="slow", build_id="build_cancelled")
        while (await cancelled.query(STATUS_QUERY, result_type=BuildStatus)).stage != "code":
            await asyncio.sleep(0.1)
        await cancelled.signal("cancel", CancelRequest(reason="recorded cancel"))
        await cancelled.result()
    for name in ("build_fixed", "build_fixed_deferred"):
        if name in wanted:
            model.script(
                write_files({"app.py": "raise SystemExit('boom')\n", "Procfile": "web: python3 app.py\n"}),
                write_files({"app.py": _APP}),
            )
            await (await stack.start("fixed on attempt two", runner="llm", build_id=name)).result()
    if "build_deferred" in wanted:
        await (await stack.start("stages recorded by their activities", build_id="build_deferred")).result()
    if "build_one_start_write" in wanted:
        await (await stack.start("starting and scaffold in one write", build_id="build_one_start_write")).result()
    if "build_start_scaffolds" in wanted:
        await (await stack.start("scaffolded in the first write", build_id="build_start_scaffolds")).result()
    if "build_change" in wanted or "project_changes" in wanted:
        project = "recorded"
        await (await stack.start("the line's first version", project_id=project, build_id="build_base")).result()
        await repo_job_ready(stack, "build_base")
        for build_id, path in (("build_change", "added.txt"), ("build_change_2", "second.txt")):
            digest = (await stack.repo.put_blobs([b"added by a change\n"]))[0]
            await stack.repo.create_job(build_id, project, "", kind="change", runner="template")
            await stack.client.execute_update_with_start_workflow(
                ProjectWorkflow.submit,
                ChangeRequest(build_id=build_id, edits=[FileEdit(path=path, digest=digest)]),
                start_workflow_operation=WithStartWorkflowOperation(
                    ProjectWorkflow.run, ProjectInput(project_id=project, task_queue=stack.task_queue),
                    id=project_workflow_id(project), task_queue=stack.task_queue,
                    id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                ),
                id=build_id,
            )
        while True:  # the project workflow starts the second child once the first has finished
            try:
                await stack.client.get_workflow_handle("build_change_2").result()
                break
            except RPCError:
                await asyncio.sleep(0.2)


    if "build_host_failover" in wanted:
        await (await stack.start("moved to another host", build_id="build_host_failover")).result()
    if "preview_lifecycle" in wanted:
        await (await stack.start("served, paused and woken", build_id="build_preview")).result()
        preview = stack.client.get_workflow_handle(preview_workflow_id("build_preview"))
        while (await preview.query("status", result_type=PreviewStatus)).state != "paused":
            await asyncio.sleep(0.2)
        await preview.execute_update("wake", WakeRequest(), result_type=WakeResult)


async def repo_job_ready(stack, build_id: str) -> None:
    job = await stack.repo.get(build_id)
    assert job is not None and job.status == "ready", job


_APP = """import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")

ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), H).serve_forever()
"""


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
