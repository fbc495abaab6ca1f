"""A version's preview by hand: wake it now, or pause it now (`genloop preview wake|pause BUILD`)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from temporalio.client import WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode

from api import reading as read
from api.errors import ApiError
from api.routes.common import TEMPORAL_RPC_TIMEOUT, get_job, json_response, services
from api.schemas import ErrorCode, PreviewOut
from persistence.models import Job
from workflows.preview import PreviewWorkflow
from workflows.types import PreviewState, WakeRequest, WakeResult, preview_workflow_id


async def wake_preview(request: Request) -> Response:
    job = await _served(request)
    result = await request.app.state.gateway.wake_now(job)
    return json_response(_out(job, result))


async def pause_preview(request: Request) -> Response:
    svc = services(request)
    job = await _served(request)
    client = await svc.temporal.client()
    try:
        result = await client.get_workflow_handle(preview_workflow_id(job.id)).execute_update(
            PreviewWorkflow.pause, WakeRequest(reason="paused by hand"), result_type=WakeResult,
            rpc_timeout=TEMPORAL_RPC_TIMEOUT,
        )
    except (RPCError, WorkflowUpdateFailedError) as err:
        if isinstance(err, RPCError) and err.status != RPCStatusCode.NOT_FOUND:
            raise
        raise ApiError(409, ErrorCode.CONFLICT, f"version {job.build_version} is not being served") from None
    return json_response(_out(job, result))


async def _served(request: Request) -> Job:
    job = await get_job(services(request), read.path_id(request, "build_id"))
    if job.preview_label is None:
        raise ApiError(409, ErrorCode.CONFLICT, f"build {job.id} is not a READY version with a preview URL")
    if job.preview_state == PreviewState.REMOVED:
        raise ApiError(409, ErrorCode.CONFLICT, f"version {job.build_version} was removed by retention")
    return job


def _out(job: Job, result: WakeResult) -> PreviewOut:
    return PreviewOut(build_id=job.id, state=result.state, preview_url=job.preview_url, message=result.message,
                      debug_id=result.debug_id)
