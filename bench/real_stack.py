"""The real stack for the time-to-preview and concurrency benchmarks, all started here and torn down
afterwards: a file-backed dev server (the stack's flags, or a common.MODES entry), a sandbox host
subprocess, a migrated SQLite database, and a worker in this process running the real
BuildActivities (TemplateRunner, the e2b SDK's SandboxClient against the host)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from temporalio.client import Client, WorkflowHandle

from activities.build import BuildActivities
from activities.runners import TemplateRunner
from activities.sandbox import SandboxClient, SandboxConfig, close_sdk_transports
from bench import common
from sandbox_host.testing import RunningHost, running_host
from workflows.build import BuildWorkflow
from workflows.types import WORKFLOW_NAME, BuildRequest, BuildResult

STAGES = ("starting", "scaffold", "code", "deps", "checks", "ready")


@dataclass
class RealStack:
    client: Client
    host: RunningHost
    repo: Any
    sandboxes: SandboxClient
    task_queue: str
    dev_server_pid: int | None

    async def start(self, goal: str = "a todo list for cats", runner: str = "template") -> tuple[str, WorkflowHandle]:
        build_id = f"b-{uuid.uuid4().hex[:12]}"
        req = BuildRequest(build_id=build_id, project_id=f"p-{uuid.uuid4().hex[:6]}", goal=goal, runner=runner)
        handle = await self.client.start_workflow(
            WORKFLOW_NAME, req, id=build_id, task_queue=self.task_queue, result_type=BuildResult
        )
        return build_id, handle

    async def stage_times(self, build_id: str) -> dict[str, datetime]:
        """When each stage was first entered, from the persisted transitions (workflow.now() of the
        workflow task that entered it)."""
        out: dict[str, datetime] = {}
        for stage, at in await self.transitions(build_id):
            out.setdefault(stage, at)
        return out

    async def transitions(self, build_id: str) -> list[tuple[str, datetime]]:
        """Every stage entered, in order (a fix attempt enters CODE, DEPS and CHECKS again)."""
        return [
            (
                t.stage.value if hasattr(t.stage, "value") else str(t.stage),
                t.at if t.at.tzinfo else t.at.replace(tzinfo=UTC),
            )
            for t in await self.repo.list_transitions(build_id)
        ]


@contextlib.asynccontextmanager
async def real_stack(
    prefix: str,
    *,
    max_sandboxes: int = 50,
    activities_cls: type = BuildActivities,
    dev_server_mode: str = common.STACK_MODE,
    runners: dict[str, Any] | None = None,
    fix_attempts: int = 0,
    **worker_overrides: Any,
) -> AsyncIterator[RealStack]:
    async with common.temp_dir(prefix) as tmp:
        async with (
            common.dev_server(tmp, dev_server_mode) as env,
            running_host(tmp, max_sandboxes=max_sandboxes, default_timeout_s=600) as host,
            common.sqlite_repo(tmp) as repo,
        ):
            config = SandboxConfig(api_key=host.api_key, api_url=host.url, template="base", timeout_s=600)
            sandboxes = SandboxClient(config)
            acts = activities_cls(
                repo, sandboxes, {"template": TemplateRunner(), **(runners or {})}, fix_attempts=fix_attempts
            )
            worker, task_queue = common.worker(env.client, [BuildWorkflow], acts.all(), **worker_overrides)
            try:
                async with worker:
                    yield RealStack(env.client, host, repo, sandboxes, task_queue, common.dev_server_pid())
            finally:
                with contextlib.suppress(Exception):
                    for sandbox in await sandboxes.list():
                        await sandboxes.kill(sandbox.sandbox_id)
                await close_sdk_transports()
