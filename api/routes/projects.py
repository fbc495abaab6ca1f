"""A project: its line of versions and the changes waiting to be built."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from api import reading as read
from api.errors import ApiError
from api.routes.common import json_response, services, summary_fields
from api.schemas import BuildSummary, ErrorCode, ProjectView


async def get_project(request: Request) -> Response:
    svc = services(request)
    project_id = read.path_id(request, "project_id")
    builds = await svc.repo.project_builds(project_id)
    if not builds:
        raise ApiError(404, ErrorCode.NOT_FOUND, f"project {project_id} has no builds")
    newest = await svc.repo.newest_ready(project_id)
    pending = await svc.repo.pending_changes(project_id)
    view = ProjectView(
        project_id=project_id,
        goal=newest.goal if newest is not None else builds[0].goal,
        newest_ready=BuildSummary(**summary_fields(svc, newest)) if newest is not None else None,
        versions=[BuildSummary(**summary_fields(svc, job)) for job in builds],
        pending=[job.id for job in pending],
    )
    return json_response(view)
