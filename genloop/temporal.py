"""Connecting to Temporal and running the genloop worker."""

from __future__ import annotations

import asyncio
import logging
import signal
from datetime import timedelta
from collections.abc import Mapping
from typing import Any

from temporalio.client import Client
from temporalio.envconfig import ClientConfig
from temporalio.worker import Worker

from genloop.settings import Settings

log = logging.getLogger("genloop.worker")


async def connect(settings: Settings, **overrides: Any) -> Client:
    """The standard envconfig (TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE, TLS, API key, profiles) with
    genloop's settings filling what it leaves unset."""
    config: dict[str, Any] = dict(ClientConfig.load_client_connect_config())
    config.setdefault("target_host", settings.temporal.target)
    config.setdefault("namespace", settings.temporal.namespace)
    config.update(overrides)
    return await Client.connect(**config)


def build_worker(
    client: Client,
    settings: Settings,
    activities: list[Any],
    *,
    task_queue: str | None = None,
    **overrides: Any,
) -> Worker:
    from workflows.build import BuildWorkflow

    options: dict[str, Any] = dict(
        task_queue=task_queue or settings.temporal.task_queue,
        workflows=[BuildWorkflow],
        activities=activities,
        max_concurrent_activities=settings.worker.max_concurrent_activities,
        max_concurrent_local_activities=settings.worker.max_concurrent_local_activities,
        max_concurrent_workflow_tasks=settings.worker.max_concurrent_workflow_tasks,
        graceful_shutdown_timeout=timedelta(seconds=10),
    )
    options.update(overrides)
    return Worker(client, **options)


def production_activities(settings: Settings, repo: Any, extra_runners: Mapping[str, Any] | None = None):
    """BuildActivities wired from settings: the real repository, sandbox client and runners."""
    from activities.build import BuildActivities
    from activities.runner import build_runner
    from activities.sandbox import SandboxClient, SandboxConfig

    runners: dict[str, Any] = {name: build_runner(name, settings) for name in settings.available_runners}
    runners.update(extra_runners or {})
    return BuildActivities(
        repo,
        SandboxClient(SandboxConfig.from_settings(settings)),
        runners,
        app_port=settings.sandbox.app_port,
    )


async def run_worker(settings: Settings, extra_runners: Mapping[str, Any] | None = None) -> None:
    """`genloop worker`: run until SIGTERM/SIGINT, then finish in-flight tasks and exit.
    `extra_runners` lets the fault-injection suite register its runner doubles."""
    from activities.sandbox import close_sdk_transports
    from persistence.repository import JobRepository

    repo = JobRepository.from_url(settings.database_url)
    client = await connect(settings)
    activities = production_activities(settings, repo, extra_runners)
    worker = build_worker(client, settings, activities.all())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("worker polling task queue %s on %s", settings.temporal.task_queue, settings.temporal.target)
    sweeper = asyncio.create_task(_sweep_periodically(settings, activities, client))
    try:
        async with worker:
            await stop.wait()
            log.info("shutting down: finishing in-flight tasks")
    finally:
        sweeper.cancel()
        await repo.aclose()
        await close_sdk_transports()


async def _sweep_periodically(settings: Settings, activities: Any, client: Client) -> None:
    from activities.sweep import sweep_orphans

    interval = settings.worker.sweep_interval_s
    if not interval:
        return
    while True:
        await asyncio.sleep(interval)
        try:
            report = await sweep_orphans(activities.sandboxes, activities.repo, client)
            if report.killed:
                log.info("orphan sweep killed %d sandboxes", len(report.killed))
        except Exception:  # noqa: BLE001 - a failed sweep must not take the worker down
            log.exception("orphan sweep failed; retrying in %.0fs", interval)
