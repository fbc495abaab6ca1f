"""Builds: trigger (a new app, or a change on the project's line), read, follow, cancel, list.

Reads come from the database (activities persist every transition); Temporal is only called to
start, submit to and signal workflows."""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from starlette.endpoints import HTTPEndpoint
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from temporalio.client import WithStartWorkflowOperation, WorkflowUpdateFailedError
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from activities.edits import safe_relative_path
from activities.runners import Capability, capabilities_of
from api import reading as read
from api.errors import UNAVAILABLE_MESSAGE, ApiError
from api.feed import SSE_HEADERS, Delivery, EventStreamResponse, encode_event, encode_log, event_id, parse_event_id
from api.routes.common import (
    CHANGE_STORED_CHARS,
    DETAILS_GOAL_BUDGET,
    SUMMARY_BUDGET,
    TEMPORAL_RPC_TIMEOUT,
    already_finished,
    clip,
    digest,
    get_job,
    json_response,
    keyed_build_id,
    links,
    services,
    summary_fields,
)
from api.schemas import (
    IDEMPOTENCY_KEY_PATTERN,
    PAGE_SIZE_DEFAULT,
    PAGE_SIZE_MAX,
    AttemptOut,
    BuildDetail,
    BuildPage,
    BuildRef,
    BuildSummary,
    CancelBuild,
    ErrorCode,
    TransitionOut,
    fullmatch,
)
from api.services import Services
from genloop.errors import ErrorKind, GenloopError
from persistence.models import Job
from persistence.repository import MAX_LOG_PAGE
from workflows.build import BUILD_STAGE, PROJECT_ID
from workflows.project import ProjectWorkflow
from workflows.stages import Stage
from workflows.types import (
    CANCEL_SIGNAL,
    WORKFLOW_NAME,
    BuildRequest,
    CancelPendingRequest,
    CancelRequest,
    ChangeRequest,
    FileEdit,
    ProjectInput,
    SubmitResult,
    project_workflow_id,
)

log = logging.getLogger("genloop.api")

_IDEMPOTENCY_KEY = fullmatch(IDEMPOTENCY_KEY_PATTERN)
_LAST_EVENT_ID = fullmatch("^[0-9]{1,9}$")
_LAST_EVENT_ID_WITH_LOGS = fullmatch("^[0-9]{1,9}([.][0-9]{1,9})?$")
_EVENTS_PARAMS = frozenset({"logs"})
_BOOLEAN = {"1": True, "true": True, "0": False, "false": False}
_LIST_PARAMS = frozenset({"limit", "cursor"})


# --- trigger --------------------------------------------------------------------------------------


async def trigger_build(request: Request) -> Response:
    svc = services(request)
    project_id = read.path_id(request, "project_id")
    key = read.header(request, "idempotency-key", _IDEMPOTENCY_KEY, "1-255 visible ASCII characters")
    body = await read.shaped_body(request, svc.shapes, svc.settings.api.max_edit_body_bytes)
    # A key maps to one build id, so a retried POST finds the build its first attempt made.
    build_id = keyed_build_id(project_id, key) if key is not None else f"b-{uuid.uuid4().hex}"
    if isinstance(body, svc.shapes.new_app):
        job = await _start_new_app(svc, project_id, build_id, key, body)
    else:
        job = await _submit_change(svc, project_id, build_id, key, body)
    ref = BuildRef(build_id=job.id, project_id=job.project_id, status=job.stage, links=links(svc, job))
    return json_response(ref, 202, headers={"Location": ref.links.self_})


async def _create_row(svc: Services, build_id: str, request_digest: str, **columns: Any) -> Job:
    """The row first: a build the database cannot record never starts, so a 503 here hides nothing.
    A repeated Idempotency-Key finds its row; with a different body that is a 409."""
    job = await svc.repo.create_job(build_id, workflow_id=build_id, request_digest=request_digest, **columns)
    if job.request_digest not in (None, request_digest):
        raise ApiError(409, ErrorCode.CONFLICT, "this Idempotency-Key was already used with a different request body")
    return job


async def _start_new_app(svc: Services, project_id: str, build_id: str, key: str | None, body: Any) -> Job:
    goal, runner, stack = body.goal, body.runner, body.stack
    job = await _create_row(
        svc, build_id, digest({"goal": goal, "runner": runner, "stack": stack}),
        project_id=project_id, goal=goal, kind="new", runner=runner, stack=stack,
    )
    try:
        client = await svc.temporal.client()
        handle = await client.start_workflow(
            WORKFLOW_NAME,
            BuildRequest(build_id=build_id, project_id=project_id, goal=goal, runner=runner, stack=stack),
            id=build_id,
            task_queue=svc.settings.temporal.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            search_attributes=TypedSearchAttributes(
                [SearchAttributePair(PROJECT_ID, project_id), SearchAttributePair(BUILD_STAGE, Stage.QUEUED.value)]
            ),
            static_summary=clip(f"{project_id} · new app · {goal}", SUMMARY_BUDGET),
            static_details=f"**Project** `{project_id}` · new app · **Runner** `{runner}` · **Stack** `{stack}` · "
            f"**API** `/v1/builds/{build_id}`\n\n{clip(goal, DETAILS_GOAL_BUDGET)}",
            rpc_timeout=TEMPORAL_RPC_TIMEOUT,
        )
        job.run_id = job.run_id or handle.result_run_id  # for the links; the workflow records it at STARTING
    except WorkflowAlreadyStartedError as exc:  # the keyed build ran and closed already
        job.run_id = job.run_id or exc.run_id
    except (ApiError, RPCError) as exc:
        await _abandon_unless_keyed(svc, build_id, key, exc)
        raise  # 503 (or 500): a keyed client retries with its key and gets this same build
    return job


async def _submit_change(svc: Services, project_id: str, build_id: str, key: str | None, body: Any) -> Job:
    change: str | None = getattr(body, "change", None)
    edits_in = getattr(body, "edits", None) or []
    runner: str = body.runner
    if change and Capability.CHANGE not in capabilities_of(runner):
        raise ApiError(
            422, ErrorCode.VALIDATION_FAILED,
            f"the {runner} runner cannot apply a free-text change: send `edits` with the files' new content, "
            "or choose a runner that writes code (runner `llm`, offered when a model is configured)",
        )
    paths = _edit_paths(edits_in)
    base = await _base(svc, project_id, body.base)
    if base is not None:
        known = {f.path for f in await svc.repo.get_files(base.id)}
        missing = sorted(p for p, e in zip(paths, edits_in, strict=True) if e.delete and p not in known)
        if missing:
            raise ApiError(
                422, ErrorCode.VALIDATION_FAILED, f"edits: cannot delete {missing[0]!r}: not a file of {base.id}"
            )
    # Edit contents go to the blob store now; the workflow's history carries their digests only.
    written = [(p, e.content.encode()) for p, e in zip(paths, edits_in, strict=True) if not e.delete]
    digests = dict(zip([p for p, _ in written], await svc.repo.put_blobs([c for _, c in written]), strict=True))
    edits = [FileEdit(path=p, digest=digests.get(p), delete=e.delete) for p, e in zip(paths, edits_in, strict=True)]
    explicit_base = base.id if body.base is not None and base is not None else None
    request_digest = digest(
        {
            "change": change,
            "base": body.base,
            "runner": runner,
            "edits": [[e.path, e.digest, e.delete] for e in edits],
        }
    )
    job = await _create_row(
        svc,
        build_id,
        request_digest,
        project_id=project_id,
        goal=base.goal if base is not None else "",
        kind="change",
        runner=runner,
        stack=base.stack if base is not None else "python",
        base_build_id=base.id if base is not None else None,
        base_version=base.build_version if base is not None else None,
        change_request=change[:CHANGE_STORED_CHARS] if change else None,
        edited_paths=json.dumps([{"path": e.path, "op": "delete" if e.delete else "write"} for e in edits]) or None,
    )
    what = change or (f"edit {len(edits)} files" if edits else f"restore {body.base}")
    request = ChangeRequest(
        build_id=build_id,
        runner=runner,
        change=change or "",
        edits=edits,
        base_build_id=explicit_base,
        stack=job.stack,
        summary=clip(f"{project_id} · change · {what}", SUMMARY_BUDGET),
    )
    try:
        client = await svc.temporal.client()
        start = WithStartWorkflowOperation(
            ProjectWorkflow.run,
            ProjectInput(project_id=project_id, task_queue=svc.settings.temporal.task_queue),
            id=project_workflow_id(project_id),
            task_queue=svc.settings.temporal.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            search_attributes=TypedSearchAttributes([SearchAttributePair(PROJECT_ID, project_id)]),
            static_summary=clip(f"{project_id} · the project's line of changes", SUMMARY_BUDGET),
        )
        await client.execute_update_with_start_workflow(
            ProjectWorkflow.submit,
            request,
            start_workflow_operation=start,
            id=build_id,
            result_type=SubmitResult,
            rpc_timeout=TEMPORAL_RPC_TIMEOUT,
        )
    except WorkflowUpdateFailedError as exc:  # the validator refused it: nothing was recorded there
        await _abandon_unless_keyed(svc, build_id, None, exc)
        raise ApiError(409, ErrorCode.CONFLICT, str(exc.cause or exc)) from None
    except (ApiError, RPCError) as exc:
        await _abandon_unless_keyed(svc, build_id, key, exc)
        raise
    return job


def _edit_paths(edits: list[Any]) -> list[str]:
    """Every edit path through the same check as generated files; each path at most once."""
    paths: list[str] = []
    for index, edit in enumerate(edits):
        try:
            path = safe_relative_path(edit.path, ErrorKind.INVALID_INPUT)
        except GenloopError as err:
            raise ApiError(422, ErrorCode.VALIDATION_FAILED, f"edits.{index}.path: {err.detail}") from None
        if path in paths:
            raise ApiError(422, ErrorCode.VALIDATION_FAILED, f"edits.{index}.path: {path!r} appears twice")
        paths.append(path)
    return paths


async def _base(svc: Services, project_id: str, ref: str | None) -> Job | None:
    """The version a change starts from: the named one (404 unknown, 409 without files), else the
    newest READY one. None only when changes are already waiting: the base is then decided when
    this one's turn comes."""
    if ref is not None:
        base = await svc.repo.find_version(project_id, ref)
        if base is None:
            raise ApiError(404, ErrorCode.NOT_FOUND, f"base {ref} is not a build or version of project {project_id}")
        if not await svc.repo.get_files(base.id):
            raise ApiError(
                409, ErrorCode.CONFLICT, f"base {ref} has no files ({base.stage.value} before CODE finished)"
            )
        return base
    base = await svc.repo.newest_ready(project_id)
    if base is None and not await svc.repo.pending_changes(project_id):
        raise ApiError(
            409, ErrorCode.CONFLICT, f"project {project_id} has no ready version to change: start it with a goal"
        )
    return base


async def _abandon_unless_keyed(svc: Services, build_id: str, key: str | None, cause: BaseException) -> None:
    """The workflow could not be started and no client can name this build again: close its row.
    Should the start have happened after all (an answer lost in transit), that run fails at STARTING
    against the closed row instead of running unseen. A keyed request's row stays: its retry
    carries the key and finds it."""
    if key is not None:
        return
    try:
        await svc.repo.transition(
            build_id,
            Stage.FAILED,
            message=UNAVAILABLE_MESSAGE,
            error_message=UNAVAILABLE_MESSAGE,
            error_detail=f"workflow start failed: {type(cause).__name__}: {cause}",
        )
    except GenloopError as err:
        log.warning("could not close build %s after a failed start: %s", build_id, err)


# --- read, follow, cancel, list -------------------------------------------------------------------


async def get_build(request: Request) -> Response:
    svc = services(request)
    job = await get_job(svc, read.path_id(request, "build_id"))
    history = [
        TransitionOut(seq=t.seq, stage=Stage(t.stage), label=Stage(t.stage).label, message=t.message, at=t.at)
        for t in await svc.repo.list_transitions(job.id)
    ]
    attempts = [
        AttemptOut(
            attempt=a.attempt, stage=Stage(a.stage), command=a.command, exit_code=a.exit_code, output=a.output, at=a.at
        )
        for a in await svc.repo.list_attempts(job.id)
    ]
    detail = BuildDetail(
        **summary_fields(svc, job),
        sandbox_id=job.sandbox_id,
        sandbox_host=job.sandbox_host,
        history=history,
        attempts=attempts,
    )
    return json_response(detail)


async def build_events(request: Request) -> Response:
    svc = services(request)
    job = await get_job(svc, read.path_id(request, "build_id"))
    logs = _BOOLEAN.get(read.query(request, _EVENTS_PARAMS).get("logs", "0"))
    if logs is None:
        raise read.invalid("logs must be 1, true, 0 or false")
    if logs:
        last_seen = read.header(
            request, "last-event-id", _LAST_EVENT_ID_WITH_LOGS, "an event id (T or T.L: non-negative integers)"
        )
        after_seq, after_log = parse_event_id(last_seen) if last_seen is not None else (0, 0)
    else:
        last_seen = read.header(request, "last-event-id", _LAST_EVENT_ID, "a non-negative integer (an event id)")
        after_seq, after_log = int(last_seen) if last_seen is not None else 0, 0
    if job.stage.terminal:
        # Nothing more will happen: report the outcome once (or, if the client has it already,
        # 204, which tells EventSource not to reconnect); with logs, the lines it lacks first.
        final = (await svc.repo.list_transitions(job.id))[-1]
        if final.seq <= after_seq and (not logs or after_log >= job.log_seq):
            return Response(status_code=204)
        if not logs:
            return Response(encode_event(final, job).frame, media_type="text/event-stream", headers=SSE_HEADERS)
        return StreamingResponse(
            _finished_with_logs(svc, job, final, after_seq, after_log),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    return EventStreamResponse(svc.feed, job.id, after_seq, logs=logs, after_log=after_log)


async def _finished_with_logs(svc: Services, job: Job, final: Any, after_seq: int, after_log: int):
    while True:
        rows = await svc.repo.list_logs(job.id, after=after_log, limit=MAX_LOG_PAGE)
        for row in rows:
            after_log = row.seq
            yield Delivery(encode_log(row), event_id(after_seq, after_log)).frame
        if len(rows) < MAX_LOG_PAGE:
            break
    # Past every line the build has (retention may have deleted some): a reconnect gets a 204.
    yield Delivery(encode_event(final, job), event_id(final.seq, max(after_log, job.log_seq))).frame


async def cancel_build(request: Request) -> Response:
    svc = services(request)
    job = await get_job(svc, read.path_id(request, "build_id"))
    body = await read.json_body(request, CancelBuild, svc.settings.api.max_body_bytes, required=False)
    reason = (body or CancelBuild()).reason
    if job.stage.terminal:
        raise already_finished(job)
    client = await svc.temporal.client()
    if job.kind == "change" and job.stage is Stage.QUEUED:
        # Still waiting in the project's queue: the project workflow drops it and records it.
        handle = client.get_workflow_handle(project_workflow_id(job.project_id))
        try:
            dropped = await handle.execute_update(
                ProjectWorkflow.cancel_pending,
                CancelPendingRequest(build_id=job.id, reason=reason),
                rpc_timeout=TEMPORAL_RPC_TIMEOUT,
            )
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise
            dropped = False
        if dropped:
            return json_response(
                BuildRef(build_id=job.id, project_id=job.project_id, status=Stage.QUEUED, links=links(svc, job)), 202
            )
    try:
        await client.get_workflow_handle(job.workflow_id or job.id).signal(
            CANCEL_SIGNAL, CancelRequest(reason=reason), rpc_timeout=TEMPORAL_RPC_TIMEOUT
        )
    except RPCError as err:
        # The run closed between the read above and the signal.
        if err.status != RPCStatusCode.NOT_FOUND:
            raise
        raise already_finished(await svc.repo.get(job.id) or job) from None
    ref = BuildRef(build_id=job.id, project_id=job.project_id, status=job.stage, links=links(svc, job))
    return json_response(ref, 202)


async def list_builds(request: Request) -> Response:
    svc = services(request)
    project_id = read.path_id(request, "project_id")
    params = read.query(request, _LIST_PARAMS)
    limit = read.bounded_int(params.get("limit"), "limit", default=PAGE_SIZE_DEFAULT, low=1, high=PAGE_SIZE_MAX)
    cursor = read.optional_id(params.get("cursor"), "cursor")
    # One extra row says whether another page exists, so the last page has no next_cursor.
    try:
        rows = await svc.repo.list_jobs(project_id, limit=limit + 1, before=cursor)
    except GenloopError as err:
        if err.kind is not ErrorKind.INVALID_INPUT:
            raise
        # The limit is checked above, so the cursor is what the repository refused: a well-formed id
        # that names no build of this project.
        raise ApiError(404, ErrorCode.NOT_FOUND, f"cursor {cursor} is not a build of project {project_id}") from None
    page = rows[:limit]
    result = BuildPage(
        builds=[BuildSummary(**summary_fields(svc, job)) for job in page],
        next_cursor=page[-1].id if len(rows) > limit else None,
    )
    return json_response(result)


class ProjectBuilds(HTTPEndpoint):
    """One route for both methods, so a 405 there lists both in its Allow header."""

    get = staticmethod(list_builds)
    post = staticmethod(trigger_build)
