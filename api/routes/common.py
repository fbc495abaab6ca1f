"""What the route modules share: the services, reading a build, building its summary, JSON answers."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from api.errors import ApiError
from api.schemas import EditedPath, ErrorCode, Lineage, Links, Usage
from api.services import Services
from persistence.models import Job

TEMPORAL_RPC_TIMEOUT = timedelta(seconds=10)
# The summary is a one-liner in the Web UI. Both are bounded by their JSON-encoded size (what the
# server stores; one non-BMP character takes 12 bytes) so a long goal never bloats the start request.
SUMMARY_BUDGET = 200
DETAILS_GOAL_BUDGET = 8000
CHANGE_STORED_CHARS = 2000  # what a build row keeps of its change text


def services(request: Request) -> Services:
    return request.app.state.services


async def get_job(svc: Services, build_id: str) -> Job:
    job = await svc.repo.get(build_id)
    if job is None:
        raise ApiError(404, ErrorCode.NOT_FOUND, f"build {build_id} not found")
    return job


def already_finished(job: Job) -> ApiError:
    return ApiError(409, ErrorCode.CONFLICT, f"build {job.id} has already finished ({job.stage.value})")


def links(svc: Services, job: Job) -> Links:
    base = f"/v1/builds/{job.id}"
    web_ui = svc.settings.temporal.workflow_url(job.workflow_id or job.id, job.run_id) if job.run_id else None
    return Links(self_=base, events=f"{base}/events", cancel=f"{base}/cancel", logs=f"{base}/logs", web_ui=web_ui)


def summary_fields(svc: Services, job: Job) -> dict[str, Any]:
    return dict(
        build_id=job.id,
        project_id=job.project_id,
        goal=job.goal,
        stage=job.stage,
        label=job.stage.label,
        message=job.status_message,
        preview_url=job.preview_url,
        sandbox_preview_url=job.sandbox_preview_url,
        preview_state=job.preview_state,
        preview_woken_at=job.preview_woken_at,
        build_version=job.build_version,
        error_message=job.error_message,  # error_detail is internal and never leaves the server
        debug_id=job.debug_id,
        runner=job.runner,
        stack=job.stack,
        lineage=Lineage(
            kind="change" if job.kind == "change" else "new",
            base_build_id=job.base_build_id,
            base_version=job.base_version,
            change=job.change_request,
            edited_paths=[EditedPath(**e) for e in json.loads(job.edited_paths or "[]")],
            note=job.lineage_note,
        ),
        attempt=max(job.attempt, 1),
        max_attempts=max(job.max_attempts, 1),
        usage=Usage(input_tokens=job.tokens_in, output_tokens=job.tokens_out, calls=job.llm_calls, model=job.llm_model),
        created_at=job.created_at,
        updated_at=job.updated_at,
        links=links(svc, job),
    )


def json_response(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        model.model_dump_json(by_alias=True), status_code=status, media_type="application/json", headers=headers
    )


def digest(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def keyed_build_id(project_id: str, key: str) -> str:
    return "b-" + hashlib.sha256(f"{project_id}\n{key}".encode()).hexdigest()[:32]


def clip(text: str, budget: int) -> str:
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
