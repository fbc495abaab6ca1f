"""The worker assembly: the workflows and activities one genloop worker runs, and `genloop worker`."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import py_compile
import signal
import sys
import time
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

import httpx
from temporalio.client import Client
from temporalio.worker import Worker

from activities.build import BuildActivities
from activities.logs import LogPolicy
from activities.preview import PreviewActivities, preview_policy
from activities.runners import build_runner
from activities.sandbox import SandboxClient, SandboxConfig, close_sdk_transports
from activities.sweep import sweep_logs, sweep_orphans
from genloop.settings import Settings
from genloop.temporal import connect
from persistence.repository import JobRepository
from workflows.build import HOST_HEARTBEAT_TIMEOUT, BuildWorkflow
from workflows.preview import PreviewWorkflow
from workflows.project import ProjectWorkflow

log = logging.getLogger("genloop.worker")


def build_worker(
    client: Client,
    settings: Settings,
    activities: list[Any],
    *,
    task_queue: str | None = None,
    **overrides: Any,
) -> Worker:
    options: dict[str, Any] = dict(
        task_queue=task_queue or settings.temporal.task_queue,
        workflows=[BuildWorkflow, ProjectWorkflow, PreviewWorkflow],
        activities=activities,
        max_concurrent_activities=settings.worker.max_concurrent_activities,
        max_concurrent_local_activities=settings.worker.max_concurrent_local_activities,
        max_concurrent_workflow_tasks=settings.worker.max_concurrent_workflow_tasks,
        sticky_queue_schedule_to_start_timeout=timedelta(seconds=settings.worker.sticky_schedule_to_start_s),
        # The SDK sends an activity's heartbeats at most every 0.8 x its heartbeat timeout: on the host
        # activities' 8 s that left 1.6 s for the heartbeat to reach the server, which a loaded worker
        # or server overran (the activity timed out and was retried as if its host were gone).
        max_heartbeat_throttle_interval=HOST_HEARTBEAT_TIMEOUT / 4,
        graceful_shutdown_timeout=timedelta(seconds=10),
    )
    options.update(overrides)
    write_workflow_bytecode(options["workflows"])
    return Worker(client, **options)


def write_workflow_bytecode(workflows: Iterable[type]) -> None:
    """The workflow sandbox imports a workflow's module afresh for every workflow run. Without its
    bytecode on disk (PYTHONDONTWRITEBYTECODE, common in containers) each run compiles the source
    on the worker's event loop (workflows/build.py: ~3 ms a build). Written once, where Python
    looks for it; where it cannot be written (a read-only install) runs just compile as before."""
    if not sys.dont_write_bytecode:
        return  # importing the module wrote it
    for name in {cls.__module__ for cls in workflows}:
        source = getattr(sys.modules.get(name), "__file__", None)
        cached = importlib.util.cache_from_source(source) if source and source.endswith(".py") else None
        if cached is not None:
            with contextlib.suppress(OSError, py_compile.PyCompileError):
                py_compile.compile(source, cfile=cached, doraise=True)


def production_activities(
    settings: Settings, repo: JobRepository, extra_runners: Mapping[str, Any] | None = None, *, host_id: str = ""
) -> BuildActivities:
    """BuildActivities wired from settings: the real repository, sandbox client and runners."""
    runners: dict[str, Any] = {name: build_runner(name, settings) for name in settings.available_runners}
    runners.update(extra_runners or {})
    return BuildActivities(
        repo,
        SandboxClient(SandboxConfig.from_settings(settings)),
        runners,
        app_port=settings.sandbox.app_port,
        fix_attempts=settings.runner.fix_attempts,
        token_budget=settings.runner.max_tokens_per_build,
        version_url=settings.version_url,
        preview=preview_policy(settings),
        host_id=host_id,
        host_queue=host_queue(settings, host_id) if host_id else "",
        logs=LogPolicy.from_settings(settings),
    )


def host_queue(settings: Settings, host_id: str) -> str:
    """The task queue only the workers of one sandbox host poll (Temporal's worker-specific queue)."""
    return f"{settings.temporal.task_queue}@{host_id}"


async def host_identity(settings: Settings, *, wait_s: float = 30) -> str:
    """The id of this worker's own local sandbox host ("" for E2B cloud or a host that reports none:
    one shared sandbox tier every worker reaches). Waits for a host that is still starting."""
    url = settings.sandbox_api_url
    if url is None:
        return ""
    deadline = time.monotonic() + wait_s
    async with httpx.AsyncClient(timeout=3) as http:
        while True:
            try:
                response = await http.get(f"{url}/health")
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    log.warning("sandbox host at %s did not answer /health: working without a host queue", url)
                    return ""
                await asyncio.sleep(0.5)
                continue
            try:  # an E2B-compatible endpoint that is not genloop's host has no id: a shared tier
                body = response.json()
            except ValueError:
                return ""
            return str(body.get("host_id") or "") if isinstance(body, dict) else ""


def all_activities(activities: BuildActivities) -> list[Any]:
    """Every activity a genloop worker runs: the builds' and the previews' (same repository and
    sandbox client)."""
    return activities.all() + PreviewActivities(activities.repo, activities.sandboxes).all()


ONLY = ("workflows", "activities")  # `genloop worker --only`: one half of a split deployment


async def run_worker(
    settings: Settings, extra_runners: Mapping[str, Any] | None = None, *, only: str | None = None
) -> None:
    """`genloop worker`: run until SIGTERM/SIGINT, then finish in-flight tasks and exit.
    `extra_runners` lets the fault-injection suite register its runner doubles. `only="workflows"`:
    workflow tasks and their local activities (the stage writes) only; `only="activities"`: activity
    tasks only (the shared queue's and, paired with a host, that host's)."""
    repo = JobRepository.from_url(settings.database_url)
    client = await connect(settings)
    host_id = await host_identity(settings) if only != "workflows" else ""
    activities = production_activities(settings, repo, extra_runners, host_id=host_id)
    split: dict[str, Any] = {"workflows": {"no_remote_activities": True}, "activities": {"workflows": []}}.get(
        only or "", {}
    )
    workers = [build_worker(client, settings, all_activities(activities), **split)]
    if host_id:
        # Activities on this host's sandboxes come on a queue only this host's workers poll.
        workers.append(build_worker(client, settings, all_activities(activities), task_queue=activities.host_queue,
                                    workflows=[]))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("worker polling %s on %s%s", ", ".join(w.task_queue for w in workers), settings.temporal.target,
             f" ({only} only)" if only else "")
    sweeper = asyncio.create_task(
        _sweep_periodically(settings, activities, client) if only != "workflows" else asyncio.sleep(0)
    )
    try:
        async with contextlib.AsyncExitStack() as running:
            for worker in workers:
                await running.enter_async_context(worker)
            await stop.wait()
            log.info("shutting down: finishing in-flight tasks")
    finally:
        sweeper.cancel()
        await repo.aclose()
        await close_sdk_transports()


async def _sweep_periodically(settings: Settings, activities: BuildActivities, client: Client) -> None:
    interval = settings.worker.sweep_interval_s
    if not interval:
        return
    while True:
        await asyncio.sleep(interval)
        try:
            report = await sweep_orphans(activities.sandboxes, activities.repo, client)
            if report.killed:
                log.info("orphan sweep killed %d sandboxes", len(report.killed))
            deleted = await sweep_logs(activities.repo, settings.logs.retention_days)
            if deleted:
                log.info("log retention deleted %d lines of builds older than %g days", deleted,
                         settings.logs.retention_days)
        except Exception:  # noqa: BLE001 - a failed sweep must not take the worker down
            log.exception("orphan sweep failed; retrying in %.0fs", interval)
