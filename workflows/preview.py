"""PreviewWorkflow: one long-lived workflow per READY version that owns its sandbox's life.

A version is live after its build; when nobody has requested it for `idle_pause_s` (the gateway
signals `touch` at most every 30 s per version while requests arrive), its sandbox is paused (or,
where pausing is not supported, stopped: the files are stored). The gateway's `wake` update brings
it back: resume the sandbox, or when it is gone (killed, host restarted, E2B no longer has it) serve
the version again in a new sandbox from its stored files, with the same provision / install / start
activities a build uses. Wakes are single-flight: every `wake` waits for the one in progress. A
version that cannot be served again is `failed` for `retry_failed_s` (the gateway answers 503 with
the friendly message and debug_id), then may be tried again: never a crash loop. After
`retention_s` the sandbox goes and the version is `removed` (its URL answers 410; files and row
stay). The workflow continues-as-new when Temporal suggests it.

Deterministic orchestration only.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    # The DTO modules by name: the sandbox resolves a dataclass's annotations in the module defining it.
    from genloop.errors import FRIENDLY_DEFAULT, ErrorKind
    from workflows.build import DB_WRITE, WORKSPACE_PATH, activity_options, host_lost
    from workflows.types.build import (
        ChecksResult,
        CodeResult,
        SandboxInfo,
        SandboxInput,
    )
    from workflows.types.preview import (
        PAUSE_UPDATE,
        PREVIEW_STATUS_QUERY,
        PREVIEW_WORKFLOW_NAME,
        TOUCH_SIGNAL,
        WAKE_UPDATE,
        PreviewChange,
        PreviewInput,
        PreviewState,
        PreviewStatus,
        StayAwakeInput,
        WakeRequest,
        WakeResult,
    )



@workflow.defn(name=PREVIEW_WORKFLOW_NAME)
class PreviewWorkflow:
    @workflow.init
    def __init__(self, inp: PreviewInput) -> None:
        self._inp = inp
        self._state = inp.state
        self._sandbox_id = inp.sandbox_id
        self._url = inp.sandbox_preview_url
        self._serve = inp.serve
        self._failed_at = inp.failed_at
        self._failure = inp.failure
        self._debug_id = inp.debug_id
        self._host_queue = inp.task_queue
        self._last_activity = workflow.now()
        self._wake_wanted = False
        self._pause_wanted = False
        self._files: CodeResult | None = None

    # --- interface ---

    @workflow.signal(name=TOUCH_SIGNAL)
    def touch(self) -> None:
        self._last_activity = workflow.now()

    @workflow.update(name=WAKE_UPDATE)
    async def wake(self, req: WakeRequest) -> WakeResult:
        self._last_activity = workflow.now()
        if self._state == PreviewState.FAILED and not self._may_retry():
            return self._result()
        stale = self._state == PreviewState.LIVE and req.unreachable is not None and req.unreachable == self._sandbox_id
        if stale or self._state not in (PreviewState.LIVE, PreviewState.REMOVED):
            self._wake_wanted = True
            await workflow.wait_condition(lambda: not self._wake_wanted)
        return self._result()

    @workflow.update(name=PAUSE_UPDATE)
    async def pause(self, req: WakeRequest) -> WakeResult:
        if self._state == PreviewState.LIVE:
            self._pause_wanted = True
            await workflow.wait_condition(lambda: not self._pause_wanted)
        return self._result()

    @workflow.query(name=PREVIEW_STATUS_QUERY)
    def status(self) -> PreviewStatus:
        return PreviewStatus(
            build_id=self._inp.build_id, state=self._state, sandbox_id=self._sandbox_id,
            sandbox_preview_url=self._url, serve=self._serve, last_activity=self._last_activity.isoformat(),
        )

    # --- the life of a version ---

    @workflow.run
    async def run(self, inp: PreviewInput) -> str:
        policy = inp.policy
        removal = self._removal_time()
        while True:
            if removal is not None and workflow.now() >= removal:
                await self._remove()
                return self._state
            if workflow.info().is_continue_as_new_suggested():
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(self._next_input())
            if self._wake_wanted:
                await self._wake()
                continue
            if self._pause_wanted:
                await self._pause()
                self._pause_wanted = False
                continue
            deadlines = [removal] if removal is not None else []
            if self._state == PreviewState.LIVE:
                deadlines.append(self._last_activity + timedelta(seconds=policy.idle_pause_s))
            timeout = max(min(deadlines) - workflow.now(), timedelta(0)) if deadlines else None
            woke = await self._wait(timeout)
            if woke:
                continue
            if self._state == PreviewState.LIVE and self._idle(policy.idle_pause_s):
                if policy.keep_awake and await self._run(
                    "stay_awake", StayAwakeInput(build_id=inp.build_id, newest=policy.keep_awake), bool, "Kept awake?"
                ):
                    self._last_activity = workflow.now()
                    continue
                await self._pause()

    async def _wait(self, timeout: timedelta | None) -> bool:
        """Until something asks for work (True) or the timeout passes (False)."""
        try:
            await workflow.wait_condition(
                lambda: self._wake_wanted or self._pause_wanted or workflow.info().is_continue_as_new_suggested(),
                timeout=timeout,
            )
            return True
        except TimeoutError:
            return False

    def _idle(self, idle_pause_s: float) -> bool:
        return workflow.now() - self._last_activity >= timedelta(seconds=idle_pause_s)

    def _removal_time(self) -> datetime | None:
        if not self._inp.policy.retention_s or not self._inp.ready_at:
            return None
        return datetime.fromisoformat(self._inp.ready_at) + timedelta(seconds=self._inp.policy.retention_s)

    def _may_retry(self) -> bool:
        if not self._failed_at:
            return True
        retry_at = datetime.fromisoformat(self._failed_at) + timedelta(seconds=self._inp.policy.retry_failed_s)
        return workflow.now() >= retry_at

    def _result(self) -> WakeResult:
        return WakeResult(
            state=self._state,
            sandbox_preview_url=self._url if self._state == PreviewState.LIVE else None,
            message=self._failure if self._state == PreviewState.FAILED else "",
            debug_id=self._debug_id if self._state == PreviewState.FAILED else "",
        )

    # --- transitions ---

    async def _record(self, state: str, *, woken: bool = False) -> None:
        self._state = state
        await workflow.execute_local_activity(
            "record_preview",
            PreviewChange(
                build_id=self._inp.build_id, state=state, sandbox_id=self._sandbox_id,
                sandbox_preview_url=self._url, woken_at=workflow.now().isoformat() if woken else "",
            ),
            summary=f"Preview {state}",
            **DB_WRITE,
        )
        workflow.set_current_details(f"**{state}** · sandbox `{self._sandbox_id or '-'}` · served {self._serve + 1}x")

    async def _pause(self) -> None:
        if self._sandbox_id is not None:
            try:
                paused = await self._run("pause_sandbox", self._sandbox_id, bool, "Pause the idle version")
            except ActivityError as err:
                if not host_lost(err):
                    raise
                paused = False  # its host is gone: the next wake serves it again elsewhere
            if not paused:  # stopped instead (or already gone): the next wake serves it again
                self._sandbox_id, self._host_queue = None, ""
        await self._record(PreviewState.PAUSED)

    async def _wake(self) -> None:
        await self._record(PreviewState.WAKING)
        try:
            try:
                resumed = self._sandbox_id is not None and await self._run(
                    "resume_sandbox", self._sandbox_id, bool, "Resume the version"
                )
            except ActivityError as err:
                if not host_lost(err):
                    raise
                resumed = False  # its host is gone: serve it again on another
            if not resumed:
                await self._serve_again()
            checks: ChecksResult = await self._run("start_and_check", self._sandbox_input(), ChecksResult)
            self._url = checks.preview_url
            self._failed_at = self._failure = self._debug_id = ""
            await self._record(PreviewState.LIVE, woken=True)
        except ActivityError as err:
            self._note_failure(err)
            await self._record(PreviewState.FAILED)
        finally:
            self._last_activity = workflow.now()
            self._wake_wanted = False

    async def _serve_again(self) -> None:
        """A new sandbox with the version's stored files: provision (upload), install, as in a build."""
        if self._files is None:
            self._files = await self._run("version_files", self._inp.build_id, CodeResult, "The version's files")
        self._serve += 1
        self._sandbox_id, self._host_queue = None, ""
        info: SandboxInfo = await self._run("provision_sandbox", self._sandbox_input(), SandboxInfo)
        self._sandbox_id, self._host_queue = info.sandbox_id, info.task_queue
        await self._run("install_dependencies", self._sandbox_input(), str)

    def _sandbox_input(self) -> SandboxInput:
        return SandboxInput(
            build_id=self._inp.build_id, project_id=self._inp.project_id, workspace_path=WORKSPACE_PATH,
            files=self._files.files if self._files is not None else [], sandbox_id=self._sandbox_id, serve=self._serve,
        )

    async def _run(self, name: str, arg: object, result_type: type, summary: str = ""):
        return await workflow.execute_activity(
            name, arg, result_type=result_type, summary=summary or f"Serve the version: {name}",
            **activity_options(name, self._host_queue),
        )

    def _note_failure(self, err: ActivityError) -> None:
        cause = err.cause
        kind = cause.type if isinstance(cause, ApplicationError) and cause.type else ""
        try:
            self._failure = ErrorKind(kind).friendly
        except ValueError:
            self._failure = FRIENDLY_DEFAULT
        self._debug_id = str(workflow.uuid4())
        self._failed_at = workflow.now().isoformat()
        workflow.logger.error(
            "version %s could not be served again (debug_id=%s): %s: %s",
            self._inp.build_id, self._debug_id, kind, cause.message if cause is not None else err.message,
        )

    async def _remove(self) -> None:
        try:
            await self._run("stop_serving", self._inp.build_id, int, "Retention: stop serving")
        except ActivityError as err:
            if not host_lost(err):
                raise  # (a lost host's sandboxes are reaped when it comes back: their builds are over)
        self._sandbox_id = None
        self._url = None
        await self._record(PreviewState.REMOVED)

    def _next_input(self) -> PreviewInput:
        return PreviewInput(
            build_id=self._inp.build_id, project_id=self._inp.project_id, policy=self._inp.policy,
            sandbox_id=self._sandbox_id, sandbox_preview_url=self._url, state=self._state,
            ready_at=self._inp.ready_at, serve=self._serve, failed_at=self._failed_at, failure=self._failure,
            debug_id=self._debug_id, task_queue=self._host_queue,
        )


__all__ = ["PreviewWorkflow"]
