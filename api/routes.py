"""The HTTP routes. Reads come from the database (activities persist every transition); Temporal is
only called to start and to signal builds, and by /healthz."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import uuid
from datetime import timedelta

from starlette.endpoints import HTTPEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from api import requests as read
from api.errors import UNAVAILABLE_MESSAGE, ApiError
from api.feed import SSE_HEADERS, EventStreamResponse, encode_event
from api.schemas import (
    IDEMPOTENCY_KEY_PATTERN,
    PAGE_SIZE_DEFAULT,
    PAGE_SIZE_MAX,
    BuildDetail,
    BuildPage,
    BuildRef,
    BuildSummary,
    CancelBuild,
    ComponentHealth,
    Components,
    ComponentStatus,
    ErrorCode,
    Health,
    Links,
    TransitionOut,
    fullmatch,
)
from api.services import Services
from genloop.errors import ErrorKind, GenloopError
from persistence.models import Job
from workflows.build import BUILD_STAGE, PROJECT_ID
from workflows.stages import Stage
from workflows.types import CANCEL_SIGNAL, WORKFLOW_NAME, BuildRequest, CancelRequest

log = logging.getLogger("genloop.api")

TEMPORAL_RPC_TIMEOUT = timedelta(seconds=10)
HEALTH_TIMEOUT_S = 3.0
REQUEST_DIGEST_MEMO = "genloop_request_digest"
# The summary is a one-liner in the Web UI. Both are bounded by their JSON-encoded size (what the
# server stores; one non-BMP character takes 12 bytes) so a long goal never bloats the start request.
SUMMARY_BUDGET = 200
DETAILS_GOAL_BUDGET = 8000

_IDEMPOTENCY_KEY = fullmatch(IDEMPOTENCY_KEY_PATTERN)
_LAST_EVENT_ID = fullmatch("^[0-9]{1,9}$")
_LIST_PARAMS = frozenset({"limit", "cursor"})


def _services(request: Request) -> Services:
    return request.app.state.services


# --- builds -------------------------------------------------------------------------------------


async def trigger_build(request: Request) -> Response:
    svc = _services(request)
    project_id = read.path_id(request, "project_id")
    key = read.header(request, "idempotency-key", _IDEMPOTENCY_KEY, "1-255 visible ASCII characters")
    body = await read.json_body(request, svc.trigger_model, svc.settings.api.max_body_bytes)
    goal, runner = body.goal, body.runner
    digest = _digest({"goal": goal, "runner": runner})
    # A key maps to one build id, so Temporal's workflow-id uniqueness is the deduplication: no
    # lookup-then-insert race between concurrent retries.
    build_id = _keyed_build_id(project_id, key) if key is not None else f"b-{uuid.uuid4().hex}"

    # The row first: a build the database cannot record never starts, so a 503 here hides nothing.
    job = await svc.repo.create_job(build_id, project_id, goal, workflow_id=build_id)
    try:
        client = await svc.temporal.client()
        handle = await client.start_workflow(
            WORKFLOW_NAME,
            BuildRequest(build_id=build_id, project_id=project_id, goal=goal, runner=runner),
            id=build_id,
            task_queue=svc.settings.temporal.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            memo={REQUEST_DIGEST_MEMO: digest},
            search_attributes=TypedSearchAttributes(
                [SearchAttributePair(PROJECT_ID, project_id), SearchAttributePair(BUILD_STAGE, Stage.QUEUED.value)]
            ),
            static_summary=_clip(goal, SUMMARY_BUDGET),
            static_details=f"**Project** `{project_id}` · **Runner** `{runner}`\n\n{_clip(goal, DETAILS_GOAL_BUDGET)}",
            rpc_timeout=TEMPORAL_RPC_TIMEOUT,
        )
        run_id = handle.result_run_id
    except WorkflowAlreadyStartedError as exc:  # the keyed build ran and closed already
        run_id = exc.run_id
    except (ApiError, RPCError) as exc:
        if key is None:
            await _abandon(svc, build_id, exc)
        raise  # 503 (or 500): a keyed client retries with its key and gets this same build
    if key is not None:
        description = await client.get_workflow_handle(build_id, run_id=run_id).describe(rpc_timeout=TEMPORAL_RPC_TIMEOUT)
        if await description.memo_value(REQUEST_DIGEST_MEMO, None) != digest:
            raise ApiError(409, ErrorCode.CONFLICT, "this Idempotency-Key was already used with a different request body")
    job.run_id = job.run_id or run_id  # for the links; the workflow records it itself at STARTING
    ref = BuildRef(build_id=job.id, project_id=job.project_id, status=job.stage, links=_links(svc, job))
    return _json(ref, 202, headers={"Location": ref.links.self_})


async def _abandon(svc: Services, build_id: str, cause: BaseException) -> None:
    """The workflow could not be started and no client can name this build again: close its row.
    Should the start have happened after all (an answer lost in transit), that run fails at STARTING
    against the closed row instead of running unseen."""
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


async def get_build(request: Request) -> Response:
    svc = _services(request)
    job = await _job(svc, read.path_id(request, "build_id"))
    history = [
        TransitionOut(seq=t.seq, stage=Stage(t.stage), label=Stage(t.stage).label, message=t.message, at=t.at)
        for t in await svc.repo.list_transitions(job.id)
    ]
    detail = BuildDetail(**_summary_fields(svc, job), sandbox_id=job.sandbox_id, history=history)
    return _json(detail)


async def build_events(request: Request) -> Response:
    svc = _services(request)
    job = await _job(svc, read.path_id(request, "build_id"))
    last_seen = read.header(request, "last-event-id", _LAST_EVENT_ID, "a non-negative integer (an event id)")
    after_seq = int(last_seen) if last_seen is not None else 0
    if job.stage.terminal:
        # Nothing more will happen: report the outcome once (or, if the client has it already,
        # 204, which tells EventSource not to reconnect).
        final = (await svc.repo.list_transitions(job.id))[-1]
        if final.seq <= after_seq:
            return Response(status_code=204)
        return Response(encode_event(final, job).frame, media_type="text/event-stream", headers=SSE_HEADERS)
    return EventStreamResponse(svc.feed, job.id, after_seq)


async def cancel_build(request: Request) -> Response:
    svc = _services(request)
    job = await _job(svc, read.path_id(request, "build_id"))
    body = await read.json_body(request, CancelBuild, svc.settings.api.max_body_bytes, required=False)
    if job.stage.terminal:
        raise _already_finished(job)
    client = await svc.temporal.client()
    try:
        await client.get_workflow_handle(job.workflow_id or job.id).signal(
            CANCEL_SIGNAL, CancelRequest(reason=(body or CancelBuild()).reason), rpc_timeout=TEMPORAL_RPC_TIMEOUT
        )
    except RPCError as err:
        # The run closed between the read above and the signal.
        if err.status != RPCStatusCode.NOT_FOUND:
            raise
        raise _already_finished(await svc.repo.get(job.id) or job) from None
    ref = BuildRef(build_id=job.id, project_id=job.project_id, status=job.stage, links=_links(svc, job))
    return _json(ref, 202)


async def list_builds(request: Request) -> Response:
    svc = _services(request)
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
        builds=[BuildSummary(**_summary_fields(svc, job)) for job in page],
        next_cursor=page[-1].id if len(rows) > limit else None,
    )
    return _json(result)


# --- service ------------------------------------------------------------------------------------


async def healthz(request: Request) -> Response:
    svc = _services(request)

    async def temporal() -> None:
        client = await svc.temporal.client()
        if not await client.service_client.check_health(timeout=timedelta(seconds=HEALTH_TIMEOUT_S)):
            raise RuntimeError("Temporal reports NOT_SERVING")

    checks = {"database": svc.repo.ping(), "temporal": temporal()}
    results = await asyncio.gather(
        *(asyncio.wait_for(check, HEALTH_TIMEOUT_S) for check in checks.values()), return_exceptions=True
    )
    status: dict[str, ComponentHealth] = {}
    for name, result in zip(checks, results, strict=True):
        if isinstance(result, BaseException):
            log.warning("health check: %s unavailable: %s", name, result)
            status[name] = ComponentHealth(status=ComponentStatus.UNAVAILABLE)
        else:
            status[name] = ComponentHealth(status=ComponentStatus.OK)
    healthy = all(c.status is ComponentStatus.OK for c in status.values())
    health = Health(status=ComponentStatus.OK if healthy else ComponentStatus.UNAVAILABLE, components=Components(**status))
    return _json(health, 200 if healthy else 503)


async def openapi(request: Request) -> Response:
    return JSONResponse(_services(request).openapi)


class ProjectBuilds(HTTPEndpoint):
    """One route for both methods, so a 405 there lists both in its Allow header."""

    get = staticmethod(list_builds)
    post = staticmethod(trigger_build)


ROUTES = [
    Route("/v1/projects/{project_id}/builds", ProjectBuilds),
    Route("/v1/builds/{build_id}", get_build, methods=["GET"]),
    Route("/v1/builds/{build_id}/events", build_events, methods=["GET"]),
    Route("/v1/builds/{build_id}/cancel", cancel_build, methods=["POST"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]


# --- helpers ------------------------------------------------------------------------------------


async def _job(svc: Services, build_id: str) -> Job:
    job = await svc.repo.get(build_id)
    if job is None:
        raise ApiError(404, ErrorCode.NOT_FOUND, f"build {build_id} not found")
    return job


def _already_finished(job: Job) -> ApiError:
    return ApiError(409, ErrorCode.CONFLICT, f"build {job.id} has already finished ({job.stage.value})")


def _links(svc: Services, job: Job) -> Links:
    base = f"/v1/builds/{job.id}"
    web_ui = svc.settings.temporal.workflow_url(job.workflow_id or job.id, job.run_id) if job.run_id else None
    return Links(self_=base, events=f"{base}/events", cancel=f"{base}/cancel", web_ui=web_ui)


def _summary_fields(svc: Services, job: Job) -> dict:
    return dict(
        build_id=job.id,
        project_id=job.project_id,
        goal=job.goal,
        stage=job.stage,
        label=job.stage.label,
        message=job.status_message,
        preview_url=job.preview_url,
        build_version=job.build_version,
        error_message=job.error_message,  # error_detail is internal and never leaves the server
        debug_id=job.debug_id,
        created_at=job.created_at,
        updated_at=job.updated_at,
        links=_links(svc, job),
    )


def _json(model, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(model.model_dump_json(by_alias=True), status_code=status, media_type="application/json", headers=headers)


def _digest(body: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _keyed_build_id(project_id: str, key: str) -> str:
    return "b-" + hashlib.sha256(f"{project_id}\n{key}".encode()).hexdigest()[:32]


def _clip(text: str, budget: int) -> str:
    """`text` cut so its JSON encoding (what Temporal stores) fits in `budget` bytes."""
    if len(json.dumps(text)) <= budget:
        return text
    used, end = len(json.dumps("…")), 0
    # Ends inside the text: the whole of it is over budget.
    while used + _json_size(text[end]) <= budget:
        used += _json_size(text[end])
        end += 1
    return text[:end] + "…"


def _json_size(char: str) -> int:
    return len(json.dumps(char)) - 2
