"""A build's files: the list, one file's content, and a unified diff against another version."""

from __future__ import annotations

import difflib

from starlette.requests import Request
from starlette.responses import Response

from activities.edits import safe_relative_path, text_files
from api import reading as read
from api.errors import ApiError
from api.routes.common import get_job, json_response, services
from api.schemas import ErrorCode, FileList, FileOut
from api.services import Services
from genloop.errors import ErrorKind, GenloopError

_DIFF_PARAMS = frozenset({"against"})


async def list_files(request: Request) -> Response:
    svc = services(request)
    job = await get_job(svc, read.path_id(request, "build_id"))
    files = await svc.repo.get_files(job.id)
    return json_response(
        FileList(build_id=job.id, files=[FileOut(path=f.path, size=f.size, sha256=f.digest) for f in files])
    )


async def get_file(request: Request) -> Response:
    svc = services(request)
    job = await get_job(svc, read.path_id(request, "build_id"))
    try:
        path = safe_relative_path(request.path_params["path"], ErrorKind.INVALID_INPUT)
    except GenloopError as err:
        raise read.invalid(f"path: {err.detail}") from None
    entry = next((f for f in await svc.repo.get_files(job.id) if f.path == path), None)
    if entry is None:
        raise ApiError(404, ErrorCode.NOT_FOUND, f"build {job.id} has no file {path!r}")
    content = await svc.repo.get_blob(entry.digest)
    text, _ = text_files({path: content})
    # Generated content is served inert: never as HTML, never sniffed into something runnable.
    media_type = "text/plain; charset=utf-8" if text else "application/octet-stream"
    headers = {
        "ETag": f'"{entry.digest}"',
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; sandbox",
    }
    return Response(content, media_type=media_type, headers=headers)


async def diff(request: Request) -> Response:
    """From `against` (default: the build's base; an empty tree for a new app) to this build."""
    svc = services(request)
    job = await get_job(svc, read.path_id(request, "build_id"))
    params = read.query(request, _DIFF_PARAMS)
    against_ref = read.optional_id(params.get("against"), "against")
    old_id: str | None = job.base_build_id
    if against_ref is not None:
        against = await svc.repo.find_version(job.project_id, against_ref)
        if against is None:
            raise ApiError(
                404, ErrorCode.NOT_FOUND, f"{against_ref} is not a build or version of project {job.project_id}"
            )
        old_id = against.id
    old = await _contents(svc, old_id) if old_id else {}
    new = await _contents(svc, job.id)
    return Response(
        unified_diff(old, new), media_type="text/x-diff; charset=utf-8", headers={"X-Content-Type-Options": "nosniff"}
    )


async def _contents(svc: Services, build_id: str) -> dict[str, bytes]:
    files = await svc.repo.get_files(build_id)
    blobs = await svc.repo.get_blobs([f.digest for f in files])
    return {f.path: blobs[f.digest] for f in files}


def unified_diff(old: dict[str, bytes], new: dict[str, bytes]) -> str:
    """git-style unified diff of two file sets; binary files are named, not printed."""
    out: list[str] = []
    for path in sorted(set(old) | set(new)):
        a, b = old.get(path), new.get(path)
        if a == b:
            continue
        a_text, _ = text_files({path: a}) if a is not None else ({path: ""}, {})
        b_text, _ = text_files({path: b}) if b is not None else ({path: ""}, {})
        from_name = f"a/{path}" if a is not None else "/dev/null"
        to_name = f"b/{path}" if b is not None else "/dev/null"
        if path not in a_text or path not in b_text:
            out.append(f"diff --git a/{path} b/{path}\nBinary files {from_name} and {to_name} differ\n")
            continue
        out.append(f"diff --git a/{path} b/{path}\n")
        lines = difflib.unified_diff(
            a_text[path].splitlines(keepends=True), b_text[path].splitlines(keepends=True), from_name, to_name
        )
        for line in lines:
            out.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return "".join(out)
