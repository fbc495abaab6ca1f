"""The API under test runs as a real process (`python -m api`) against the real stack: the Temporal
dev server, the sandbox host, a migrated database and a worker running in this test process on a
task queue of its own."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from activities.build import BuildActivities
from activities.runners import TemplateRunner
from activities.sandbox import SandboxClient
from genloop.cli.worker import build_worker
from genloop.settings import load_settings
from persistence.repository import JobRepository
from sandbox_host.testing import free_port
from tests.helpers import doubles
from tests.workflows.conftest import sandbox_config

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
SLOW_MARKER = "[slow]"
# Most of the API is backend-independent; only tests that exercise the database paths run on both.
SQLITE_ONLY = pytest.mark.parametrize("db_factory", ["sqlite"], indirect=True)


class SlowOnRequestRunnerDouble:
    """The template runner, except that goals containing SLOW_MARKER sit in CODE for a minute, so a
    cancel through the API lands mid-build. (The API only offers the "template" runner.)"""

    capabilities = TemplateRunner.capabilities

    def __init__(self) -> None:
        self._fast = TemplateRunner()
        self._slow = doubles.SlowRunnerDouble(seconds=60)

    async def run(self, task, progress):
        return await (self._slow if SLOW_MARKER in task.goal else self._fast).run(task, progress)


@dataclass
class Worker:
    task_queue: str
    repo: JobRepository
    sandboxes: SandboxClient


@pytest.fixture(scope="session")
async def worker(temporal_client, sandbox_host, repo) -> AsyncIterator[Worker]:  # noqa: F811
    sandboxes = SandboxClient(sandbox_config(sandbox_host))
    acts = BuildActivities(repo, sandboxes, {"template": SlowOnRequestRunnerDouble()}, health_deadline_s=20)
    task_queue = f"api-{uuid.uuid4().hex}"
    async with build_worker(temporal_client, load_settings(), acts.all(), task_queue=task_queue):
        yield Worker(task_queue=task_queue, repo=repo, sandboxes=sandboxes)


@dataclass
class ApiServer:
    url: str
    token: str | None
    log_path: Path
    process: asyncio.subprocess.Process

    def client(self, *, anonymous: bool = False, token: str | None = None, **kwargs) -> httpx.AsyncClient:
        """Sends the server's token unless `anonymous`, or `token` when given."""
        token = None if anonymous else (token or self.token)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=kwargs.pop("timeout", 30), **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def api_env(**settings: str) -> dict[str, str]:
    """The environment of an API process: this one's, minus any genloop/Temporal configuration."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENLOOP_", "TEMPORAL_", "E2B_"))}
    env.update(settings)
    return env


@contextlib.asynccontextmanager
async def running_api(tmp_dir: Path, *, token: str | None, **settings: str) -> AsyncIterator[ApiServer]:
    port = int(settings.pop("GENLOOP_API_PORT", 0)) or free_port()
    env = api_env(GENLOOP_API_HOST="127.0.0.1", GENLOOP_API_PORT=str(port), GENLOOP_DATA_DIR=str(tmp_dir), **settings)
    if token:
        env["GENLOOP_API_TOKEN"] = token
    log_path = tmp_dir / f"api-{port}.log"
    with open(log_path, "wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "api", cwd=REPO_ROOT, env=env, stdout=log, stderr=log
        )
    server = ApiServer(url=f"http://127.0.0.1:{port}", token=token, log_path=log_path, process=process)
    try:
        await _wait_ready(server)
        yield server
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                process.kill()
                await process.wait()


async def _wait_ready(server: ApiServer) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline and server.process.returncode is None:
            with contextlib.suppress(httpx.TransportError):
                await http.get(f"{server.url}/healthz", timeout=5)  # 200 or 503: it serves
                return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"the API did not start (exit code {server.process.returncode}):\n{server.log()[-3000:]}")


def temporal_address(temporal_env) -> str:  # noqa: F811
    return temporal_env.client.service_client.config.target_host


@pytest.fixture(scope="session")
async def api(  # noqa: F811
    tmp_path_factory, temporal_env, worker, migrated_db_url, sandbox_host
) -> AsyncIterator[ApiServer]:
    """The API with authentication on, wired to the session's worker, database and sandbox host
    (which `logs?follow=app` reads the running app's output from)."""
    async with running_api(
        tmp_path_factory.mktemp("api"),
        token=secrets.token_urlsafe(24),
        TEMPORAL_ADDRESS=temporal_address(temporal_env),
        GENLOOP_TEMPORAL_TASK_QUEUE=worker.task_queue,
        GENLOOP_DATABASE_URL=migrated_db_url,
        GENLOOP_SANDBOX_API_URL=sandbox_host.url,
        GENLOOP_SANDBOX_API_KEY=sandbox_host.api_key,
    ) as server:
        yield server


@pytest.fixture
async def http(api: ApiServer) -> AsyncIterator[httpx.AsyncClient]:
    async with api.client() as client:
        yield client


def new_project() -> str:
    return f"p-{uuid.uuid4().hex[:12]}"
