"""The HTTP routes, one module per resource: builds, projects, files, logs, health."""

from __future__ import annotations

from starlette.routing import Route

from api.routes.builds import ProjectBuilds, build_events, cancel_build, get_build
from api.routes.files import diff, get_file, list_files
from api.routes.health import healthz, openapi
from api.routes.logs import build_logs
from api.routes.previews import pause_preview, wake_preview
from api.routes.projects import get_project

ROUTES = [
    Route("/v1/projects/{project_id}/builds", ProjectBuilds),
    Route("/v1/projects/{project_id}", get_project, methods=["GET"]),
    Route("/v1/builds/{build_id}", get_build, methods=["GET"]),
    Route("/v1/builds/{build_id}/events", build_events, methods=["GET"]),
    Route("/v1/builds/{build_id}/logs", build_logs, methods=["GET"]),
    Route("/v1/builds/{build_id}/cancel", cancel_build, methods=["POST"]),
    Route("/v1/builds/{build_id}/files", list_files, methods=["GET"]),
    Route("/v1/builds/{build_id}/files/{path:path}", get_file, methods=["GET"]),
    Route("/v1/builds/{build_id}/diff", diff, methods=["GET"]),
    Route("/v1/builds/{build_id}/preview/wake", wake_preview, methods=["POST"]),
    Route("/v1/builds/{build_id}/preview/pause", pause_preview, methods=["POST"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]
