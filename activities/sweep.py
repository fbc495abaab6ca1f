"""Orphan sweep: kill sandboxes whose build is no longer running and did not end READY with them.

A build's sandboxes carry its build id in their metadata, so they are found even when the create
response was lost or the workflow was terminated before it could clean up.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from activities.sandbox import SANDBOX_METADATA_KEY, SandboxClient
from persistence.repository import JobRepository
from workflows.stages import Stage

log = logging.getLogger("genloop.sweep")


@dataclass
class SweepReport:
    checked: int = 0
    killed: list[str] = field(default_factory=list)


async def _workflow_running(client: Client, build_id: str) -> bool:
    try:
        desc = await client.get_workflow_handle(build_id).describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return False
        raise
    return desc.status == WorkflowExecutionStatus.RUNNING


async def sweep_orphans(
    sandboxes: SandboxClient, repo: JobRepository, client: Client, *, include_live: bool = False
) -> SweepReport:
    """`include_live`: also the sandboxes of live previews (`genloop sweep --all`)."""
    report = SweepReport()
    for info in await sandboxes.list():
        build_id = (info.metadata or {}).get(SANDBOX_METADATA_KEY)
        if not build_id:
            continue  # not genloop's
        report.checked += 1
        if await _workflow_running(client, build_id):
            continue
        job = await repo.get(build_id)
        live = job is not None and job.status == Stage.READY.value and job.sandbox_id == info.sandbox_id
        if live and not include_live:
            continue  # a live preview: its TTL ends it
        await sandboxes.kill(info.sandbox_id)
        report.killed.append(info.sandbox_id)
        log.info("swept sandbox %s of build %s (%s)", info.sandbox_id, build_id, job.status if job else "no row")
    return report


async def sweep_logs(repo: JobRepository, retention_days: float, *, now: datetime | None = None) -> int:
    """Delete the logs of builds created more than `retention_days` ago (0: keep them forever);
    returns how many lines went."""
    if retention_days <= 0:
        return 0
    return await repo.delete_logs_before((now or datetime.now(UTC)) - timedelta(days=retention_days))
