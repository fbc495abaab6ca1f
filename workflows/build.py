"""BuildWorkflow: STARTING -> SCAFFOLD -> CODE -> DEPS -> CHECKS -> READY, durably.

Deterministic orchestration only: activities are called by name (no activity, DB or SDK imports),
time is workflow.now(), the debug_id is workflow.uuid4().
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey
from temporalio.exceptions import ActivityError, ApplicationError, FailureError, TimeoutType
from temporalio.exceptions import TimeoutError as ActivityTimeout
from temporalio.workflow import ActivityCancellationType, ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    # The DTO modules by name: the sandbox resolves a dataclass's annotations in the module defining it.
    from genloop.errors import FRIENDLY_DEFAULT, PERMANENT_ERROR_TYPES, ErrorKind
    from workflows.stages import Stage, is_allowed
    from workflows.types.build import (
        CANCEL_SIGNAL,
        STATUS_QUERY,
        WORKFLOW_NAME,
        AttemptInput,
        BuildRequest,
        BuildResult,
        BuildStatus,
        CancelRequest,
        ChecksResult,
        CodeRequest,
        CodeResult,
        FailureInfo,
        FileManifestEntry,
        FinishInput,
        FinishResult,
        KillSandboxInput,
        PrepareChangeInput,
        PreparedChange,
        SandboxInfo,
        SandboxInput,
        ScaffoldState,
        StartInput,
        SyncFilesInput,
        SyncFilesResult,
        Transition,
        TransitionInput,
    )
    from workflows.types.preview import (
        PREVIEW_WORKFLOW_NAME,
        PreviewInput,
        preview_workflow_id,
    )

BUILD_STAGE = SearchAttributeKey.for_keyword("BuildStage")
PROJECT_ID = SearchAttributeKey.for_keyword("ProjectId")
BUILD_VERSION = SearchAttributeKey.for_keyword("BuildVersion")
SEARCH_ATTRIBUTES = (BUILD_STAGE, PROJECT_ID, BUILD_VERSION)

WORKSPACE_PATH = "/home/user/project"
FIX_LOOP_PATCH = "fix-loop"
PREVIEW_PATCH = "preview-lifecycle"  # READY versions get a PreviewWorkflow
HOST_FAILOVER_PATCH = "host-failover"  # a build whose sandbox host is lost moves to another host
# STARTING and SCAFFOLD in one local write; ProjectId rides on the first BuildStage upsert and
# BuildVersion on READY's (a local activity, a transaction and 3 upserts fewer per build).
ONE_START_WRITE_PATCH = "one-start-write"
# ...and a new app's SCAFFOLD work (the runner's initial state: pure, no I/O) runs in that write's
# local activity: an activity, a workflow task and 6 history events fewer per build. CODE then
# follows in the same workflow task, so SCAFFOLD's search-attribute upsert (which no one could see:
# the task's commands apply together) is left to CODE's. Implies the one-start-write path; checked
# first, so a new history carries this patch's marker only.
START_SCAFFOLDS_PATCH = "start-scaffolds"
# Activities that touch a sandbox run on its host's queue; nobody polling it for this long means the
# host (and its worker) is gone.
HOST_SCHEDULE_TO_START = timedelta(seconds=5)
# Stages whose transition the stage's first activity records (ScaffoldState.transitions_in_activities).
DEFERRED_STAGES = frozenset({Stage.CODE, Stage.DEPS, Stage.CHECKS})
HOST_ROUTED = frozenset(
    {
        "install_dependencies",
        "start_and_check",
        "sync_sandbox_files",
        "kill_build_sandboxes",
        "pause_sandbox",
        "resume_sandbox",
        "stop_serving",
    }
)
# What the fix loop repairs: the app's own failures. Infrastructure errors retry instead.
FIXABLE_KINDS = frozenset({ErrorKind.APP_CHECK_FAILED.value, ErrorKind.DEPENDENCY_INSTALL_FAILED.value})


def _retry(max_attempts: int, max_interval_s: float = 30) -> RetryPolicy:
    return RetryPolicy(
        initial_interval=timedelta(seconds=1),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=max_interval_s),
        maximum_attempts=max_attempts,
        non_retryable_error_types=list(PERMANENT_ERROR_TYPES),
    )


# Short DB writes: local activities, retried until the database is back (bounded by schedule_to_close).
DB_WRITE = dict(
    start_to_close_timeout=timedelta(seconds=15),
    schedule_to_close_timeout=timedelta(minutes=10),
    retry_policy=_retry(max_attempts=0, max_interval_s=5),
)
_LONG = dict(cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED)
# Activities on a sandbox host heartbeat every 2 s (the worker sends them on at that rate:
# genloop.cli.worker): 8 s of silence means their worker is gone (then the retry's
# HOST_SCHEDULE_TO_START on the dead host's queue moves the build; bench hosts times it).
HOST_HEARTBEAT_TIMEOUT = timedelta(seconds=8)
ACTIVITY_OPTIONS: dict[str, dict] = {
    "create_initial_state": dict(start_to_close_timeout=timedelta(seconds=30), retry_policy=_retry(5)),
    "prepare_change": dict(start_to_close_timeout=timedelta(minutes=2), retry_policy=_retry(5)),
    "sync_sandbox_files": dict(
        start_to_close_timeout=timedelta(minutes=3),
        heartbeat_timeout=HOST_HEARTBEAT_TIMEOUT,
        retry_policy=_retry(6),
        **_LONG,
    ),
    "generate_code": dict(
        start_to_close_timeout=timedelta(minutes=10),
        heartbeat_timeout=timedelta(seconds=20),
        retry_policy=_retry(6),
        **_LONG,
    ),
    "provision_sandbox": dict(
        start_to_close_timeout=timedelta(minutes=3),
        heartbeat_timeout=timedelta(seconds=20),
        retry_policy=_retry(6),
        **_LONG,
    ),
    "install_dependencies": dict(
        start_to_close_timeout=timedelta(minutes=20),
        heartbeat_timeout=HOST_HEARTBEAT_TIMEOUT,
        retry_policy=_retry(4),
        **_LONG,
    ),
    "start_and_check": dict(
        start_to_close_timeout=timedelta(minutes=3),
        heartbeat_timeout=HOST_HEARTBEAT_TIMEOUT,
        retry_policy=_retry(4),
        **_LONG,
    ),
    "kill_build_sandboxes": dict(
        start_to_close_timeout=timedelta(seconds=60), retry_policy=_retry(6, max_interval_s=10)
    ),
    # The preview workflow's (workflows/preview.py)
    "version_files": dict(start_to_close_timeout=timedelta(minutes=1), retry_policy=_retry(6)),
    "pause_sandbox": dict(start_to_close_timeout=timedelta(minutes=2), retry_policy=_retry(6)),
    "resume_sandbox": dict(start_to_close_timeout=timedelta(minutes=2), retry_policy=_retry(6)),
    "stop_serving": dict(start_to_close_timeout=timedelta(minutes=2), retry_policy=_retry(6)),
    "stay_awake": dict(start_to_close_timeout=timedelta(seconds=30), retry_policy=_retry(6)),
}


def activity_options(name: str, host_queue: str = "") -> dict:
    """The options of one activity; an activity that touches a sandbox goes to its host's queue."""
    options = dict(ACTIVITY_OPTIONS[name])
    if host_queue and name in HOST_ROUTED:
        options.update(task_queue=host_queue, schedule_to_start_timeout=HOST_SCHEDULE_TO_START)
    return options


def host_lost(err: ActivityError) -> bool:
    """Nobody polled the sandbox host's queue in time: its host and worker are gone."""
    return isinstance(err.cause, ActivityTimeout) and err.cause.type == TimeoutType.SCHEDULE_TO_START


class _Cancelled(Exception):
    """Raised inside the pipeline when a cancel arrived between activities."""


@workflow.defn(name=WORKFLOW_NAME)
class BuildWorkflow:
    # bench levers runs subclasses with False: the start as before START_SCAFFOLDS_PATCH, or as
    # before ONE_START_WRITE_PATCH (both False).
    start_scaffolds = True
    one_start_write = True

    @workflow.init
    def __init__(self, req: BuildRequest) -> None:
        self._req = req
        self._status = BuildStatus(
            build_id=req.build_id, project_id=req.project_id, stage=Stage.QUEUED.value, label=Stage.QUEUED.label
        )
        self._stage = Stage.QUEUED
        self._cancel_reason: str | None = None
        self._pipeline: asyncio.Task | None = None
        self._goal = req.goal
        self._host_queue = ""  # the sandbox host's queue, once the build has a sandbox on a local host
        self._fix_stopped = ""  # why the fix loop gave up, for the failure detail
        # With ScaffoldState.transitions_in_activities: CODE/DEPS/CHECKS entered but not yet written;
        # the next activity that can (its input has `entered`) or the next local write records them.
        self._deferred: list[TransitionInput] | None = None
        self._one_start_write = False  # ONE_START_WRITE_PATCH, decided first thing in run()
        self._start_scaffolds = False  # START_SCAFFOLDS_PATCH, likewise
        self._project_attribute_pending = False  # ProjectId not upserted yet (with the patch)

    # --- interface ---

    @workflow.query(name=STATUS_QUERY)
    def status(self) -> BuildStatus:
        return self._status

    @workflow.signal(name=CANCEL_SIGNAL)
    def cancel(self, req: CancelRequest) -> None:
        if self._stage.terminal or self._cancel_reason is not None:
            return
        self._cancel_reason = req.reason or "cancelled"
        if self._pipeline is not None and not self._pipeline.done():
            self._pipeline.cancel()

    @workflow.run
    async def run(self, req: BuildRequest) -> BuildResult:
        self._start_scaffolds = self.start_scaffolds and workflow.patched(START_SCAFFOLDS_PATCH)
        self._one_start_write = self._start_scaffolds or (
            self.one_start_write and workflow.patched(ONE_START_WRITE_PATCH)
        )
        self._project_attribute_pending = self._one_start_write
        if not self._one_start_write:
            workflow.upsert_search_attributes([PROJECT_ID.value_set(req.project_id)])
        self._pipeline = asyncio.create_task(self._build(req))
        try:
            return await self._pipeline
        except (asyncio.CancelledError, _Cancelled):
            workflow_cancelled = self._cancel_reason is None
            if workflow_cancelled:
                self._cancel_reason = "the workflow was cancelled"
            result = await self._finish_cancelled()
            if workflow_cancelled:
                raise
            return result
        except ActivityError as err:
            if self._cancel_reason is not None:
                return await self._finish_cancelled()
            raise await self._fail(err.cause, err.message) from None
        except ApplicationError as err:
            # A local activity's failure arrives unwrapped: the start write's, which since
            # START_SCAFFOLDS_PATCH also does SCAFFOLD's work (histories before it end as they did).
            if not self._start_scaffolds:
                raise
            if self._cancel_reason is not None:
                return await self._finish_cancelled()
            raise await self._fail(err, err.message) from None

    # --- the pipeline ---

    async def _build(self, req: BuildRequest) -> BuildResult:
        scaffolded: ScaffoldState | None = None
        if self._one_start_write:
            scaffolded = await self._start(req)
        else:
            await self._enter(Stage.STARTING)
            await self._enter(Stage.SCAFFOLD)
        if req.kind == "change":
            prepared: PreparedChange = await self._activity(
                "prepare_change",
                PrepareChangeInput(
                    build_id=req.build_id,
                    project_id=req.project_id,
                    base_build_id=req.base_build_id,
                    edits=req.edits,
                    note=req.note,
                ),
                PreparedChange,
            )
            state, self._goal = prepared.scaffold, prepared.goal
            self._defer_if(state)
            await self._enter(Stage.CODE)
            if req.change:
                code = await self._code(state, "change", prepared.code, change=req.change)
            else:
                code = prepared.code
                what = "restored" if not req.edits else "edited"
                self._status.message = (
                    f"{len(code.files)} files {what} from {prepared.base_version or prepared.base_build_id}"
                )
        else:
            state = scaffolded or await self._activity("create_initial_state", self._scaffold(req), ScaffoldState)
            self._defer_if(state)
            await self._enter(Stage.CODE)
            code = await self._code(state, "new_app", None)
            self._status.message = f"{len(code.files)} files written"

        info, checks = await self._deps_and_checks(req, state, code)

        self._check_not_cancelled()
        await self._flush_deferred()
        finished: FinishResult = await workflow.execute_local_activity(
            "finish_build",
            FinishInput(
                build_id=req.build_id,
                project_id=req.project_id,
                sandbox_id=info.sandbox_id,
                preview_url=checks.preview_url,
                workspace_path=info.workspace_path,
                at=workflow.now().isoformat(),
            ),
            result_type=FinishResult,
            summary="Allocate version, record READY",
            **DB_WRITE,
        )
        self._status.build_version = finished.build_version
        version = [BUILD_VERSION.value_set(finished.build_version)]
        if self._one_start_write:
            self._set_stage(Stage.READY, Stage.READY.label, also=version)
        else:
            self._set_stage(Stage.READY, Stage.READY.label)
            workflow.upsert_search_attributes(version)
        if finished.version_url and finished.preview is not None and workflow.patched(PREVIEW_PATCH):
            # The version's life goes on in a workflow of its own: idle pause, wake, retention.
            await workflow.start_child_workflow(
                PREVIEW_WORKFLOW_NAME,
                PreviewInput(
                    build_id=req.build_id,
                    project_id=req.project_id,
                    policy=finished.preview,
                    sandbox_id=info.sandbox_id,
                    sandbox_preview_url=checks.preview_url,
                    ready_at=workflow.now().isoformat(),
                    task_queue=self._host_queue,
                ),
                id=preview_workflow_id(req.build_id),
                parent_close_policy=ParentClosePolicy.ABANDON,
                static_summary=f"{req.project_id} · {finished.build_version} · {finished.version_url}",
            )
        return BuildResult(
            status=Stage.READY.value,
            sandbox_id=info.sandbox_id,
            preview_url=checks.preview_url,
            version_url=finished.version_url or None,
            build_version=finished.build_version,
            workspace_path=info.workspace_path,
            message=Stage.READY.label,
        )

    async def _code(
        self,
        state: ScaffoldState,
        kind: str,
        current: CodeResult | None,
        *,
        change: str = "",
        failure: FailureInfo | None = None,
    ) -> CodeResult:
        code: CodeResult = await self._activity(
            "generate_code",
            CodeRequest(
                build_id=self._req.build_id,
                project_id=self._req.project_id,
                goal=self._goal,
                runner=state.runner,
                kind=kind,
                stack=self._req.stack,
                files=current.files if current is not None else [],
                change=change,
                failure=failure,
                attempt=self._status.attempt,
            ),
            CodeResult,
        )
        return code

    async def _deps_and_checks(
        self, req: BuildRequest, state: ScaffoldState, code: CodeResult
    ) -> tuple[SandboxInfo, ChecksResult]:
        """DEPS and CHECKS; when the app's own code fails them and the runner can fix code, ask it for
        a fix, put the fixed files into the same sandbox and check again (bounded)."""
        self._status.max_attempts = 1 + state.fix_attempts
        info: SandboxInfo | None = None
        sandbox_input = SandboxInput(
            build_id=req.build_id, project_id=req.project_id, workspace_path=WORKSPACE_PATH, files=code.files
        )
        failures: list[str] = []
        installed = False
        synced_from: list[FileManifestEntry] | None = None  # a fix's files still to put into the sandbox
        while True:
            sandbox_input.attempt = self._status.attempt  # its log lines' attempt, without a job read
            try:
                await self._enter(Stage.DEPS)
                if info is None:
                    info = await self._activity("provision_sandbox", sandbox_input, SandboxInfo)
                    self._status.sandbox_id, self._status.sandbox_host = info.sandbox_id, info.host or None
                    self._status.workspace_path = info.workspace_path
                    self._host_queue = info.task_queue
                    sandbox_input.sandbox_id = info.sandbox_id
                elif synced_from is not None:
                    synced: SyncFilesResult = await self._activity(
                        "sync_sandbox_files",
                        SyncFilesInput(
                            build_id=req.build_id,
                            sandbox_id=info.sandbox_id,
                            workspace_path=WORKSPACE_PATH,
                            old_files=synced_from,
                            new_files=code.files,
                        ),
                        SyncFilesResult,
                    )
                    sandbox_input.reinstall = sandbox_input.reinstall or synced.dependencies_changed
                    synced_from = None
                if not installed or sandbox_input.reinstall:
                    await self._activity("install_dependencies", sandbox_input, str)
                    installed, sandbox_input.reinstall = True, False
                await self._enter(Stage.CHECKS)
                checks: ChecksResult = await self._activity("start_and_check", sandbox_input, ChecksResult)
                self._status.preview_url = checks.preview_url
                return info, checks
            except ActivityError as err:
                if host_lost(err) and workflow.patched(HOST_FAILOVER_PATCH):
                    # Its host and worker are gone: a new sandbox elsewhere, from the stored files.
                    workflow.logger.warning(
                        "build %s: sandbox host %s lost; moving to another host",
                        req.build_id,
                        info.host if info else "?",
                    )
                    info, installed, synced_from, self._host_queue = None, False, None, ""
                    sandbox_input.sandbox_id, sandbox_input.serve = None, sandbox_input.serve + 1
                    self._status.message = "The sandbox host was lost: moving to another one"
                    continue
                failure = self._fixable(err, state)
                if failure is None or not workflow.patched(FIX_LOOP_PATCH):
                    raise
                if failure.digest in failures:
                    self._fix_stopped = "the same failure repeated after a fix"
                    raise
                failures.append(failure.digest)
                fixed = await self._fix(state, code, failure)
                if fixed is None:
                    self._fix_stopped = "the runner returned no change"
                    raise
                synced_from = code.files if info is not None else None
                code = fixed
                sandbox_input.files = fixed.files
                sandbox_input.reinstall = failure.stage == Stage.DEPS.value

    def _fixable(self, err: ActivityError, state: ScaffoldState) -> FailureInfo | None:
        """The failure to show the runner, if this is the app's own failure and attempts remain."""
        cause = err.cause
        if self._cancel_reason is not None or not state.can_fix:
            return None
        if self._status.attempt >= self._status.max_attempts:
            self._fix_stopped = f"{self._status.max_attempts} attempts used"
            return None
        if not isinstance(cause, ApplicationError) or cause.type not in FIXABLE_KINDS or not cause.details:
            return None
        details = cause.details[0] if isinstance(cause.details[0], dict) else {}
        failure = details.get("failure")
        if not isinstance(failure, dict):
            return None
        return FailureInfo(
            stage=str(failure.get("stage", "")),
            command=str(failure.get("command", "")),
            exit_code=failure.get("exit_code"),
            output=str(failure.get("output", "")),
            digest=str(failure.get("digest") or failure.get("output", "")),
        )

    async def _fix(self, state: ScaffoldState, code: CodeResult, failure: FailureInfo) -> CodeResult | None:
        """One fix attempt: record why the last attempt failed, go back to CODE and ask for a fix.
        None when the runner changed nothing (the loop stops)."""
        failed_attempt = self._status.attempt
        await self._flush_deferred()
        await workflow.execute_local_activity(
            "record_attempt",
            AttemptInput(
                build_id=self._req.build_id,
                attempt=failed_attempt,
                max_attempts=self._status.max_attempts,
                failure=failure,
                at=workflow.now().isoformat(),
            ),
            summary=f"Record attempt {failed_attempt}",
            **DB_WRITE,
        )
        self._status.attempt = failed_attempt + 1
        await self._enter(
            Stage.CODE, message=f"Fixing the app (attempt {self._status.attempt} of {self._status.max_attempts})"
        )
        fixed = await self._code(state, "fix", code, failure=failure)
        return fixed if fixed.changed else None

    async def _activity(self, name: str, arg: object, result_type: type):
        carried = self._deferred if self._deferred and hasattr(arg, "entered") else []
        if carried:
            arg.entered, self._deferred = carried, []  # type: ignore[attr-defined]
        try:
            return await workflow.execute_activity(
                name,
                arg,
                result_type=result_type,
                summary=self._stage.label,
                **activity_options(name, self._host_queue),
            )
        except (ActivityError, asyncio.CancelledError):
            if carried:  # recorded or not: the next write records them again (a no-op when they are)
                self._deferred = carried + (self._deferred or [])
            raise
        finally:
            if carried:
                arg.entered = []  # type: ignore[attr-defined]

    def _defer_if(self, state: ScaffoldState) -> None:
        if state.transitions_in_activities:  # the worker says so; histories before it carry False
            self._deferred = []

    def _check_not_cancelled(self) -> None:
        if self._cancel_reason is not None:
            raise _Cancelled()

    async def _start(self, req: BuildRequest) -> ScaffoldState | None:
        """STARTING and SCAFFOLD in one local write (the job row and both transitions), shown with
        one upsert: SCAFFOLD's work starts after both are persisted. With START_SCAFFOLDS_PATCH a new
        app's SCAFFOLD work follows in the same local activity, which returns its state."""
        self._check_not_cancelled()
        transition = self._transition(Stage.STARTING, Stage.STARTING.label, then=Stage.SCAFFOLD.value)
        state: ScaffoldState | None = None
        if not self._start_scaffolds:
            await workflow.execute_local_activity(
                "record_transition", transition, summary="Record STARTING, SCAFFOLD", **DB_WRITE
            )
        else:
            try:
                state = await workflow.execute_local_activity(
                    "start_build",
                    StartInput(transition=transition, scaffold=None if req.kind == "change" else self._scaffold(req)),
                    result_type=ScaffoldState,
                    summary="Record STARTING, SCAFFOLD; scaffold",
                    **DB_WRITE,
                )
            except (ActivityError, ApplicationError) as err:
                cause = err.cause if isinstance(err, ActivityError) else err
                if isinstance(cause, ApplicationError) and cause.type == ErrorKind.INVALID_INPUT.value:
                    # SCAFFOLD's work refused the request: both stages were written before it ran.
                    self._show_started(upsert_scaffold=True)
                raise
        self._show_started(upsert_scaffold=state is None)
        return state

    def _show_started(self, *, upsert_scaffold: bool) -> None:
        self._set_stage(Stage.STARTING, Stage.STARTING.label, upsert=False)
        self._set_stage(Stage.SCAFFOLD, Stage.SCAFFOLD.label, upsert=upsert_scaffold)

    def _scaffold(self, req: BuildRequest) -> ScaffoldState:
        return ScaffoldState(
            session_id=req.build_id,
            project_path=WORKSPACE_PATH,
            goal=req.goal,
            project_id=req.project_id,
            runner=req.runner,
        )

    async def _enter(self, stage: Stage, message: str | None = None, **fields) -> None:
        """Persist the stage before its work starts, then show it in the query and the Web UI. A
        deferred stage is persisted by its first activity, before that activity's work."""
        self._check_not_cancelled()
        if self._deferred is not None and stage in DEFERRED_STAGES and not fields:
            self._deferred.append(self._transition(stage, message or stage.label))
            self._set_stage(stage, message or stage.label)
            return
        await self._record(stage, message or stage.label, **fields)

    def _transition(self, stage: Stage, message: str, **fields) -> TransitionInput:
        info = workflow.info()
        return TransitionInput(
            build_id=self._req.build_id,
            stage=stage.value,
            message=message,
            at=workflow.now().isoformat(),
            project_id=self._req.project_id,
            goal=self._goal,
            workflow_id=info.workflow_id,
            run_id=info.run_id,
            **fields,
        )

    async def _record(self, stage: Stage, message: str, **fields) -> None:
        await self._flush_deferred()
        await workflow.execute_local_activity(
            "record_transition",
            self._transition(stage, message, **fields),
            summary=f"Record {stage.value}",
            **DB_WRITE,
        )
        self._set_stage(stage, message)

    async def _flush_deferred(self) -> None:
        """Deferred stages no activity has carried yet, written before any other write of the build."""
        while self._deferred:
            transition = self._deferred.pop(0)
            await workflow.execute_local_activity(
                "record_transition", transition, summary=f"Record {transition.stage}", **DB_WRITE
            )

    def _set_stage(self, stage: Stage, message: str, *, upsert: bool = True, also: list | None = None) -> None:
        if stage != self._stage and not is_allowed(self._stage, stage):
            # A bug in this file, not a runtime condition: fail loudly and permanently.
            raise ApplicationError(f"illegal transition {self._stage.value} -> {stage.value}", non_retryable=True)
        self._stage = stage
        self._status.stage = stage.value
        self._status.label = stage.label
        self._status.message = message
        self._status.transitions.append(Transition(stage=stage.value, at=workflow.now().isoformat(), message=message))
        if upsert:
            updates = [BUILD_STAGE.value_set(stage.value), *(also or [])]
            if self._project_attribute_pending:
                updates.append(PROJECT_ID.value_set(self._req.project_id))
                self._project_attribute_pending = False
            workflow.upsert_search_attributes(updates)
        attempt = (
            f" (attempt {self._status.attempt} of {self._status.max_attempts})" if self._status.attempt > 1 else ""
        )
        details = f"**{stage.label}**{attempt} {message if message != stage.label else ''}".strip()
        if self._status.sandbox_id:  # where it runs, for the Web UI's details
            host = f" on host `{self._status.sandbox_host}`" if self._status.sandbox_host else ""
            details += f" · sandbox `{self._status.sandbox_id}`{host}"
        workflow.set_current_details(details)

    # --- endings ---

    async def _kill_sandboxes(self) -> None:
        if self._stage not in (Stage.DEPS, Stage.CHECKS) and not self._status.sandbox_id:
            return  # no sandbox is created before DEPS
        try:
            await self._activity(
                "kill_build_sandboxes",
                KillSandboxInput(build_id=self._req.build_id, sandbox_id=self._status.sandbox_id),
                int,
            )
        except ActivityError as err:
            # The orphan sweep (metadata) catches what this could not kill; the ending still records.
            workflow.logger.warning("could not kill sandboxes of build %s: %s", self._req.build_id, err.cause)

    async def _finish_cancelled(self) -> BuildResult:
        await self._kill_sandboxes()
        reason = self._cancel_reason or "cancelled"
        await self._record(Stage.CANCELLED, reason)
        return BuildResult(
            status=Stage.CANCELLED.value,
            sandbox_id=self._status.sandbox_id,
            workspace_path=self._status.workspace_path,
            message=reason,
        )

    async def _fail(self, cause: BaseException | None, message: str) -> ApplicationError:
        kind_name = cause.type if isinstance(cause, ApplicationError) and cause.type else "Unknown"
        try:
            friendly = ErrorKind(kind_name).friendly
        except ValueError:
            friendly = FRIENDLY_DEFAULT
        detail = f"{kind_name} in {self._stage.value}: {cause.message if isinstance(cause, FailureError) else message}"
        if self._fix_stopped:
            detail = f"{detail}\n(fix loop stopped: {self._fix_stopped})"
        debug_id = str(workflow.uuid4())
        info = workflow.info()
        workflow.logger.error(
            "build %s failed (debug_id=%s, workflow_id=%s, run_id=%s): %s",
            self._req.build_id,
            debug_id,
            info.workflow_id,
            info.run_id,
            detail,
        )
        self._status.debug_id = debug_id
        self._status.error_message = friendly
        await self._kill_sandboxes()
        await self._record(Stage.FAILED, friendly, error_message=friendly, error_detail=detail, debug_id=debug_id)
        result = BuildResult(
            status=Stage.FAILED.value,
            sandbox_id=self._status.sandbox_id,
            workspace_path=self._status.workspace_path,
            debug_id=debug_id,
            message=friendly,
        )
        return ApplicationError(f"{friendly} (debug_id={debug_id})", result, type=kind_name, non_retryable=True)


__all__ = ["BuildWorkflow", "SEARCH_ATTRIBUTES"]
