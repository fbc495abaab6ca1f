"""BuildActivities: one method per activity, dependencies injected, each idempotent under retry."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from e2b import CommandExitException
from temporalio import activity

from activities.edits import FileSet, apply_changes, digest_of
from activities.runners import Capability, Runner, RunnerResult, RunnerTask
from activities.sandbox import SandboxClient, classify_sandbox_error
from genloop.errors import ErrorKind, GenloopError, to_application_error
from genloop.http import preview_client
from persistence.repository import JobRepository
from workflows.stages import Stage
from workflows.types import (
    ChecksResult,
    CodeResult,
    FileManifestEntry,
    FinishInput,
    FinishResult,
    KillSandboxInput,
    SandboxInfo,
    SandboxInput,
    ScaffoldState,
    TransitionInput,
)

log = logging.getLogger("genloop.activities")

T = TypeVar("T")

HEARTBEAT_EVERY_S = 2.0
INSTALL_TIMEOUT_S = 900
HEALTH_DEADLINE_S = 60.0
HEALTH_POLL_S = 0.025  # loopback probes are cheap; this bounds time-to-preview
STDERR_TAIL_CHARS = 2000
APP_PIDFILE = ".genloop-app.pid"
INSTALL_PIDFILE = ".genloop-install.pid"

# Output fragments that mean "the network failed", not "the dependency is wrong": retry those.
_NETWORK_MARKERS = (
    "Temporary failure in name resolution",
    "Connection refused",
    "Connection reset",
    "ConnectTimeout",
    "ReadTimeout",
    "Network is unreachable",
    "ECONNRESET",
    "ETIMEDOUT",
    "EAI_AGAIN",
    "ENOTFOUND",
)


def _failures_as_application_errors(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Every failure leaves an activity as an ApplicationError typed by its ErrorKind, so the
    workflow's retry policies (non_retryable_error_types) and failure handling see one taxonomy."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return await fn(*args, **kwargs)
        except asyncio.CancelledError:
            raise
        except GenloopError as err:
            raise to_application_error(err) from None
        except Exception as exc:  # noqa: BLE001 - classified, never swallowed
            raise to_application_error(classify_sandbox_error(exc)) from exc

    return wrapper


async def _heartbeating(awaitable: Awaitable[T], details: str | Callable[[], str]) -> T:
    """Await while heartbeating, so cancellation reaches long work and a dead worker is noticed.
    `details` may be a callable giving the latest progress message."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=HEARTBEAT_EVERY_S)
            if done:
                return task.result()
            activity.heartbeat(details() if callable(details) else details)
    except asyncio.CancelledError:
        task.cancel()
        raise


def _parse_at(at: str) -> datetime:
    return datetime.fromisoformat(at) if at else datetime.now(UTC)


def _tail(text: str | None, limit: int = STDERR_TAIL_CHARS) -> str:
    text = (text or "").strip()
    return text[-limit:]


class BuildActivities:
    def __init__(
        self,
        repo: JobRepository,
        sandboxes: SandboxClient,
        runners: Mapping[str, Runner],
        *,
        app_port: int = 8080,
        health_deadline_s: float = HEALTH_DEADLINE_S,
    ) -> None:
        self.repo = repo
        self.sandboxes = sandboxes
        self.runners = runners
        self.app_port = app_port
        self.health_deadline_s = health_deadline_s

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.record_transition,
            self.create_initial_state,
            self.generate_code,
            self.provision_sandbox,
            self.install_dependencies,
            self.start_and_check,
            self.finish_build,
            self.kill_build_sandboxes,
        ]

    # --- persistence (run as local activities: short DB writes, no server round trip) ---

    @activity.defn(name="record_transition")
    @_failures_as_application_errors
    async def record_transition(self, inp: TransitionInput) -> None:
        if inp.stage == Stage.STARTING.value:
            await self.repo.create_job(
                inp.build_id, inp.project_id, inp.goal, workflow_id=inp.workflow_id, run_id=inp.run_id
            )
        try:
            await self.repo.transition(
                inp.build_id,
                Stage(inp.stage),
                message=inp.message,
                at=_parse_at(inp.at),
                error_message=inp.error_message,
                error_detail=inp.error_detail,
                debug_id=inp.debug_id,
                run_id=inp.run_id or None,
            )
        except GenloopError as err:
            if err.kind is ErrorKind.ILLEGAL_TRANSITION and await self._already_recorded(inp):
                return
            raise

    async def _already_recorded(self, inp: TransitionInput) -> bool:
        """A local activity's result travels with the workflow task completion: a worker that dies
        after this write committed but before that completion reached Temporal leaves the write
        done and unrecorded, and the replaying worker executes it (and the ones after it) again,
        against a row that has moved on. This run already recorded the stage: nothing to do."""
        job = await self.repo.get(inp.build_id)
        if job is None or not inp.run_id or job.run_id != inp.run_id:
            return False
        return inp.stage in {t.stage for t in await self.repo.list_transitions(inp.build_id)}

    @activity.defn(name="finish_build")
    @_failures_as_application_errors
    async def finish_build(self, inp: FinishInput) -> FinishResult:
        job = await self.repo.finish_ready(
            inp.build_id,
            sandbox_id=inp.sandbox_id,
            preview_url=inp.preview_url,
            workspace_path=inp.workspace_path,
            message=Stage.READY.label,
            at=_parse_at(inp.at),
        )
        return FinishResult(build_version=job.build_version or "")

    # --- SCAFFOLD ---

    @activity.defn(name="create_initial_state")
    @_failures_as_application_errors
    async def create_initial_state(self, state: ScaffoldState) -> ScaffoldState:
        if state.runner not in self.runners:
            raise GenloopError(ErrorKind.INVALID_INPUT, f"unknown runner {state.runner!r}")
        if not state.goal.strip():
            raise GenloopError(ErrorKind.INVALID_INPUT, "empty goal")
        return state

    # --- CODE ---

    @activity.defn(name="generate_code")
    @_failures_as_application_errors
    async def generate_code(self, state: ScaffoldState) -> CodeResult:
        runner = self._runner(state.runner)
        result = await self._run_runner(runner, RunnerTask(kind=Capability.NEW_APP, goal=state.goal))
        files = apply_changes({}, result.files, result.deleted)
        return await self._store_files(files)

    def _runner(self, name: str) -> Runner:
        runner = self.runners.get(name)
        if runner is None:
            raise GenloopError(ErrorKind.INVALID_INPUT, f"unknown runner {name!r}")
        return runner

    async def _run_runner(self, runner: Runner, task: RunnerTask) -> RunnerResult:
        """Run a runner while heartbeating its latest progress message."""
        latest = ["runner"]

        def progress(message: str) -> None:
            latest[0] = message

        try:
            return await _heartbeating(runner.run(task, progress), lambda: latest[0])
        except (GenloopError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - a runner bug is permanent for this build
            raise GenloopError(ErrorKind.RUNNER_FAILED, f"{type(exc).__name__}: {exc}") from exc

    async def _store_files(self, files: FileSet) -> CodeResult:
        # Claim check: contents go to the blob store; the history carries the manifest only.
        digests = await self.repo.put_blobs(list(files.values()))
        manifest = [
            FileManifestEntry(path=path, digest=digest, size=len(content))
            for (path, content), digest in zip(files.items(), digests, strict=True)
        ]
        manifest_digest = digest_of(json.dumps([[m.path, m.digest] for m in manifest]).encode())
        return CodeResult(files=manifest, manifest_digest=manifest_digest, total_bytes=sum(m.size for m in manifest))

    # --- DEPS ---

    @activity.defn(name="provision_sandbox")
    @_failures_as_application_errors
    async def provision_sandbox(self, inp: SandboxInput) -> SandboxInfo:
        sandbox = await self.sandboxes.create(inp.build_id, inp.project_id)
        # Record the id before anything else can fail, so failure handling can always kill it.
        await self.repo.set_sandbox(inp.build_id, sandbox.sandbox_id, inp.workspace_path)
        await sandbox.set_timeout(self.sandboxes.config.timeout_s)
        blobs = await self.repo.get_blobs([f.digest for f in inp.files])
        entries = [{"path": f"{inp.workspace_path}/{f.path}", "data": blobs[f.digest]} for f in inp.files]
        if entries:
            await _heartbeating(sandbox.files.write_files(entries), "writing files")
        activity.logger.info("sandbox %s ready for build %s (%d files)", sandbox.sandbox_id, inp.build_id, len(entries))
        return SandboxInfo(sandbox_id=sandbox.sandbox_id, workspace_path=inp.workspace_path)

    @activity.defn(name="install_dependencies")
    @_failures_as_application_errors
    async def install_dependencies(self, inp: SandboxInput) -> str:
        paths = {f.path for f in inp.files}
        if "requirements.txt" in paths:
            cmd, what = "python3 -m venv .venv && .venv/bin/pip install --disable-pip-version-check -r requirements.txt", "pip"
        elif "package.json" in paths:
            cmd, what = "npm install --no-audit --no-fund", "npm"
        else:
            return "none"
        sandbox = await self.sandboxes.connect(_require(inp.sandbox_id))
        # Commands outlive their client: when an attempt dies (worker crash, broken stream) its
        # install keeps running in the sandbox. A retry ends that process group first (the agent runs
        # each command in a session of its own, so $$ is its group id): two installers racing on one
        # environment would corrupt it.
        guarded = (
            f"[ -f {INSTALL_PIDFILE} ] && kill -9 -- -$(cat {INSTALL_PIDFILE}) 2>/dev/null; "
            f"echo $$ > {INSTALL_PIDFILE}; {cmd}; rc=$?; rm -f {INSTALL_PIDFILE}; exit $rc"
        )
        try:
            await _heartbeating(
                sandbox.commands.run(guarded, cwd=inp.workspace_path, timeout=INSTALL_TIMEOUT_S), f"installing ({what})"
            )
        except CommandExitException as exc:
            output = f"{exc.stderr or ''}\n{exc.stdout or ''}"
            kind = ErrorKind.NETWORK if any(m in output for m in _NETWORK_MARKERS) else ErrorKind.DEPENDENCY_INSTALL_FAILED
            raise GenloopError(kind, f"{what} install exited {exc.exit_code}: {_tail(output)}") from None
        return what

    # --- CHECKS ---

    @activity.defn(name="start_and_check")
    @_failures_as_application_errors
    async def start_and_check(self, inp: SandboxInput) -> ChecksResult:
        sandbox = await self.sandboxes.connect(_require(inp.sandbox_id))
        preview_url = self.sandboxes.preview_url(sandbox, self.app_port)
        async with preview_client(timeout=5.0) as http:
            if await _healthy(http, preview_url):  # a retried check after a successful start
                return ChecksResult(preview_url=preview_url, port=self.app_port)
            procfile = await sandbox.files.read(f"{inp.workspace_path}/Procfile")
            web_cmd = _web_command(procfile)
            stderr: list[str] = []
            # The pidfile makes a retried start replace, not race, the previous attempt's process.
            launch = (
                f"[ -f {APP_PIDFILE} ] && kill $(cat {APP_PIDFILE}) 2>/dev/null; echo $$ > {APP_PIDFILE}; "
                f"[ -d .venv ] && export PATH=\"$PWD/.venv/bin:$PATH\"; exec {web_cmd}"
            )
            handle = await sandbox.commands.run(
                launch,
                background=True,
                cwd=inp.workspace_path,
                envs={"PORT": str(self.app_port)},
                timeout=0,  # a server: the SDK's default 60 s deadline would kill it
                on_stderr=stderr.append,
            )
            exited = asyncio.ensure_future(handle.wait())
            deadline = time.monotonic() + self.health_deadline_s
            try:
                while time.monotonic() < deadline:
                    if exited.done():
                        break
                    if await _healthy(http, preview_url):
                        await handle.disconnect()
                        return ChecksResult(preview_url=preview_url, port=self.app_port)
                    activity.heartbeat("waiting for /health")
                    await asyncio.sleep(HEALTH_POLL_S)
            finally:
                if not exited.done():
                    exited.cancel()
            reason = "exited before answering /health" if exited.done() else f"did not answer /health within {self.health_deadline_s:.0f}s"
            raise GenloopError(ErrorKind.APP_CHECK_FAILED, f"the app {reason}. stderr tail:\n{_tail(''.join(stderr))}")

    # --- cleanup ---

    @activity.defn(name="kill_build_sandboxes")
    @_failures_as_application_errors
    async def kill_build_sandboxes(self, inp: KillSandboxInput) -> int:
        """Kill the build's sandbox, and any the metadata says belong to it (a create whose answer
        was lost)."""
        ids = set(await self.sandboxes.find_for_build(inp.build_id))
        if inp.sandbox_id:
            ids.add(inp.sandbox_id)
        killed = 0
        for sandbox_id in sorted(ids):
            killed += bool(await self.sandboxes.kill(sandbox_id))
        return killed


async def _healthy(http: Any, preview_url: str) -> bool:
    try:
        return (await http.get(f"{preview_url}/health")).status_code == 200
    except Exception:  # noqa: BLE001 - not up yet
        return False


def _web_command(procfile: str) -> str:
    for line in procfile.splitlines():
        name, sep, cmd = line.partition(":")
        if sep and name.strip() == "web" and cmd.strip():
            return cmd.strip()
    raise GenloopError(ErrorKind.APP_CHECK_FAILED, "Procfile has no `web:` process")


def _require(sandbox_id: str | None) -> str:
    if not sandbox_id:
        raise GenloopError(ErrorKind.INVALID_INPUT, "no sandbox id")
    return sandbox_id

