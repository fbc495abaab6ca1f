"""BuildActivities: one method per activity, dependencies injected, each idempotent under retry."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import e2b
from e2b import CommandExitException
from temporalio import activity

from activities.edits import FileSet, apply_changes, digest_of, text_files
from activities.logs import LogPolicy, LogSink
from activities.runners import Capability, Failure, Runner, RunnerResult, RunnerTask, Usage, usage_of
from activities.sandbox import SandboxClient, classify_sandbox_error
from genloop.errors import ErrorKind, GenloopError, redact_secrets, to_application_error
from genloop.http import preview_client
from persistence.repository import JobRepository
from workflows.stages import Stage
from workflows.types import (
    AttemptInput,
    ChecksResult,
    CodeRequest,
    CodeResult,
    FileManifestEntry,
    FinishInput,
    FinishResult,
    KillSandboxInput,
    PrepareChangeInput,
    PreparedChange,
    PreviewPolicy,
    SandboxInfo,
    SandboxInput,
    ScaffoldState,
    StartInput,
    SyncFilesInput,
    SyncFilesResult,
    TransitionInput,
)

log = logging.getLogger("genloop.activities")

T = TypeVar("T")

HEARTBEAT_EVERY_S = 2.0
# CODE, DEPS and CHECKS are recorded by the stage's first activity, not a local activity before it:
# three local activities (and their workflow task time) fewer per build (bench levers toggles it).
TRANSITIONS_IN_ACTIVITIES = True
STATUS_EVERY_S = 2.0  # how often a runner's progress reaches the build's status message
INSTALL_TIMEOUT_S = 900
HEALTH_DEADLINE_S = 60.0
HEALTH_POLL_S = 0.025  # loopback probes are cheap; this bounds time-to-preview
# READY: the app's output still arriving until this long without any, or DRAIN_MAX_S at most, goes
# to the build's log (later output: logs?follow=app). An app that printed nothing waits not at all;
# one that prints as it binds waits up to DRAIN_QUIET_S (shorter windows lost lines under load).
DRAIN_QUIET_S = 0.2
DRAIN_MAX_S = 3.0
FAILURE_TAIL_CHARS = 8000  # what the fix loop may show the runner of a failing command's output
DETAIL_TAIL_CHARS = 2000  # what error_detail keeps of it
APP_PIDFILE = ".genloop-app.pid"
INSTALL_PIDFILE = ".genloop-install.pid"
DEPENDENCY_MANIFESTS = frozenset({"requirements.txt", "package.json", "package-lock.json"})

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


def failures_as_application_errors(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
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


async def _heartbeating(awaitable: Awaitable[T], details: str) -> T:
    """Await while heartbeating, so cancellation reaches long work and a dead worker is noticed."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=HEARTBEAT_EVERY_S)
            if done:
                return task.result()
            activity.heartbeat(details)
    except asyncio.CancelledError:
        task.cancel()
        raise


def _parse_at(at: str) -> datetime:
    return datetime.fromisoformat(at) if at else datetime.now(UTC)


def _tail(text: str | None, limit: int = DETAIL_TAIL_CHARS) -> str:
    text = (text or "").strip()
    return text[-limit:]


_VOLATILE = re.compile(r"0x[0-9a-f]+|[0-9]+|/tmp/[^\s'\"]+")


def failure_digest(output: str) -> str:
    """The same failure twice has the same digest, whatever pids, ports, addresses or times it names."""
    normalised = " ".join(_VOLATILE.sub("#", output.lower()).split())
    return digest_of(normalised.encode())[:16]


def app_failure(stage: Stage, command: str, exit_code: int | None, output: str) -> dict[str, Any]:
    """What the fix loop may tell the runner about a failing command: its tail, redacted."""
    tail = redact_secrets(_tail(output, FAILURE_TAIL_CHARS))
    return {"stage": stage.value, "command": command, "exit_code": exit_code, "output": tail,
            "digest": failure_digest(tail)}


class BuildActivities:
    def __init__(
        self,
        repo: JobRepository,
        sandboxes: SandboxClient,
        runners: Mapping[str, Runner],
        *,
        app_port: int = 8080,
        health_deadline_s: float = HEALTH_DEADLINE_S,
        fix_attempts: int = 0,
        token_budget: int = 0,
        version_url: Callable[[str], str] | None = None,
        preview: PreviewPolicy | None = None,
        host_queue: str = "",
        host_id: str = "",
        logs: LogPolicy | None = None,
    ) -> None:
        self.repo = repo
        self.sandboxes = sandboxes
        self.runners = runners
        self.app_port = app_port
        self.health_deadline_s = health_deadline_s
        self.fix_attempts = fix_attempts  # runner.fix_attempts: repairs a runner that can fix may try
        self.token_budget = token_budget  # runner.max_tokens_per_build; 0: no limit
        # A stable URL per version (settings.version_url) and its preview policy; None: no gateway
        # serves versions here, so a build's preview is its sandbox's own URL.
        self.version_url = version_url
        self.preview = preview
        # The local sandbox host this worker creates sandboxes on, and the task queue only its workers
        # poll: every later activity on a sandbox is routed there. Empty for E2B (any worker reaches it).
        self.host_queue = host_queue
        self.host_id = host_id
        self.logs = logs or LogPolicy()

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.record_transition,
            self.record_attempt,
            self.start_build,
            self.create_initial_state,
            self.prepare_change,
            self.generate_code,
            self.provision_sandbox,
            self.sync_sandbox_files,
            self.install_dependencies,
            self.start_and_check,
            self.finish_build,
            self.kill_build_sandboxes,
        ]

    # --- persistence (run as local activities: short DB writes, no server round trip) ---

    @activity.defn(name="record_transition")
    @failures_as_application_errors
    async def record_transition(self, inp: TransitionInput) -> None:
        await self._record_transition(inp)

    async def _record_entered(self, entered: list[TransitionInput]) -> None:
        """The stages the workflow entered since its last write, recorded before this activity's work
        (ScaffoldState.transitions_in_activities). A retry records nothing twice: the same stage
        again is a no-op."""
        for transition in entered:
            await self._record_transition(transition)

    async def _record_transition(self, inp: TransitionInput) -> None:
        try:
            if inp.stage == Stage.STARTING.value:
                await self.repo.ensure_job(
                    inp.build_id, inp.project_id, inp.goal, workflow_id=inp.workflow_id, run_id=inp.run_id
                )
            await self.repo.advance(
                inp.build_id,
                Stage(inp.stage),
                message=inp.message,
                at=_parse_at(inp.at),
                error_message=inp.error_message,
                error_detail=inp.error_detail,
                debug_id=inp.debug_id,
                run_id=inp.run_id or None,
                then=Stage(inp.then) if inp.then else None,
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

    @activity.defn(name="record_attempt")
    @failures_as_application_errors
    async def record_attempt(self, inp: AttemptInput) -> None:
        await self.repo.record_attempt(
            inp.build_id,
            attempt=inp.attempt,
            stage=inp.failure.stage,
            command=inp.failure.command,
            exit_code=inp.failure.exit_code,
            output=inp.failure.output,
            max_attempts=inp.max_attempts,
            at=_parse_at(inp.at),
        )

    @activity.defn(name="finish_build")
    @failures_as_application_errors
    async def finish_build(self, inp: FinishInput) -> FinishResult:
        job = await self.repo.finish_ready(
            inp.build_id,
            sandbox_id=inp.sandbox_id,
            preview_url=inp.preview_url,
            workspace_path=inp.workspace_path,
            message=Stage.READY.label,
            at=_parse_at(inp.at),
            version_url=self.version_url,
        )
        if job.preview_label is None:
            return FinishResult(build_version=job.build_version or "")
        return FinishResult(
            build_version=job.build_version or "", version_url=job.preview_url or "", preview=self.preview
        )

    @activity.defn(name="start_build")
    @failures_as_application_errors
    async def start_build(self, inp: StartInput) -> ScaffoldState | None:
        """The build's first local write and, for a new app, SCAFFOLD's work after it: that work is
        pure (no I/O), so it needs no activity, workflow task and history events of its own."""
        await self._record_transition(inp.transition)
        return self._initial_state(inp.scaffold) if inp.scaffold is not None else None

    # --- SCAFFOLD ---

    @activity.defn(name="create_initial_state")
    @failures_as_application_errors
    async def create_initial_state(self, state: ScaffoldState) -> ScaffoldState:
        """SCAFFOLD of a new app in histories before START_SCAFFOLDS_PATCH (start_build does it now)."""
        return self._initial_state(state)

    def _initial_state(self, state: ScaffoldState) -> ScaffoldState:
        runner = self._runner(state.runner)
        if not state.goal.strip():
            raise GenloopError(ErrorKind.INVALID_INPUT, "empty goal")
        return self._allowances(state, runner)

    def _allowances(self, state: ScaffoldState, runner: Runner) -> ScaffoldState:
        can_fix = Capability.FIX in getattr(runner, "capabilities", frozenset())
        state.can_fix = can_fix
        state.fix_attempts = self.fix_attempts if can_fix else 0
        state.transitions_in_activities = TRANSITIONS_IN_ACTIVITIES
        return state

    @activity.defn(name="prepare_change")
    @failures_as_application_errors
    async def prepare_change(self, inp: PrepareChangeInput) -> PreparedChange:
        """SCAFFOLD of a change: find its base (the named build, else the project's newest READY
        version), record the lineage, and apply the explicit edits to the base's files."""
        job = await self.repo.get(inp.build_id)
        if job is None:
            raise GenloopError(ErrorKind.NOT_FOUND, f"build {inp.build_id} not found")
        base = await self._base(inp)
        base_files = await self.repo.get_files(base.id)
        if not base_files:
            raise GenloopError(ErrorKind.CONFLICT, f"base {base.id} has no files to build on")
        contents = await self.repo.get_blobs([f.digest for f in base_files])
        current = {f.path: contents[f.digest] for f in base_files}
        writes: dict[str, str | bytes] = {}
        if inp.edits:
            edit_blobs = await self.repo.get_blobs([e.digest for e in inp.edits if e.digest])
            writes = {e.path: edit_blobs[e.digest] for e in inp.edits if not e.delete and e.digest}
        deletes = [e.path for e in inp.edits if e.delete]
        files = apply_changes(current, writes, deletes, kind=ErrorKind.INVALID_INPUT, strict_deletes=True)
        await self.repo.set_lineage(
            inp.build_id, goal=base.goal, base_build_id=base.id, base_version=base.build_version, note=inp.note
        )
        code = await self._store_files(inp.build_id, files)
        scaffold = self._allowances(
            ScaffoldState(
                session_id=inp.build_id,
                project_path="",
                goal=base.goal,
                project_id=inp.project_id,
                runner=job.runner or "template",
            ),
            self._runner(job.runner or "template"),
        )
        return PreparedChange(
            goal=base.goal, base_build_id=base.id, base_version=base.build_version, code=code, scaffold=scaffold
        )

    async def _base(self, inp: PrepareChangeInput):
        if inp.base_build_id:
            base = await self.repo.get(inp.base_build_id)
            if base is None or base.project_id != inp.project_id:
                raise GenloopError(ErrorKind.NOT_FOUND, f"base {inp.base_build_id} is not a build of {inp.project_id}")
            return base
        base = await self.repo.newest_ready(inp.project_id)
        if base is None:
            raise GenloopError(ErrorKind.CONFLICT, f"project {inp.project_id} has no READY version to change")
        return base

    # --- CODE ---

    @activity.defn(name="generate_code")
    @failures_as_application_errors
    async def generate_code(self, req: CodeRequest) -> CodeResult:
        await self._record_entered(req.entered)
        runner = self._runner(req.runner)
        kind = Capability(req.kind)
        if kind not in getattr(runner, "capabilities", frozenset()):
            raise GenloopError(ErrorKind.INVALID_INPUT, f"runner {req.runner!r} cannot do {kind.value}")
        current: FileSet = {}
        if req.files:
            blobs = await self.repo.get_blobs([f.digest for f in req.files])
            current = {f.path: blobs[f.digest] for f in req.files}
        text, binary = text_files(current)
        task = RunnerTask(
            kind=kind,
            goal=req.goal,
            stack=req.stack,
            files=text,
            binary_files=binary,
            change=req.change,
            failure=Failure(req.failure.stage, req.failure.command, req.failure.exit_code, req.failure.output)
            if req.failure is not None
            else None,
            token_budget=await self._token_budget(req.build_id),
        )
        async with await self._sink(req.build_id, Stage.CODE, attempt=req.attempt) as sink:
            if task.failure is not None:
                sink.line(
                    f"fixing: `{task.failure.command}` failed in {task.failure.stage} "
                    f"(exit code {task.failure.exit_code}); the runner is shown its output",
                    command="runner",
                )
            try:
                result = await self._run_runner(req.build_id, runner, task, sink)
            except GenloopError as err:
                await self._record_usage(req.build_id, usage_of(err))  # a failed call still spent tokens
                sink.line(f"runner failed: {err.kind.value}", command="runner")
                raise
            sink.line(f"summary: {result.summary or '(none)'}", command="runner")
        usage = result.usage
        await self._record_usage(req.build_id, usage)
        if result.empty and kind is not Capability.NEW_APP:
            code = manifest_result(req.files)
            code.changed, code.summary = False, result.summary
            return code
        files = apply_changes(current, result.files, result.deleted)
        code = await self._store_files(req.build_id, files)
        code.summary = result.summary
        return code

    async def _token_budget(self, build_id: str) -> int | None:
        """What this build may still spend (runner.max_tokens_per_build less what every earlier call,
        failed ones included, spent); None without a limit."""
        if not self.token_budget:
            return None
        job = await self.repo.get(build_id)
        spent = job.tokens_in + job.tokens_out if job is not None else 0
        return max(0, self.token_budget - spent)

    async def _record_usage(self, build_id: str, usage: Usage | None) -> None:
        if usage is not None and usage.calls:
            await self.repo.add_usage(
                build_id,
                tokens_in=usage.input_tokens,
                tokens_out=usage.output_tokens,
                calls=usage.calls,
                model=usage.model,
            )

    def _runner(self, name: str) -> Runner:
        runner = self.runners.get(name)
        if runner is None:
            raise GenloopError(ErrorKind.INVALID_INPUT, f"unknown runner {name!r}")
        return runner

    async def _sink(self, build_id: str, stage: Stage, serve: int = 0, attempt: int = 0) -> LogSink:
        """A log sink for this activity: the build's current fix attempt numbers its lines, and a
        retried activity says so once (its replayed output is not stored twice, see activities.logs).
        `serve` n: the version served again in a new sandbox; its lines are keyed apart from the build's.
        `attempt`: the workflow's attempt number, when its input carries one (saves reading the job)."""
        if attempt < 1:
            job = await self.repo.get(build_id)
            # Numbered as the API numbers attempts (1: the first try; record_attempt moves the job on).
            attempt = max(job.attempt if job is not None else 0, 1)
        sink = LogSink(self.repo, build_id, stage.value, attempt, self.logs, scope=f"serve-{serve}" if serve else "")
        if serve:
            sink.line(f"[genloop] serving this version again (sandbox {serve})", command="serve")
        with contextlib.suppress(RuntimeError):  # outside an activity (unit tests)
            if (n := activity.info().attempt) > 1:
                sink.line(
                    f"[genloop] this step is running again (try {n}); output stored before is not repeated",
                    command=f"retry-{n}",
                )
        return sink

    async def _run_runner(self, build_id: str, runner: Runner, task: RunnerTask, sink: LogSink) -> RunnerResult:
        """Run a runner while heartbeating its latest progress message, which also becomes the
        build's status message (at most every STATUS_EVERY_S) and a log line."""
        latest = ["runner"]

        def progress(message: str) -> None:
            if message != latest[0]:
                sink.line(message, command="runner")
            latest[0] = message

        work = asyncio.ensure_future(runner.run(task, progress))
        shown, shown_at = "", 0.0
        try:
            while True:
                done, _ = await asyncio.wait({work}, timeout=HEARTBEAT_EVERY_S)
                if done:
                    return work.result()
                activity.heartbeat(latest[0])
                if latest[0] != shown and time.monotonic() - shown_at >= STATUS_EVERY_S:
                    shown, shown_at = latest[0], time.monotonic()
                    await self.repo.set_status_message(build_id, shown)
        except (GenloopError, asyncio.CancelledError):
            work.cancel()
            # Let the runner close its stream before the cancel is reported (bounded: never hang).
            await asyncio.wait({work}, timeout=5)
            raise
        except Exception as exc:  # noqa: BLE001 - a runner bug is permanent for this build
            raise GenloopError(ErrorKind.RUNNER_FAILED, f"{type(exc).__name__}: {exc}") from exc

    async def _store_files(self, build_id: str, files: FileSet) -> CodeResult:
        # Claim check: contents go to the blob store; the history carries the manifest only. The
        # build's file list is recorded too, so its files can be read and built on later.
        stored = await self.repo.store_files(build_id, list(files.items()))
        return manifest_result([FileManifestEntry(path=p, digest=d, size=n) for p, d, n in stored])

    # --- DEPS ---

    @activity.defn(name="provision_sandbox")
    @failures_as_application_errors
    async def provision_sandbox(self, inp: SandboxInput) -> SandboxInfo:
        await self._record_entered(inp.entered)
        sandbox = await self.sandboxes.create(inp.build_id, inp.project_id, serve=inp.serve)
        # Record the id before anything else can fail, so failure handling can always kill it.
        await self.repo.set_sandbox(inp.build_id, sandbox.sandbox_id, inp.workspace_path, host=self.host_id or None)
        await sandbox.set_timeout(self.sandboxes.config.timeout_s)
        blobs = await self.repo.get_blobs([f.digest for f in inp.files])
        entries = [{"path": f"{inp.workspace_path}/{f.path}", "data": blobs[f.digest]} for f in inp.files]
        if entries:
            await _heartbeating(sandbox.files.write_files(entries), "writing files")
        activity.logger.info("sandbox %s ready for build %s (%d files)", sandbox.sandbox_id, inp.build_id, len(entries))
        return SandboxInfo(
            sandbox_id=sandbox.sandbox_id,
            workspace_path=inp.workspace_path,
            task_queue=self.host_queue,
            host=self.host_id,
        )

    @activity.defn(name="sync_sandbox_files")
    @failures_as_application_errors
    async def sync_sandbox_files(self, inp: SyncFilesInput) -> SyncFilesResult:
        """A fix attempt's files into the sandbox the build already has: write what changed, delete
        what went away. Idempotent: a retry writes the same contents and deletes nothing twice."""
        await self._record_entered(inp.entered)
        old = {f.path: f.digest for f in inp.old_files}
        new = {f.path: f.digest for f in inp.new_files}
        changed = [f for f in inp.new_files if old.get(f.path) != f.digest]
        removed = sorted(set(old) - set(new))
        sandbox = await self.sandboxes.connect(inp.sandbox_id)
        if changed:
            blobs = await self.repo.get_blobs([f.digest for f in changed])
            entries = [{"path": f"{inp.workspace_path}/{f.path}", "data": blobs[f.digest]} for f in changed]
            await _heartbeating(sandbox.files.write_files(entries), "writing the fixed files")
        for path in removed:
            await sandbox.files.remove(f"{inp.workspace_path}/{path}")
        touched = {f.path for f in changed} | set(removed)
        return SyncFilesResult(
            written=len(changed), deleted=len(removed), dependencies_changed=bool(touched & DEPENDENCY_MANIFESTS)
        )

    @activity.defn(name="install_dependencies")
    @failures_as_application_errors
    async def install_dependencies(self, inp: SandboxInput) -> str:
        await self._record_entered(inp.entered)
        paths = {f.path for f in inp.files}
        if "requirements.txt" in paths:
            cmd, what = (
                "python3 -m venv .venv && .venv/bin/pip install --disable-pip-version-check -r requirements.txt",
                "pip",
            )
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
        async with await self._sink(inp.build_id, Stage.DEPS, inp.serve, inp.attempt) as sink:
            sink.line(f"$ {cmd}", command="install")
            try:
                await _heartbeating(
                    sandbox.commands.run(
                        guarded,
                        cwd=inp.workspace_path,
                        timeout=INSTALL_TIMEOUT_S,
                        on_stdout=sink.writer("install", "stdout"),
                        on_stderr=sink.writer("install", "stderr"),
                    ),
                    f"installing ({what})",
                )
            except CommandExitException as exc:
                sink.line(f"{what} install exited with code {exc.exit_code}", command="install")
                raise _install_error(what, cmd, exc) from None
            sink.line(f"{what} install finished", command="install")
        return what

    # --- CHECKS ---

    @activity.defn(name="start_and_check")
    @failures_as_application_errors
    async def start_and_check(self, inp: SandboxInput) -> ChecksResult:
        await self._record_entered(inp.entered)
        sandbox = await self.sandboxes.connect(_require(inp.sandbox_id))
        preview_url = self.sandboxes.preview_url(sandbox, self.app_port)
        async with preview_client(timeout=5.0) as http:
            if await _healthy(http, preview_url):  # a retried check after a successful start
                return ChecksResult(preview_url=preview_url, port=self.app_port)
            async with await self._sink(inp.build_id, Stage.CHECKS, inp.serve, inp.attempt) as sink:
                return await self._start_and_check(sandbox, inp, http, preview_url, sink)

    async def _start_and_check(
        self, sandbox: Any, inp: SandboxInput, http: Any, preview_url: str, sink: LogSink
    ) -> ChecksResult:
        try:
            procfile = await sandbox.files.read(f"{inp.workspace_path}/Procfile")
        except e2b.NotFoundException:
            procfile = ""  # the app's mistake, not the sandbox's: the fix loop can repair it
        try:
            web_cmd = _web_command(procfile)
        except GenloopError as err:
            sink.line(err.detail, command="app")
            raise
        output: list[str] = []
        # The app's output goes to the fix loop (the tail, on failure) and to the build's log.
        to_log = {stream: sink.writer("app", stream) for stream in ("stdout", "stderr")}
        last_output = [0.0]

        def on_stdout(chunk: str) -> None:
            output.append(chunk)
            to_log["stdout"](chunk)
            last_output[0] = time.monotonic()

        def on_stderr(chunk: str) -> None:
            output.append(chunk)
            to_log["stderr"](chunk)
            last_output[0] = time.monotonic()

        sink.line(f"$ {web_cmd}", command="app")
        # The pidfile makes a retried start replace, not race, the previous attempt's process.
        launch = (
            f"[ -f {APP_PIDFILE} ] && kill $(cat {APP_PIDFILE}) 2>/dev/null; echo $$ > {APP_PIDFILE}; "
            f'[ -d .venv ] && export PATH="$PWD/.venv/bin:$PATH"; exec {web_cmd}'
        )
        handle = await sandbox.commands.run(
            launch,
            background=True,
            cwd=inp.workspace_path,
            # Unbuffered: a Python app's prints reach the build's log as they happen, not at exit.
            envs={"PORT": str(self.app_port), "PYTHONUNBUFFERED": "1"},
            timeout=0,  # a server: the SDK's default 60 s deadline would kill it
            on_stdout=on_stdout,
            on_stderr=on_stderr,
        )
        exited = asyncio.ensure_future(handle.wait())
        deadline = time.monotonic() + self.health_deadline_s
        try:
            while time.monotonic() < deadline:
                if exited.done():
                    break
                if await _healthy(http, preview_url):
                    # What the app printed before it answered may still be on its way: take it
                    # while it keeps coming (bounded). A quiet app costs nothing here.
                    drain_until = time.monotonic() + DRAIN_MAX_S
                    while time.monotonic() - last_output[0] < DRAIN_QUIET_S and time.monotonic() < drain_until:
                        await asyncio.sleep(DRAIN_QUIET_S / 2)
                    await handle.disconnect()
                    sink.line(f"the app answers /health on port {self.app_port}", command="app")
                    return ChecksResult(preview_url=preview_url, port=self.app_port)
                activity.heartbeat("waiting for /health")
                await asyncio.sleep(HEALTH_POLL_S)
        finally:
            if not exited.done():
                exited.cancel()
        exit_code = _exit_code(exited)
        reason = (
            f"exited with code {exit_code} before answering /health"
            if exited.done()
            else f"did not answer /health within {self.health_deadline_s:.0f}s"
        )
        if not exited.done():
            with contextlib.suppress(Exception):  # stop it, so a fix attempt starts clean
                await handle.kill()
        sink.line(f"the app {reason}", command="app")
        text = "".join(output)
        raise GenloopError(
            ErrorKind.APP_CHECK_FAILED,
            f"the app {reason}. output tail:\n{_tail(text)}",
            failure=app_failure(Stage.CHECKS, web_cmd, exit_code, f"the app {reason}.\n{text}"),
        )

    # --- cleanup ---

    @activity.defn(name="kill_build_sandboxes")
    @failures_as_application_errors
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


def _install_error(what: str, cmd: str, exc: CommandExitException) -> GenloopError:
    output = f"{exc.stderr or ''}\n{exc.stdout or ''}"
    if any(m in output for m in _NETWORK_MARKERS):
        return GenloopError(ErrorKind.NETWORK, f"{what} install exited {exc.exit_code}: {_tail(output)}")
    return GenloopError(
        ErrorKind.DEPENDENCY_INSTALL_FAILED,
        f"{what} install exited {exc.exit_code}: {_tail(output)}",
        failure=app_failure(Stage.DEPS, cmd, exc.exit_code, output),
    )


async def _healthy(http: Any, preview_url: str) -> bool:
    try:
        return (await http.get(f"{preview_url}/health")).status_code == 200
    except Exception:  # noqa: BLE001 - not up yet
        return False


def _exit_code(exited: asyncio.Future) -> int | None:
    """The launched command's exit code, when it has exited (a non-zero exit raises in the SDK)."""
    if not exited.done() or exited.cancelled():
        return None
    exc = exited.exception()
    if isinstance(exc, CommandExitException):
        return exc.exit_code
    return None if exc is not None else exited.result().exit_code


def _web_command(procfile: str) -> str:
    for line in procfile.splitlines():
        name, sep, cmd = line.partition(":")
        if sep and name.strip() == "web" and cmd.strip():
            return cmd.strip()
    message = "the project has no Procfile with a `web:` line naming the command that starts the app"
    raise GenloopError(
        ErrorKind.APP_CHECK_FAILED, message, failure=app_failure(Stage.CHECKS, "(Procfile)", None, message)
    )


def _require(sandbox_id: str | None) -> str:
    if not sandbox_id:
        raise GenloopError(ErrorKind.INVALID_INPUT, "no sandbox id")
    return sandbox_id


def manifest_result(manifest: list[FileManifestEntry]) -> CodeResult:
    digest = digest_of(json.dumps([[m.path, m.digest] for m in manifest]).encode())
    return CodeResult(files=list(manifest), manifest_digest=digest, total_bytes=sum(m.size for m in manifest))
