"""PreviewActivities: what the preview workflow does to a version's sandbox besides serving it again
(which reuses the build's own provision / install / start activities): pause it, resume it, stop
serving it, and record the version's preview state.

Pausing is the SDK's own `pause()` and resuming its `connect()`, on E2B and on genloop's local host
alike. The local host keeps a paused sandbox's files on its disk and runs none of its processes, so
a resumed sandbox runs nothing: the wake's `start_and_check` starts the version's app again (it
checks /health first and starts the app only when it does not answer). Only a host that really
cannot pause (HTTP 501: an E2B-compatible host without the lifecycle routes) gets its sandboxes
stopped instead, with a warning that says so: the version's files are stored, so the next request
serves it again from them."""

from __future__ import annotations

import logging
from datetime import datetime

import e2b
from e2b import AsyncSandbox
from temporalio import activity

from activities.build import APP_PIDFILE, failures_as_application_errors, manifest_result
from activities.sandbox import SandboxClient
from genloop.settings import Settings
from persistence.repository import JobRepository
from workflows.build import WORKSPACE_PATH
from workflows.types import (
    CodeResult,
    FileManifestEntry,
    PreviewChange,
    PreviewPolicy,
    PreviewState,
    StayAwakeInput,
)

log = logging.getLogger("genloop.activities.preview")


def preview_policy(settings: Settings) -> PreviewPolicy:
    """settings.preview as the preview workflow's input (the worker's and the gateway's agree)."""
    p = settings.preview
    return PreviewPolicy(idle_pause_s=p.idle_pause_s, keep_awake=p.keep_awake, retention_s=p.retention_days * 86400,
                         retry_failed_s=p.retry_failed_s)


async def forget_stale_app_pid(sandbox: AsyncSandbox) -> None:
    """Remove the app's pidfile when the process it names no longer runs. A sandbox resumed without
    its memory (the local host keeps files only) runs none of its old processes, and its new ones get
    pids afresh, in the same order as before: the launch that `start_and_check` runs would otherwise
    kill whichever new process now has the recorded pid, possibly itself."""
    path = f"{WORKSPACE_PATH}/{APP_PIDFILE}"
    try:
        recorded = (await sandbox.files.read(path)).strip()
    except e2b.NotFoundException:
        return
    running = {str(p.pid) for p in await sandbox.commands.list()}
    if recorded not in running:
        await sandbox.files.remove(path)


class PreviewActivities:
    def __init__(self, repo: JobRepository, sandboxes: SandboxClient) -> None:
        self.repo = repo
        self.sandboxes = sandboxes

    def all(self) -> list:
        return [self.version_files, self.pause_sandbox, self.resume_sandbox, self.stop_serving,
                self.record_preview, self.stay_awake]

    @activity.defn(name="version_files")
    @failures_as_application_errors
    async def version_files(self, build_id: str) -> CodeResult:
        """The version's files (their manifest), to serve it again."""
        files = await self.repo.get_files(build_id)
        return manifest_result([FileManifestEntry(path=f.path, digest=f.digest, size=f.size) for f in files])

    @activity.defn(name="pause_sandbox")
    @failures_as_application_errors
    async def pause_sandbox(self, sandbox_id: str) -> bool:
        """Pause the sandbox. True when it is paused (it can be resumed; also when it was paused
        already), False when it was already gone, or stopped because its host cannot pause (501)."""
        try:
            await AsyncSandbox.pause(sandbox_id, **self.sandboxes.config.sdk_options())  # False: was paused already
            return True
        except (e2b.NotFoundException, e2b.SandboxNotFoundException):
            return False
        except e2b.SandboxException as exc:
            if getattr(exc, "status_code", None) != 501:
                raise
        log.warning(
            "the sandbox host at %s cannot pause sandboxes (501): stopping sandbox %s instead; its version is "
            "served again from its stored files on its next request",
            self.sandboxes.config.sdk_options().get("api_url") or "E2B",
            sandbox_id,
        )
        await self.sandboxes.kill(sandbox_id)
        return False

    @activity.defn(name="resume_sandbox")
    @failures_as_application_errors
    async def resume_sandbox(self, sandbox_id: str) -> bool:
        """Resume (or reach) the sandbox: `connect` resumes a paused one (HTTP 201) and reaches a running
        one (200); False when it no longer exists (serve the version again)."""
        try:
            sandbox = await self.sandboxes.connect(sandbox_id)
        except (e2b.NotFoundException, e2b.SandboxNotFoundException):
            return False
        await forget_stale_app_pid(sandbox)
        return True

    @activity.defn(name="stop_serving")
    @failures_as_application_errors
    async def stop_serving(self, build_id: str) -> int:
        """Retention: kill every sandbox of the version (the files and the row stay)."""
        killed = 0
        for sandbox_id in await self.sandboxes.find_for_build(build_id):
            killed += bool(await self.sandboxes.kill(sandbox_id))
        return killed

    @activity.defn(name="record_preview")
    @failures_as_application_errors
    async def record_preview(self, change: PreviewChange) -> None:
        await self.repo.set_preview(
            change.build_id,
            change.state,
            sandbox_id=change.sandbox_id,
            sandbox_preview_url=change.sandbox_preview_url,
            woken_at=datetime.fromisoformat(change.woken_at) if change.woken_at else None,
        )

    @activity.defn(name="stay_awake")
    @failures_as_application_errors
    async def stay_awake(self, inp: StayAwakeInput) -> bool:
        """Whether an idle version stays awake anyway: one of its project's `newest` READY versions."""
        return await self.repo.among_newest_ready(inp.build_id, inp.newest)


__all__ = ["PreviewActivities", "PreviewState"]
