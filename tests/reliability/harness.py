"""The fault-injection suite's harness: worker processes, builds, polling with deadlines, a gate in
PostgreSQL that holds one stage's write, and the invariants every recovered build must satisfy.

Everything here is real: workers are `python -m ...` subprocesses killed with SIGKILL, databases are
real PostgreSQL databases, the Temporal dev server and the sandbox host are real processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import inspect
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import psutil
from sqlalchemy.engine import make_url
from temporalio.api.enums.v1 import PendingActivityState, TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client, WorkflowHandle

from activities.sandbox import SandboxClient, SandboxConfig
from persistence.repository import JobRepository
from workflows.types import STATUS_QUERY, WORKFLOW_NAME, BuildRequest, BuildResult, BuildStatus

REPO_ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ["queued", "starting", "scaffold", "code", "deps", "checks", "ready"]
WORKER_READY_TIMEOUT_S = 60.0



async def wait_until(
    predicate: Callable[[], Any], what: str, *, timeout: float = 60.0, interval: float = 0.1
) -> Any:
    """Poll `predicate` (sync or async) until it returns something truthy; return that. Raise
    TimeoutError naming `what` at the deadline. A deadline is a hang guard, not a speed assertion."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - keep polling; report the last error on timeout
            last_error = exc
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"timed out after {timeout:.0f}s waiting for {what}"
                + (f" (last error: {last_error!r})" if last_error else "")
            )
        await asyncio.sleep(interval)


def _die_with_parent() -> None:
    # In the child between fork and exec: SIGKILL it if the test process dies, so no worker outlives
    # an interrupted run.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class ServiceProcess:
    """A `python -m MODULE ARGS` subprocess with its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None

    async def spawn(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                cwd=REPO_ROOT,
                env=self.env,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def kill9(self) -> None:
        """SIGKILL, as a crash or the OOM killer would: no cleanup runs."""
        if self.alive:
            os.kill(self.pid, signal.SIGKILL)
            await self.proc.wait()

    async def stop(self, grace_s: float = 15.0) -> None:
        if not self.alive:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), grace_s)
        except TimeoutError:
            await self.kill9()

    def rss_bytes(self) -> int:
        return psutil.Process(self.pid).memory_info().rss

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


WORKFLOW_TASKS, ACTIVITY_TASKS = TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW, TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY
BOTH_KINDS = (WORKFLOW_TASKS, ACTIVITY_TASKS)


async def task_queue_pollers(client: Client, task_queue: str, kinds: tuple[int, ...] = BOTH_KINDS) -> set[str]:
    """Identities (`pid@host`) polling every one of `kinds` of `task_queue` (default: both sides)."""
    identities: list[set[str]] = []
    for kind in kinds:
        resp = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=client.namespace, task_queue=TaskQueue(name=task_queue), task_queue_type=kind
            )
        )
        identities.append({p.identity for p in resp.pollers})
    return set.intersection(*identities)


@dataclass
class Stack:
    """One test's slice of the system: a task queue, a database, a sandbox host, worker processes."""

    client: Client
    temporal_target: str
    database_url: str
    host: Any  # sandbox_host.testing.RunningHost
    work_dir: Path
    task_queue: str = field(default_factory=lambda: f"rel-{uuid.uuid4().hex}")
    workers: list[ServiceProcess] = field(default_factory=list)
    build_ids: list[str] = field(default_factory=list)
    repo: JobRepository = field(init=False)
    sandboxes: SandboxClient = field(init=False)

    def __post_init__(self) -> None:
        self.repo = JobRepository.from_url(self.database_url)
        self.sandboxes = SandboxClient(
            SandboxConfig(api_key=self.host.api_key, api_url=self.host.url, template="base", timeout_s=3600)
        )
        self.gate_dir.mkdir(parents=True, exist_ok=True)

    @property
    def gate_dir(self) -> Path:
        return self.work_dir / "gates"

    def service_env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            TEMPORAL_ADDRESS=self.temporal_target,
            GENLOOP_TEMPORAL_TASK_QUEUE=self.task_queue,
            GENLOOP_DATABASE_URL=self.database_url,
            GENLOOP_SANDBOX_API_URL=self.host.url,
            GENLOOP_SANDBOX_API_KEY=self.host.api_key,
            GENLOOP_WORKER_SWEEP_INTERVAL_S="0",
            GENLOOP_DATA_DIR=str(self.work_dir / "data"),
            GENLOOP_TEST_GATE_DIR=str(self.gate_dir),
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    async def start_worker(self, *, doubles: bool = True, only: str | None = None, **env: str) -> ServiceProcess:
        """A worker subprocess: `python -m genloop.cli worker [--only ...]`, or the same worker with
        the runner doubles registered (tests.reliability.worker_with_doubles). Returns once it polls."""
        module = ["tests.reliability.worker_with_doubles"] if doubles else ["genloop.cli", "worker"]
        argv = [sys.executable, "-m", *module, *(["--only", only] if only else [])]
        n = len(self.workers) + 1
        worker = ServiceProcess(f"worker-{n}", argv, self.service_env(**env), self.work_dir / f"worker-{n}.log")
        self.workers.append(worker)
        await worker.spawn()

        async def polling() -> bool:
            if not worker.alive:
                raise AssertionError(f"worker exited with {worker.proc.returncode}:\n{worker.log_tail()}")
            kinds = {"workflows": (WORKFLOW_TASKS,), "activities": (ACTIVITY_TASKS,)}.get(only or "", BOTH_KINDS)
            pollers = await task_queue_pollers(self.client, self.task_queue, kinds)
            return any(i.startswith(f"{worker.pid}@") for i in pollers)

        await wait_until(polling, f"{worker.name} to poll {self.task_queue}", timeout=WORKER_READY_TIMEOUT_S)
        return worker

    async def start_build(
        self, runner: str = "template", *, project_id: str | None = None, goal: str = "a todo list for cats"
    ) -> WorkflowHandle:
        build_id = f"b-{uuid.uuid4().hex[:16]}"
        self.build_ids.append(build_id)
        req = BuildRequest(
            build_id=build_id, project_id=project_id or f"p-{uuid.uuid4().hex[:8]}", goal=goal, runner=runner
        )
        return await self.client.start_workflow(
            WORKFLOW_NAME, req, id=build_id, task_queue=self.task_queue, result_type=BuildResult
        )

    async def open_gate(self, handle: WorkflowHandle) -> None:
        """Let a GatedRunnerDouble waiting for this build go on."""
        (self.gate_dir / handle.id).touch()

    async def db_status(self, build_id: str) -> str | None:
        job = await self.repo.get(build_id)
        return job.status if job else None

    async def wait_activity_started(self, handle: WorkflowHandle, activity: str, timeout: float = 120) -> None:
        async def started() -> bool:
            return activity in await running_activities(handle)

        await wait_until(started, f"activity {activity} of {handle.id} to be running", timeout=timeout)

    async def wait_sandbox_file(self, build_id: str, path: str, timeout: float = 120) -> None:
        """Wait until `path` exists in the build's sandbox (a double's marker: its slow part began)."""

        async def exists() -> bool:
            job = await self.repo.get(build_id)
            if job is None or not job.sandbox_id:
                return False
            return await (await self.sandboxes.connect(job.sandbox_id)).files.exists(path)

        await wait_until(exists, f"{path} to exist in the sandbox of {build_id}", timeout=timeout)

    async def wait_in_stage(self, build_id: str, stage: str) -> None:
        """DEPS / CHECKS: wait until the slow part of the stage's double is under way in the sandbox."""
        from tests.helpers.doubles import LateBindingAppRunnerDouble, SlowInstallRunnerDouble

        marker = {"deps": SlowInstallRunnerDouble.MARKER, "checks": LateBindingAppRunnerDouble.MARKER}[stage]
        await self.wait_sandbox_file(build_id, marker)

    async def wait_db_status(self, build_id: str, status: str, timeout: float = 120) -> None:
        async def reached() -> bool:
            return await self.db_status(build_id) == status

        await wait_until(reached, f"build {build_id} to be {status} in the database", timeout=timeout)

    async def close(self) -> None:
        for worker in self.workers:
            await worker.kill9()
        for build_id in self.build_ids:
            with contextlib.suppress(Exception):
                await self.client.get_workflow_handle(build_id).terminate("test teardown")
            with contextlib.suppress(Exception):
                for sandbox_id in await self.sandboxes.find_for_build(build_id):
                    await self.sandboxes.kill(sandbox_id)
        await self.repo.aclose()

    def logs(self) -> str:
        return "\n".join(f"--- {w.name} ({w.log_path}) ---\n{w.log_tail()}" for w in self.workers)


async def running_activities(handle: WorkflowHandle) -> set[str]:
    """Names of the build's activities a worker is executing right now."""
    desc = await handle.describe()
    return {
        a.activity_type.name
        for a in desc.raw_description.pending_activities
        if a.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
    }


async def sandbox_processes(stack: Stack, sandbox_id: str) -> list[str]:
    """The command lines of the processes running in a sandbox (through the SDK)."""
    sandbox = await stack.sandboxes.connect(sandbox_id)
    return [" ".join([p.cmd, *p.args]) for p in await sandbox.commands.list()]


async def assert_recovered_ready(stack: Stack, handle: WorkflowHandle, result: BuildResult) -> None:
    """The invariants of a build that survived a fault: READY; exactly one sandbox, the one the
    result names; one build_version; every transition recorded once, in order; the job row agrees
    with the workflow."""
    assert result.status == "ready", result
    assert await stack.sandboxes.find_for_build(handle.id) == [result.sandbox_id]
    job = await stack.repo.get(handle.id)
    status = await handle.query(STATUS_QUERY, result_type=BuildStatus)
    assert [t.stage for t in await stack.repo.list_transitions(handle.id)] == PIPELINE
    assert (
        (job.status, job.sandbox_id, job.sandbox_preview_url, job.build_version, job.workspace_path)
        == (
            status.stage,
            status.sandbox_id,
            status.preview_url,
            status.build_version,
            status.workspace_path,
        )
        == ("ready", result.sandbox_id, result.preview_url, result.build_version, result.workspace_path)
    )
    # The row's preview_url is the version's stable URL (the gateway's), the sandbox's stays beside it.
    assert job.preview_url == (result.version_url or result.preview_url)
    project_versions = [j.build_version for j in await stack.repo.list_jobs(job.project_id)]
    assert project_versions == [result.build_version] and result.build_version == "build_v0_1", project_versions
    desc = await handle.describe()
    assert (job.workflow_id, job.run_id) == (handle.id, desc.run_id)


class StageGate:
    """Holds one stage's transition write inside PostgreSQL, so a fault lands while the worker is in
    the middle of it (STARTING and SCAFFOLD are instant local activities otherwise).

    A BEFORE INSERT trigger on job_transitions takes the advisory lock `key` (transaction scope)
    when the row is for `stage`; the test holds that lock on its own connection. The worker's write
    then waits inside its transaction, visible in pg_locks as an ungranted advisory lock.
    """

    def __init__(self, database_url: str, stage: str, key: int = 424242) -> None:
        self.dsn = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
        self.stage = stage
        self.key = key
        self._holder: asyncpg.Connection | None = None

    async def close_and_hold(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute(
                f"""
                CREATE OR REPLACE FUNCTION reliability_stage_gate() RETURNS trigger AS $$
                BEGIN
                    IF NEW.stage = '{self.stage}' THEN PERFORM pg_advisory_xact_lock({self.key}); END IF;
                    RETURN NEW;
                END $$ LANGUAGE plpgsql;
                DROP TRIGGER IF EXISTS reliability_stage_gate ON job_transitions;
                CREATE TRIGGER reliability_stage_gate BEFORE INSERT ON job_transitions
                    FOR EACH ROW EXECUTE FUNCTION reliability_stage_gate();
                """
            )
        finally:
            await conn.close()
        self._holder = await asyncpg.connect(self.dsn)
        await self._holder.execute(f"SELECT pg_advisory_lock({self.key})")

    async def wait_blocked(self, timeout: float = 60) -> None:
        async def blocked() -> bool:
            conn = await asyncpg.connect(self.dsn)
            try:
                return bool(
                    await conn.fetchval(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND objid = $1",
                        self.key,
                    )
                )
            finally:
                await conn.close()

        await wait_until(blocked, f"a {self.stage} transition write to wait at the gate", timeout=timeout)

    async def open_and_remove(self) -> None:
        if self._holder is not None:
            await self._holder.close()  # ends the session: its advisory lock goes with it
            self._holder = None
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute("DROP TRIGGER IF EXISTS reliability_stage_gate ON job_transitions")
        finally:
            await conn.close()


async def run_command(argv: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> tuple[int, str]:
    """Run a command line to completion (a CLI the way an operator runs it); (exit code, output)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(errors="replace")


async def terminate_with_cli(stack: Stack, build_id: str) -> None:
    """`temporal workflow terminate`: the workflow ends at once, no cleanup code runs."""
    from genloop.devserver import temporal_binary

    code, out = await run_command(
        [
            temporal_binary(),
            "workflow",
            "terminate",
            "--workflow-id",
            build_id,
            "--address",
            stack.temporal_target,
            "--namespace",
            stack.client.namespace,
            "--reason",
            "fault injection",
        ]
    )
    assert code == 0, out
