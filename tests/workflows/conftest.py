from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from temporalio.client import Client, WorkflowHandle

from activities.build import BuildActivities
from activities.preview import PreviewActivities
from activities.runners import TemplateRunner
from activities.sandbox import SandboxClient, SandboxConfig
from genloop.cli.worker import build_worker
from genloop.settings import load_settings
from persistence.repository import JobRepository
from tests.helpers import doubles
from workflows.types import WORKFLOW_NAME, BuildRequest, BuildResult


@dataclass
class BuildStack:
    """One worker on its own task queue, over the shared dev server, sandbox host and a database."""

    client: Client
    repo: JobRepository
    sandboxes: SandboxClient
    task_queue: str
    runners: dict[str, Any] = field(default_factory=dict)

    async def start(self, goal: str = "a todo list for cats", *, project_id: str | None = None,
                    runner: str = "template", build_id: str | None = None, stack: str = "python") -> WorkflowHandle:
        build_id = build_id or f"b-{uuid.uuid4().hex[:12]}"
        req = BuildRequest(build_id=build_id, project_id=project_id or f"p-{uuid.uuid4().hex[:8]}", goal=goal,
                           runner=runner, stack=stack)
        return await self.client.start_workflow(
            WORKFLOW_NAME, req, id=build_id, task_queue=self.task_queue, result_type=BuildResult
        )


@pytest.fixture
async def build_stack(temporal_client, sandbox_host, repo) -> AsyncIterator[BuildStack]:
    async with make_stack(temporal_client, sandbox_host, repo) as stack:
        yield stack


def sandbox_config(host) -> SandboxConfig:
    return SandboxConfig(api_key=host.api_key, api_url=host.url, template="base", timeout_s=3600)


@contextlib.asynccontextmanager
async def make_stack(client, host, repo, *, sandbox_client_cls=SandboxClient, activities_cls=BuildActivities,
                     health_deadline_s: float = 20,
                     extra_runners: dict[str, Any] | None = None, fix_attempts: int = 0, token_budget: int = 0,
                     **activity_options: Any):
    runners: dict[str, Any] = {
        "template": TemplateRunner(),
        "rate-limited": doubles.RateLimitedRunnerDouble(failures=2),
        "crashing": doubles.CrashingRunnerDouble(),
        "broken-app": doubles.BrokenAppRunnerDouble(),
        "traversal": doubles.TraversalRunnerDouble(),
        "slow": doubles.SlowRunnerDouble(),
        "slow-start": doubles.SlowStartRunnerDouble(),
        "with-dependency": doubles.DependencyRunnerDouble(),
        **(extra_runners or {}),
    }
    sandboxes = sandbox_client_cls(sandbox_config(host))
    acts = activities_cls(repo, sandboxes, runners, health_deadline_s=health_deadline_s, fix_attempts=fix_attempts,
                           token_budget=token_budget, **activity_options)
    task_queue = f"tq-{uuid.uuid4().hex}"
    worker = build_worker(client, load_settings(), acts.all() + PreviewActivities(repo, sandboxes).all(),
                          task_queue=task_queue)
    async with worker:
        yield BuildStack(client=client, repo=repo, sandboxes=sandboxes, task_queue=task_queue, runners=runners)

