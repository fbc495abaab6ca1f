"""Bench-local prototypes of proposed changes, to measure them without editing genloop.

Each is a copy or subclass of the real code with one difference, named in its docstring. The
changes themselves belong in activities/build.py, genloop/http.py and genloop/stack.py; see
docs/benchmarks.md for the exact edits.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import Any

import httpx
from temporalio import activity

from activities.build import (
    APP_PIDFILE,
    BuildActivities,
    _failures_as_application_errors,
    _healthy,
    _heartbeating,
    _require,
    _tail,
    _web_command,
)
from genloop.errors import ErrorKind, GenloopError
from genloop.http import LoopbackTransport
from workflows.types import ChecksResult, SandboxInfo, SandboxInput

_SSL_CONTEXT: ssl.SSLContext | None = None


def cached_preview_client(**client_kwargs: Any) -> httpx.AsyncClient:
    """genloop.http.preview_client with ONE change: the SSL context is created once per process
    (httpx otherwise builds a fresh ssl.create_default_context() + CA bundle load, ~17 ms of CPU,
    for every client, i.e. every start_and_check)."""
    global _SSL_CONTEXT
    if _SSL_CONTEXT is None:
        _SSL_CONTEXT = ssl.create_default_context()
    return httpx.AsyncClient(transport=LoopbackTransport(verify=_SSL_CONTEXT), **client_kwargs)


class CachedSslActivities(BuildActivities):
    """start_and_check using cached_preview_client; nothing else differs."""

    health_poll_s = 0.2

    @activity.defn(name="start_and_check")
    @_failures_as_application_errors
    async def start_and_check(self, inp: SandboxInput) -> ChecksResult:
        # A copy of BuildActivities.start_and_check; differences: cached_preview_client and
        # `self.health_poll_s` instead of the literal 0.2.
        sandbox = await self.sandboxes.connect(_require(inp.sandbox_id))
        preview_url = self.sandboxes.preview_url(sandbox, self.app_port)
        async with cached_preview_client(timeout=5.0) as http:
            if await _healthy(http, preview_url):
                return ChecksResult(preview_url=preview_url, port=self.app_port)
            procfile = await sandbox.files.read(f"{inp.workspace_path}/Procfile")
            web_cmd = _web_command(procfile)
            stderr: list[str] = []
            launch = (
                f"[ -f {APP_PIDFILE} ] && kill $(cat {APP_PIDFILE}) 2>/dev/null; echo $$ > {APP_PIDFILE}; "
                f"[ -d .venv ] && export PATH=\"$PWD/.venv/bin:$PATH\"; exec {web_cmd}"
            )
            handle = await sandbox.commands.run(
                launch, background=True, cwd=inp.workspace_path, envs={"PORT": str(self.app_port)},
                timeout=0, on_stderr=stderr.append,
            )
            exited = asyncio.ensure_future(handle.wait())
            deadline = time.monotonic() + self.health_deadline_s
            try:
                while time.monotonic() < deadline:
                    if exited.done():
                        break
                    if await _healthy(http, preview_url):
                        await handle.disconnect()
                        return ChecksResult(preview_url=preview_url, port=self.app_port)
                    activity.heartbeat("waiting for /health")
                    await asyncio.sleep(self.health_poll_s)
            finally:
                if not exited.done():
                    exited.cancel()
            reason = "exited before answering /health" if exited.done() else f"did not answer /health within {self.health_deadline_s:.0f}s"
            raise GenloopError(ErrorKind.APP_CHECK_FAILED, f"the app {reason}. stderr tail:\n{_tail(''.join(stderr))}")


class FastPollActivities(CachedSslActivities):
    """…and /health polled every 25 ms instead of every 200 ms (a python3 app binds in ~100 ms,
    so the 200 ms sleep costs ~100 ms on average per build)."""

    health_poll_s = 0.025


class AllLeversActivities(FastPollActivities):
    """…and provision_sandbox without the `set_timeout` round trip right after create (create
    already set timeout=config.timeout_s). A copy of BuildActivities.provision_sandbox minus that line."""

    @activity.defn(name="provision_sandbox")
    @_failures_as_application_errors
    async def provision_sandbox(self, inp: SandboxInput) -> SandboxInfo:
        sandbox = await self.sandboxes.create(inp.build_id, inp.project_id)
        await self.repo.set_sandbox(inp.build_id, sandbox.sandbox_id, inp.workspace_path)
        blobs = await self.repo.get_blobs([f.digest for f in inp.files])
        entries = [{"path": f"{inp.workspace_path}/{f.path}", "data": blobs[f.digest]} for f in inp.files]
        if entries:
            await _heartbeating(sandbox.files.write_files(entries), "writing files")
        return SandboxInfo(sandbox_id=sandbox.sandbox_id, workspace_path=inp.workspace_path)


class _MemoryJob:
    def __init__(self, build_version: str) -> None:
        self.build_version = build_version


class MemoryRepositoryDouble:
    """Attribution only (not a proposal): the JobRepository methods the activities call, in memory,
    so the difference to the SQLite run is what persistence costs the worker."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    async def create_job(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def transition(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def set_sandbox(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def finish_ready(self, *args: Any, **kwargs: Any) -> _MemoryJob:
        return _MemoryJob("build_v0_1")

    async def put_blob(self, content: bytes) -> str:
        import hashlib

        digest = hashlib.sha256(content).hexdigest()
        self.blobs[digest] = content
        return digest

    async def get_blobs(self, digests: Any) -> dict[str, bytes]:
        return {d: self.blobs[d] for d in digests}


class MemoryRepoActivities(CachedSslActivities):
    """CachedSslActivities over MemoryRepositoryDouble (attribution of the persistence cost)."""

    def __init__(self, repo: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(MemoryRepositoryDouble(), *args, **kwargs)
