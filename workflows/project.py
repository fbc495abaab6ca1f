"""ProjectWorkflow: one long-lived workflow per project that builds change requests in order.

A change arrives as the `submit` update (sent with update-with-start, so the first change also
starts this workflow); its validator refuses a malformed request before anything is recorded. The
queue is worked off one change at a time, each as a child BuildWorkflow whose workflow id is the
change's build id. A change that names no base builds on the result of the change before it, or,
when that one did not reach READY, on the project's newest READY version (the child's SCAFFOLD
resolves it and the note says why). New apps (`goal` builds) do not come through here: they do not
wait. The workflow continues-as-new when Temporal suggests it, between changes, carrying the queue.

Deterministic orchestration only, like workflows/build.py.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError, ChildWorkflowError, WorkflowAlreadyStartedError
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    # The DTO modules by name: the sandbox resolves a dataclass's annotations in the module defining it.
    from workflows.build import BuildWorkflow
    from workflows.stages import Stage
    from workflows.types.build import (
        BuildRequest,
        BuildResult,
        TransitionInput,
    )
    from workflows.types.project import (
        CANCEL_PENDING_UPDATE,
        PROJECT_STATUS_QUERY,
        PROJECT_WORKFLOW_NAME,
        SUBMIT_UPDATE,
        CancelPendingRequest,
        ChangeRequest,
        PreviousChange,
        ProjectInput,
        ProjectStatus,
        SubmitResult,
    )

MAX_PENDING = 100  # changes waiting per project; more is a client bug or abuse, refused up front
MAX_SEEN = 1000  # build ids remembered for deduplication across continue-as-new

_RECORD = dict(
    start_to_close_timeout=timedelta(seconds=15),
    schedule_to_close_timeout=timedelta(minutes=10),
    retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=5)),
)


@workflow.defn(name=PROJECT_WORKFLOW_NAME)
class ProjectWorkflow:
    @workflow.init
    def __init__(self, inp: ProjectInput) -> None:
        self._project_id = inp.project_id
        self._task_queue = inp.task_queue
        self._pending: list[ChangeRequest] = list(inp.pending)
        self._seen: dict[str, None] = dict.fromkeys(inp.seen)
        self._previous: PreviousChange | None = inp.previous
        self._running: str | None = None

    # --- interface ---

    @workflow.update(name=SUBMIT_UPDATE)
    def submit(self, req: ChangeRequest) -> SubmitResult:
        if req.build_id not in self._seen:  # a retried submit (same build id) is accepted once
            self._seen[req.build_id] = None
            while len(self._seen) > MAX_SEEN:
                del self._seen[next(iter(self._seen))]
            self._pending.append(req)
        return SubmitResult(build_id=req.build_id, position=self._position(req.build_id))

    @submit.validator
    def _validate_submit(self, req: ChangeRequest) -> None:
        if not req.build_id:
            raise ValueError("a change needs a build id")
        if req.build_id not in self._seen and len(self._pending) >= MAX_PENDING:
            raise ValueError(f"project {self._project_id} already has {MAX_PENDING} changes waiting")
        if not (req.change or req.edits or req.base_build_id):
            raise ValueError("a change needs a change text, edits, or a base to restore")

    @workflow.update(name=CANCEL_PENDING_UPDATE)
    async def cancel_pending(self, req: CancelPendingRequest) -> bool:
        """Drop a change that has not started; False when it is not waiting (it runs or ran)."""
        for index, pending in enumerate(self._pending):
            if pending.build_id == req.build_id:
                del self._pending[index]
                await workflow.execute_local_activity(
                    "record_transition",
                    TransitionInput(
                        build_id=req.build_id, stage=Stage.CANCELLED.value, message=req.reason,
                        at=workflow.now().isoformat(), project_id=self._project_id,
                    ),
                    summary=f"Record {req.build_id} cancelled before it started",
                    **_RECORD,
                )
                return True
        return False

    @workflow.query(name=PROJECT_STATUS_QUERY)
    def status(self) -> ProjectStatus:
        return ProjectStatus(
            project_id=self._project_id, running=self._running, pending=[r.build_id for r in self._pending]
        )

    # --- the queue ---

    @workflow.run
    async def run(self, inp: ProjectInput) -> None:
        while True:
            await workflow.wait_condition(lambda: bool(self._pending) or workflow.info().is_continue_as_new_suggested())
            if workflow.info().is_continue_as_new_suggested():
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(
                    ProjectInput(
                        project_id=self._project_id,
                        task_queue=self._task_queue,
                        pending=self._pending,
                        seen=list(self._seen),
                        previous=self._previous,
                    )
                )
            await self._build(self._pending.pop(0))

    async def _build(self, req: ChangeRequest) -> None:
        self._running = req.build_id
        base, note = req.base_build_id, ""
        if base is None and self._previous is not None:
            if self._previous.status == Stage.READY.value:
                base = self._previous.build_id
            else:
                note = (f"The change before this one ({self._previous.build_id}) did not become ready "
                        f"({self._previous.status}); this one builds on the newest ready version instead.")
        try:
            result: BuildResult = await workflow.execute_child_workflow(
                BuildWorkflow.run,
                BuildRequest(
                    build_id=req.build_id, project_id=self._project_id, goal="", runner=req.runner, kind="change",
                    base_build_id=base, change=req.change, edits=req.edits, stack=req.stack, note=note,
                ),
                id=req.build_id,
                task_queue=self._task_queue or workflow.info().task_queue,
                # A build outlives a terminated or reset project workflow; the next run reads the DB.
                parent_close_policy=ParentClosePolicy.ABANDON,
                static_summary=req.summary or None,
                static_details=f"**Project** `{self._project_id}` · change · **Runner** `{req.runner}`"
                + (f" · **Base** `{base}`" if base else ""),
            )
            status = result.status
        except ChildWorkflowError as err:
            cause = err.cause
            status = Stage.FAILED.value
            if isinstance(cause, ApplicationError):
                workflow.logger.info("change %s of %s failed: %s", req.build_id, self._project_id, cause.message)
        except WorkflowAlreadyStartedError:
            # Built by an earlier run of this workflow (reset or terminated): its outcome is in the
            # database, not here, so the next change falls back to the newest READY version.
            status = "unknown"
        self._previous = PreviousChange(build_id=req.build_id, status=status)
        self._running = None

    def _position(self, build_id: str) -> int:
        if build_id == self._running:
            return 0
        for index, pending in enumerate(self._pending):
            if pending.build_id == build_id:
                return index + 1 + (1 if self._running else 0)
        return 0


__all__ = ["ProjectWorkflow"]
